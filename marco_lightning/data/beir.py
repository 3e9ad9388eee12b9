"""A BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`): checked once, read as splits.

Ids stay the folder's strings in everything written; inside a data store a passage is its row in corpus.jsonl and
a query its row in queries.jsonl (dense ints, so ids of any shape fit the store's int64 arrays).
The validation split is `qrels/<val_split>.tsv` when the folder has one, else a fixed share of the training
queries drawn by a seeded permutation of their sorted ids: the same queries on every machine, never trained on.
`val_fold=f` holds out the f-th such share of the permutation instead (fold 0 is the default split): the folds of
task.folds, which cross-validates task.candidates when a val split of a few queries cannot choose.

Real collections are messy. A document with neither title nor text, or a query with an empty text, is left out
(counted, warned, `BeirFolder.left_out()`), not encoded as BEIR's " ": it has nothing a model or BM25 could match,
so it could only ever be a false candidate (a dense model ranks an empty text near many queries) or a positive
without text. The rule is `has_text`, and every reader of the files applies it (`BeirFolder`, and
`data/texts.iter_collection`, which BM25, the dense index, re-ranking and scoring read): row numbers (the store's,
BM25's, faiss's, IdRows') are the rows of the documents kept, the same everywhere. Judgements naming a left-out
document or query are dropped and counted per split file, as judgements naming unknown ids are. Duplicate ids and
ids with whitespace stay refusals: they would corrupt every file written.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from marco_lightning.data.formats import DataFormatError, Lines, file_stamp, iter_qrels
from marco_lightning.errors import ConfigError, MissingFileError

SPLITS = ("train", "val", "test")


def _find(root: Path, name: str) -> Path:
    if (root / name).is_file():
        return root / name
    gz = " (gunzip it: the files are read by name)" if (root / f"{name}.gz").is_file() else ""
    raise MissingFileError(f"BEIR folder {root}: no {name}{gz} (data.root should hold corpus.jsonl, "
                           "queries.jsonl and qrels/<split>.tsv)")


def has_text(text: str) -> bool:
    """Whether a document's text (`beir_text`) or a query's is kept: anything but whitespace."""
    return bool(text.strip())


def iter_texts(path) -> Iterator[tuple[str, str]]:
    """(id, text) of a BEIR corpus.jsonl or queries.jsonl in file order, the entries without text left out (as
    BeirFolder leaves them out: the same rows)."""
    for d in iter_jsonl(path, "raise", None):
        text = beir_text(d)
        if has_text(text):
            yield d["_id"], text


def _checked_id(id_: str, path: Path, n: int) -> str:
    if not id_ or any(c.isspace() for c in id_):
        raise DataFormatError(f"{path}: line {n}: _id {id_!r} is empty or holds whitespace, which TREC run and qrels "
                              "files cannot carry; rename it (e.g. spaces to '_')")
    return id_


class BeirFolder:
    def __init__(self, root, train_split: str = "train", val_split: str = "dev", test_split: str = "test",
                 val_fraction: float = 0.1, val_fold: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"data.root={root}: no such folder; point data.root at a BEIR folder "
                                   "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
        self.corpus_path, self.queries_path = _find(self.root, "corpus.jsonl"), _find(self.root, "queries.jsonl")
        if not (0 < val_fraction < 1):
            raise ConfigError(f"data.val_fraction={val_fraction}: use a share in (0, 1)")
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.val_fraction, self.val_fold = val_fraction, int(val_fold)
        self._queries: dict[str, str] | None = None
        self._pids: dict[str, int] | None = None
        self._qrels: dict[str, dict] = {}  # split file name -> its checked judgements
        self._no_text = {"documents": None, "queries": None}  # ids left out for want of text, once read
        self._dropped: dict[str, dict[str, int]] = {}  # split file name -> judgements dropped, by reason

    @classmethod
    def from_config(cls, data: Mapping) -> BeirFolder:
        if not data.get("root"):
            raise ConfigError("data.root is required: the BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
        return cls(data["root"], data.get("train_split", "train"), data.get("val_split", "dev"),
                   data.get("test_split", "test"), data.get("val_fraction", 0.1), data.get("val_fold", 0))

    def settings(self) -> dict:
        return {"train_split": self.split_names["train"], "val_split": self.split_names["val"],
                "test_split": self.split_names["test"], "val_fraction": self.val_fraction, "val_fold": self.val_fold}

    def files(self) -> list[Path]:
        """What the folder's data is read from (their sizes and times key the caches built from them)."""
        return [self.corpus_path, self.queries_path, *sorted((self.root / "qrels").glob("*.tsv"))]

    # --- texts ---------------------------------------------------------------------------------------------
    def corpus(self) -> Iterator[tuple[str, str]]:
        """(id, "title text") in file order, documents without text left out (counted and warned); a duplicate
        id is an error naming its line."""
        seen: dict[str, int] = {}
        empty: list[tuple[int, str]] = []
        for n, d in enumerate(iter_jsonl(self.corpus_path, "raise", None), 1):
            pid = _checked_id(d["_id"], self.corpus_path, n)
            if seen.setdefault(pid, n) != n:
                raise DataFormatError(f"{self.corpus_path}: _id {pid!r} occurs twice (documents {seen[pid]} and {n})")
            text = beir_text(d)
            if not has_text(text):
                empty.append((n, pid))
                continue
            yield pid, text
        self._no_text["documents"] = {pid for _, pid in empty}
        if empty:
            warnings.warn(f"{self.corpus_path}: left out {len(empty)} document(s) with neither title nor text "
                          f"(e.g. document {empty[0][0]}, _id {empty[0][1]!r}); judgements naming them are dropped",
                          stacklevel=2)

    @property
    def pid_rows(self) -> dict[str, int]:
        """Passage id -> its row in corpus.jsonl (one pass over the corpus, kept)."""
        if self._pids is None:
            self._pids = {pid: i for i, (pid, _) in enumerate(self.corpus())}
            if not self._pids:
                raise DataFormatError(f"{self.corpus_path}: no documents")
        return self._pids

    @property
    def queries(self) -> dict[str, str]:
        if self._queries is None:
            queries: dict[str, str] = {}
            empty: dict[str, int] = {}  # id -> line
            for n, d in enumerate(iter_jsonl(self.queries_path, "raise", None), 1):
                _checked_id(d["_id"], self.queries_path, n)
                if d["_id"] in queries or d["_id"] in empty:
                    raise DataFormatError(f"{self.queries_path}: _id {d['_id']!r} occurs twice (query {n})")
                if has_text(d["text"]):
                    queries[d["_id"]] = d["text"]
                else:
                    empty[d["_id"]] = n
            if empty:
                qid, n = next(iter(empty.items()))
                warnings.warn(f"{self.queries_path}: left out {len(empty)} query(ies) with an empty text (e.g. "
                              f"query {n}, _id {qid!r}); judgements of them are dropped", stacklevel=2)
            self._queries, self._no_text["queries"] = queries, set(empty)
        return self._queries

    def left_out(self) -> dict:
        """What the folder's files hold that nothing uses, as read so far: the documents and queries without text,
        and per split file read (`qrels/<name>.tsv`, by name) the judgements dropped, by reason."""
        return {"documents_without_text": len(self._no_text["documents"] or ()),
                "queries_without_text": len(self._no_text["queries"] or ()),
                "qrels": {name: dict(counts) for name, counts in self._dropped.items()}}

    # --- splits --------------------------------------------------------------------------------------------
    def has_split_file(self, name: str) -> bool:
        return (self.root / "qrels" / f"{name}.tsv").is_file()

    def _read_qrels(self, name: str) -> dict[str, dict[str, int]]:
        if name not in self._qrels:
            self._qrels[name] = self._check_qrels(name)
        return self._qrels[name]

    def _check_qrels(self, name: str) -> dict[str, dict[str, int]]:
        path = self.root / "qrels" / f"{name}.tsv"
        if not path.is_file():
            have = sorted(p.stem for p in (self.root / "qrels").glob("*.tsv"))
            raise MissingFileError(f"{path}: no such split file; {self.root / 'qrels'} has {have or 'nothing'}: "
                                   "name one of those (task.split, data.train_split, data.val_split, data.test_split)")
        qrels: dict[str, dict[str, int]] = {}
        unknown_q, unknown_p = set(), set()
        queries, pids = self.queries, self.pid_rows
        no_text_q, no_text_p = self._no_text["queries"], self._no_text["documents"]
        textless_q, textless_judgements = set(), 0
        for qid, pid, grade in iter_qrels(path, id_type=str):
            if qid in no_text_q:
                textless_q.add(qid)
            elif qid not in queries:
                unknown_q.add(qid)
            elif pid in no_text_p:
                textless_judgements += 1
            elif pid not in pids:
                unknown_p.add(pid)
            else:
                qrels.setdefault(qid, {})[pid] = grade
        self._dropped[name] = {"queries_without_text": len(textless_q),
                               "judgements_of_documents_without_text": textless_judgements,
                               "unknown_query_ids": len(unknown_q), "unknown_document_ids": len(unknown_p)}
        if unknown_q or unknown_p:
            warnings.warn(f"{path}: dropped judgements of {len(unknown_q)} query id(s) not in {self.queries_path.name}"
                          f" (e.g. {sorted(unknown_q)[:3]}) and {len(unknown_p)} document id(s) not in "
                          f"{self.corpus_path.name} (e.g. {sorted(unknown_p)[:3]})", stacklevel=2)
        if textless_q or textless_judgements:
            warnings.warn(f"{path}: dropped the judgements of {len(textless_q)} query(ies) without text (e.g. "
                          f"{sorted(textless_q)[:3]}) and {textless_judgements} judgement(s) of documents without "
                          "text", stacklevel=2)
        if not qrels:
            raise DataFormatError(f"{path}: no judgement names a query of {self.queries_path.name} and a document "
                                  f"of {self.corpus_path.name}: the split has no queries")
        return qrels

    def held_out(self) -> set[str]:
        """The training queries set aside for validation when the folder has no validation split: fold val_fold."""
        train = sorted(self._read_qrels(self.split_names["train"]))
        n, f = self._fold_size(len(train)), self.val_fold
        if n >= len(train):
            raise ConfigError(f"data.val_fraction={self.val_fraction} leaves no training query of {len(train)}: lower "
                              f"it, or add a qrels/{self.split_names['val']}.tsv to {self.root}")
        if not 0 <= f < len(train) // n:
            raise ConfigError(f"data.val_fold={f}: {len(train)} training queries make {len(train) // n} folds of "
                              f"{n} (data.val_fraction={self.val_fraction}): use 0..{len(train) // n - 1}")
        order = np.random.default_rng(0).permutation(len(train))[f * n:(f + 1) * n]
        return {train[i] for i in order}

    def _fold_size(self, num_train: int) -> int:
        return max(1, math.ceil(self.val_fraction * num_train))

    def num_folds(self) -> int:
        """How many disjoint val folds of data.val_fraction the training queries make (1 with a val split file)."""
        if self.has_split_file(self.split_names["val"]):
            return 1
        num_train = len(self._read_qrels(self.split_names["train"]))
        return num_train // self._fold_size(num_train)

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """Judgements of `train`, `val` or `test` (or of any qrels/<name>.tsv), ids as in the folder."""
        name = self.split_names.get(split, split)
        if self.val_fold and split in ("train", "val") and self.has_split_file(self.split_names["val"]):
            raise ConfigError(f"data.val_fold={self.val_fold}: {self.root} has qrels/{self.split_names['val']}.tsv, "
                              "its own val split; folds are shares of the training queries, held out when there is none")
        if split in ("train", "val") and not self.has_split_file(self.split_names["val"]):
            held = self.held_out()
            train = self._read_qrels(self.split_names["train"])
            return {q: d for q, d in train.items() if (q in held) == (split == "val")}
        return self._read_qrels(name)

    def describe_split(self, split: str) -> str:
        if split == "val" and not self.has_split_file(self.split_names["val"]):
            fold = f", fold {self.val_fold}" if self.val_fold else ""
            return (f"val = {self.val_fraction:.0%} of qrels/{self.split_names['train']}.tsv's queries, held out "
                    f"(no qrels/{self.split_names['val']}.tsv{fold})")
        return f"{split} = qrels/{self.split_names.get(split, split)}.tsv"


