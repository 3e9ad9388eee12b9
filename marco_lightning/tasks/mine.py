"""task=mine: for a BEIR folder, ranked candidates of every split's queries from each system, and the training
queries' hard negatives in the layout of msmarco-hard-negatives.jsonl.gz.

Writes under data.mined_dir: runs/<split>.<system>.trec, hard-negatives.jsonl.gz, manifest.json (settings, what
the margins skipped, seconds per stage). Encodings, the BM25 index and each system's finished runs are kept in
cache/ and runs/, so a killed run resumes where it stopped and a rerun with new selection settings searches
nothing again.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from marco_lightning.config import ConfigError


def system_name(entry: str, cfg: DictConfig) -> str:
    """`bm25`, or a short name for a bi-encoder (its folder or hub name): the key in hard-negatives.jsonl.gz."""
    if entry == "bm25":
        return entry
    source = cfg.model.backbone if entry == "model" else entry
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(source).rstrip("/")).name) or "model"


def load_system(entry: str, cfg: DictConfig, cache: Path):
    from marco_lightning.mining import BM25, Dense

    collection = cfg.data.collection
    if entry == "bm25":
        return BM25(collection, cache / "bm25")
    from hydra.utils import get_class, instantiate

    from marco_lightning.models import BiEncoder
    from marco_lightning.retrieval import model_fingerprint
    from marco_lightning.tasks.evaluate import device

    if entry == "model":
        if get_class(cfg.model._target_).kind != "bi":
            raise ConfigError(f"task.systems: 'model' mines with the model= bi-encoder, but {cfg.model._target_} "
                              "is a cross-encoder; list a bi-encoder path or hub id instead")
        import torch

        torch.manual_seed(cfg.seed)  # a random_init model (the tests') is the same model on every run
        model = instantiate(cfg.model)
    else:
        model = BiEncoder(entry)
    model = model.to(device(cfg.task.device))
    if cfg.task.compile:
        from marco_lightning.inference import compile_model

        compile_model(model)
    return Dense(model, collection, cache / f"dense-{model_fingerprint(model)[:12]}", cfg.task.batch_size,
                 cfg.task.precision)


def main(cfg: DictConfig) -> dict:
    from marco_lightning.data.beir import SPLITS, BeirFolder
    from marco_lightning.data.trec import read_run, write_run
    from marco_lightning.evaluation import compute_metrics
    from marco_lightning.mining import candidate_depth, select_negatives

    if cfg.data.get("kind") != "beir":
        raise ConfigError("task=mine mines a BEIR folder: add data=beir data.root=DIR (MS MARCO's hard negatives "
                          "are published: data=msmarco downloads them)")
    task = cfg.task
    lo, hi = (list(task.range) + [None, None])[:2]
    lo = int(lo or 0)
    margins = task.relative_margin is not None or task.absolute_margin is not None
    if int(task.depth) < 1 or lo < 0 or (hi is not None and int(hi) <= lo):
        raise ConfigError(f"task.depth={task.depth}, task.range=[{lo}, {hi}]: need depth >= 1 and "
                          "0 <= range_min < range_max")
    names = {system_name(e, cfg): e for e in task.systems}
    if len(names) != len(task.systems):
        raise ConfigError(f"task.systems={list(task.systems)}: two entries share the name {sorted(names)}")

    folder = BeirFolder.from_config(cfg.data)
    clock, seconds = time.time(), {}
    qrels = {s: folder.qrels(s) for s in SPLITS if s != "test" or folder.has_split_file(folder.split_names["test"])}
    queries = {q: folder.queries[q] for split in qrels.values() for q in split}
    rows = folder.pid_rows  # also checks the corpus: duplicate ids and empty documents fail here
    seconds["read"] = round(time.time() - clock, 1)
    max_pos = max(len(d) for split in qrels.values() for d in split.values())
    depth = max(candidate_depth(task.depth, lo, hi, margins, max_pos), int(task.run_depth))

    out = Path(cfg.data.mined_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    runs, scorers, summary = {}, {}, {}
    for name, entry in names.items():
        clock = time.time()
        system = load_system(entry, cfg, cache)
        # a system's runs are reused when made by this system (its cache key: weights, collection) at this depth
        stamp = {"system": entry, "meta": json.loads((system.cache_dir / "meta.json").read_text()), "depth": depth,
                 "queries": hashlib.sha1(json.dumps([sorted(queries.items()), {s: sorted(qrels[s]) for s in qrels}])
                                         .encode()).hexdigest()}  # which query is in which split, too
        stamp_path = out / "runs" / f"{name}.json"
        files = {s: out / "runs" / f"{s}.{name}.trec" for s in qrels}
        if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(p.exists() for p in files.values()):
            ranked = {q: _ranking(docs) for s in qrels for q, docs in read_run(files[s]).items()}
        else:
            stamp_path.unlink(missing_ok=True)
            ranked = {q: _ranking(dict(zip(*r))) for q, r in system.search(queries, depth).items()}
            for split, judged in qrels.items():
                write_run({q: dict(zip(*ranked[q])) for q in judged if ranked.get(q, ([],))[0]}, files[split],
                          tag=f"marco-lightning-{name}")
            stamp_path.write_text(json.dumps(stamp))  # last: the runs above are complete
        runs[name], scorers[name] = ranked, system
        summary[name] = {"source": entry, "seconds": round(time.time() - clock, 1),
                         **{f"{s}_ndcg@10": round(compute_metrics(
                             qrels[s], {q: dict(zip(*ranked[q])) for q in qrels[s] if q in ranked}, rel_level=1,
                             measures=("ndcg@10",))["ndcg@10"], 4) for s in qrels}}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in summary[name].items() if k != "source"))

    # hard negatives of the training queries, each system's own scores deciding its margins
    clock = time.time()
    skipped, short, counts = {n: Counter() for n in names}, Counter(), Counter()
    pool = candidate_depth(int(task.depth), lo, hi, margins, max_pos)  # mine_hard_negatives' candidates
    path = out / "hard-negatives.jsonl.gz"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8") as f:  # mtime 0: the same negatives give the same bytes
        for qid, judged in qrels["train"].items():
            pos = [p for p, grade in judged.items() if grade >= 1]
            if not pos:
                continue
            neg = {}
            for name in names:
                ids, scores = runs[name].get(qid, ([], []))  # a query no BM25 term matches has no candidates
                ids, scores = ids[:pool], scores[:pool]
                pos_scores = positive_scores(scorers[name], qid, queries[qid], pos, ids, scores, rows) if margins else []
                neg[name] = select_negatives(ids, scores, pos, pos_scores, int(task.depth), lo, hi,
                                             task.absolute_margin, task.relative_margin, skipped[name])
                counts[name] += len(neg[name])
                short[name] += len(neg[name]) < task.depth
            f.write(json.dumps({"qid": qid, "pos": pos, "neg": neg}) + "\n")
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()  # unchanged: keep the file (and the teacher scores made for it) as they are
    else:
        tmp.replace(path)
    seconds["select"] = round(time.time() - clock, 1)

    manifest = {
        "root": str(folder.root.resolve()), "splits": {s: {"queries": len(qrels[s]), "source": folder.describe_split(s)}
                                                       for s in qrels},
        "queries_without_judgements": len(set(folder.queries) - set(queries)),  # in no split: not mined
        "systems": summary,
        "selection": {"depth": int(task.depth), "range": [lo, hi], "relative_margin": task.relative_margin,
                      "absolute_margin": task.absolute_margin, "candidates_per_query": depth},
        "negatives": dict(counts), "skipped": {n: dict(c) for n, c in skipped.items()},
        "queries_short_of_depth": dict(short), "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"Mined: {path} ({len(qrels['train'])} training queries; negatives per system {dict(counts)}; "
          f"margin skips {manifest['skipped']})\nRuns: {out / 'runs'}")
    return manifest


def _ranking(docs: dict[str, float]):
    """(ids, scores) in the order write_run writes them (score, then id, descending): a rerun that reads the runs
    back ranks ties as the run that wrote them."""
    items = sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [p for p, _ in items], [s for _, s in items]


def positive_scores(system, qid, query, positives, ids, scores, rows) -> list[float]:
    """The system's scores of a query's positives: from its ranking where they are in it (BM25 would otherwise
    score the whole collection for each query), else computed."""
    found = dict(zip(ids, scores))
    missing = [p for p in positives if p not in found]
    if missing:
        found.update(zip(missing, system.pair_scores(qid, query, [rows[p] for p in missing])))
    return [found[p] for p in positives]
