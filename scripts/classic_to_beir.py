"""Convert the classic test collections of ../shared/data (Cranfield, CISI, CACM, Vaswani) into BEIR folders with a
train/test split of their own: the judged queries in a seeded random order, the first half for training, the rest
for test (the project then holds out 10% of the training half for validation). They check that a recipe for "your
own collection" generalises beyond SciFact. Documents and queries are written as the files have them: Cranfield's
two empty documents stay empty, as a user's collection would have them.

    python scripts/classic_to_beir.py --out cache/classic [--only cranfield,cisi] [--train-share 0.5]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smart(path: Path) -> dict[str, dict[str, str]]:
    """SMART tagged records (`.I n` then `.T/.A/.B/.W/.X` fields) -> {id: {field letter: text}}."""
    records, current, field = {}, None, None
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(".I "):
            current, field = {}, None
            records[line[3:].strip()] = current
        elif re.fullmatch(r"\.[A-Z]( .*)?", line.rstrip()):
            field = line[1]
            current.setdefault(field, [])
        elif current is not None and field is not None:
            current[field].append(line.strip())
    return {i: {f: " ".join(x for x in lines if x).strip() for f, lines in r.items()} for i, r in records.items()}


def cranfield():
    root = SHARED / "cranfield"
    docs = {i: (r.get("T", ""), r.get("W", "")) for i, r in smart(root / "cran.all.1400").items()}
    # cranqrel numbers the queries by position (1..225), not by their .I ids (SOURCE.md)
    queries = {str(n): r.get("W", "") for n, r in enumerate(smart(root / "cran.qry").values(), 1)}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "cranqrel").read_text().split("\n"):
        if line.strip():
            q, d, code = line.split()[:3]
            # codes 1 (complete answer) .. 4 (minimal interest), -1 no interest: grades 4 .. 1, and 0
            qrels.setdefault(q, {})[d] = 5 - int(code) if int(code) > 0 else 0
    return docs, queries, qrels


def cisi():
    root = SHARED / "cisi"
    docs = {i: (r.get("T", ""), r.get("W", "")) for i, r in smart(root / "CISI.ALL").items()}
    queries = {i: r.get("W", "") for i, r in smart(root / "CISI.QRY").items()}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "CISI.REL").read_text().splitlines():
        if line.strip():
            q, d = line.split()[:2]
            qrels.setdefault(q, {})[d] = 1
    return docs, queries, qrels


def cacm():
    root = SHARED / "cacm"
    docs = {}
    for line in (root / "cacm.jsonl").read_text().splitlines():
        d = json.loads(line)
        docs[d["id"]] = ("", " ".join(d["contents"].split()))
    text = (root / "topics.cacm.txt").read_text()
    queries = {m[1]: " ".join(m[2].split()) for m in re.finditer(r"<DOCNO>\s*(\d+)\s*</DOCNO>(.*?)</DOC>", text, re.DOTALL)}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels.cacm.txt").read_text().splitlines():
        if line.strip():
            q, _, d, g = line.split()
            qrels.setdefault(q, {})[f"CACM-{int(d.split('-')[1]):04d}"] = int(g)  # ids zero-padded (SOURCE.md)
    return docs, queries, qrels


def vaswani():
    root = SHARED / "vaswani"
    text = (root / "doc-text.trec").read_text(encoding="latin-1")
    docs = {m[1].strip(): ("", " ".join(m[2].split()))
            for m in re.finditer(r"<DOCNO>(.*?)</DOCNO>(.*?)</DOC>", text, re.DOTALL)}
    text = (root / "query-text.trec").read_text(encoding="latin-1")
    queries = {m[1].strip(): " ".join(m[2].split()) for m in re.finditer(r"<num>(.*?)</num>\s*<title>(.*?)</title>",
                                                                          text, re.DOTALL)}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels").read_text().splitlines():
        if line.strip():
            q, _, d, g = line.split()
            qrels.setdefault(q, {})[d] = int(g)
    return docs, queries, qrels


COLLECTIONS = {"cranfield": cranfield, "cisi": cisi, "cacm": cacm, "vaswani": vaswani}


def write(name: str, out: Path, train_share: float = 0.5, seed: int = 0) -> dict:
    docs, queries, qrels = COLLECTIONS[name]()
    judged = sorted(q for q, d in qrels.items() if q in queries and any(g >= 1 for g in d.values()))
    order = np.random.default_rng(seed).permutation(len(judged))
    n_train = round(train_share * len(judged))
    split = {"train": sorted(judged[i] for i in order[:n_train]), "test": sorted(judged[i] for i in order[n_train:])}
    folder = out / name
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, (t, x) in docs.items())
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in judged)
    for part, qids in split.items():
        with open(folder / "qrels" / f"{part}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t{g}\n" for q in qids for d, g in qrels[q].items() if d in docs)
    relevant = [sum(g >= 1 for g in qrels[q].values()) for q in judged]
    return {"docs": len(docs), "empty_docs": sum(not (t + x).strip() for t, x in docs.values()),
            "queries": {k: len(v) for k, v in split.items()}, "relevant_per_query": round(float(np.mean(relevant)), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(COLLECTIONS))
    parser.add_argument("--train-share", type=float, default=0.5)
    args = parser.parse_args()
    if not SHARED.is_dir():
        parser.exit(2, f"needs the classic collections at {SHARED} (the workplace's shared data)\n")
    for name in args.only.split(","):
        print(name, write(name, args.out, args.train_share))


if __name__ == "__main__":
    main()