# --- the files: jsonl records, and the (query, passage, score) files task=score writes ---------------------

def iter_jsonl(path, on_error, skipped, required=("_id", "text")):
    lines = Lines(path, on_error, skipped)
    for n, line in lines:
        try:
            d = json.loads(line)
            if not all(type(d.get(k)) is str for k in required):
                raise ValueError
        except ValueError:
            lines.bad(n, f"expected a JSON object with string fields {list(required)}", line)
            continue
        yield d


def beir_text(d: dict) -> str:
    """A BEIR document as BEIR and MTEB encode it: title and text joined by a space."""
    title = (d.get("title") or "").strip()
    return f"{title} {d['text']}" if title else d["text"]


def iter_pair_scores(path, on_error="raise", skipped=None) -> Iterator[tuple[str, str, float]]:
    """(query id, passage id, score) from `query-id \\t corpus-id \\t score` lines (task=score writes these)."""
    lines = Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.decode("utf-8", "replace").split("\t")
        try:
            if len(parts) != 3 or not math.isfinite(score := float(parts[2])):
                raise ValueError
            yield parts[0], parts[1], score
        except ValueError:
            lines.bad(n, "expected `query-id <TAB> corpus-id <TAB> finite score`", line)


class IdRows:
    """Folder ids <-> data-store rows (a passage's row in corpus.jsonl, a query's in queries.jsonl)."""

    def __init__(self, folder: BeirFolder):
        self.passage_row, self.query_row = folder.pid_rows, {q: i for i, q in enumerate(folder.queries)}
        self.passage_names, self.query_names = list(self.passage_row), list(self.query_row)

    def to_rows(self, run: Mapping[str, Mapping]) -> dict[str, dict]:
        """A run or qrels keyed by folder ids -> keyed by store rows (as strings, like every run)."""
        p = self.passage_row
        return {str(self.query_row[q]): {str(p[d]): v for d, v in docs.items() if d in p}
                for q, docs in run.items() if q in self.query_row}

    def to_names(self, run: Mapping[str, Mapping]) -> dict[str, dict]:
        p = self.passage_names
        return {self.query_names[int(q)]: {p[int(d)]: v for d, v in docs.items()} for q, docs in run.items()}


def teacher_scores_complete(path, hard_negatives) -> bool:
    """task=score finished writing `path` for these mined negatives (its .json says so); a score file without a
    .json was made elsewhere: taken as it is."""
    if not path or not Path(str(path)).is_file():
        return False
    meta = Path(str(path)).with_suffix(".json")
    if not meta.is_file():
        return True
    meta = json.loads(meta.read_text())
    return meta.get("complete", False) and meta["source"]["hard_negatives"] == file_stamp(hard_negatives)
