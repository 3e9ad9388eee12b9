"""Where the data comes from: one `Source` class per family of files, built by Hydra from `conf/data/*.yaml`
(`_target_`). Nothing outside `data/` asks which family it has: it asks its source.

A source hands out
- checks before anything heavy (`check`): the files training needs exist, or the command that makes them;
- the streams a data store is built from (`store_inputs`, `store_files`, `passages`, `queries`, `train_qrels`,
  `train_qids`, `hard_negatives`, `teacher_score_chunks`), ids as store-ready int64s;
- the validation set (`validation_set`) and any split to evaluate (`split`), in the store's ids, with `ValIds` to
  name them back as the files do;
- what the model card says of it (`describe`) and what the run records of it (`run_record`).

A new format (say, a plain TSV folder) is one class here (or built on these) and one YAML file naming it.
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from marco_lightning.data.beir import BeirFolder, IdRows, iter_pair_scores, teacher_scores_complete
from marco_lightning.data.download import BEIR_FETCHED, ensure_files
from marco_lightning.data.formats import iter_qrels
from marco_lightning.data.msmarco import (
    chunk_from_rows,
    iter_hard_negatives,
    iter_id_text,
    iter_teacher_score_chunks,
)
from marco_lightning.data.trec import read_qrels, read_run
from marco_lightning.errors import ConfigError, MissingFileError

# The MS MARCO keys whose files decide a store's content (validation files are read directly, not stored).
MARCO_STORE_KEYS = ("collection", "queries", "train_queries", "train_qrels", "hard_negatives", "teacher_scores")


def build_source(data) -> Source:
    """The `data` config node as its Source (nested lists and dicts as plain Python)."""
    from hydra.utils import instantiate

    return instantiate(data, _convert_="all")


@dataclass
class EvalSplit:
    """A set of judged queries to evaluate on: its qrels (read on demand), the run re-ranked or scored by default,
    and the texts. `hint` says how to make a missing run."""

    qrels: Callable[[], dict[str, dict[str, int]]]
    run: str | None
    queries: str
    collection: str
    hint: str = ""


class Source:
    """What every source shares; subclasses fill in the streams. Keys are the data config's (`data.<key>`)."""

    name: str
    val_top_k: int
    val_rel_level: int
    val_teacher_run: str | None = None
    teacher_scores: str | None = None

    def check(self, needs_teacher: bool) -> None:
        """Before anything heavy: the inputs training needs are there (downloaded if the config lists them)."""
        if needs_teacher and not self.teacher_scores:
            raise ConfigError(f"the loss distils teacher scores, but data={self.name} has none: point "
                              "data.teacher_scores at a score file or choose a supervised loss (loss=mnrl)")

    def fetch_store_files(self) -> None:
        """Before a store is built: its input files are there (downloaded if the config lists them)."""

    def validation_set(self):
        """(qrels, run, ids) of the validation queries, keyed as the store keys them; ids: ValIds or None (the
        store's ids are the files' ids)."""
        raise NotImplementedError

    def split(self, name: str | None) -> EvalSplit:
        raise NotImplementedError

    def mining_folder(self, task: str) -> BeirFolder:
        raise ConfigError(f"task={task} works on a BEIR folder: add data=beir data.root=DIR (MS MARCO's hard "
                          "negatives and teacher scores are published: data=msmarco downloads them)")

    def describe(self) -> tuple[str, str]:
        """(the training data, the validation queries) in a sentence each, for the model card."""
        raise NotImplementedError

    def for_refit(self) -> Source:
        """The same data with the validation queries as training queries too (task.refit), a store of its own."""
        raise ConfigError(f"task.refit=true trains on the training plus the validation queries, but data={self.name}'s "
                          "validation queries are not training data (their judgements and runs are an evaluation "
                          "set, e.g. TREC DL): set task.refit=false, or train on a BEIR folder (data=beir)")

    def run_record(self) -> dict:
        """What metrics.json records of the data beside the metrics (e.g. how its negatives were mined)."""
        return {}


def _exists(key: str, path, root) -> str:
    if path is None or not Path(str(path)).exists():
        raise ConfigError(f"data.{key}: file not found: {path}\n  Fix the path (override data.{key}=...) or set "
                          f"data.root=DIR to the folder holding the files (now {root}).")
    return str(Path(str(path)).resolve())


class MarcoSource(Source):
    """MS MARCO's files (conf/data/msmarco.yaml, sample, trec_dl19, ...): integer ids as the files have them.
    Training reads collection, queries, train qrels, hard negatives and teacher scores into a store; validation
    re-ranks `val_top_k` of `val_run` for the queries of `val_qrels`."""

    def __init__(self, collection: str, queries, name: str = "msmarco", root: str | None = None,
                 train_queries: str | None = None, train_qrels: str | None = None, hard_negatives: str | None = None,
                 teacher_scores: str | None = None, val_queries: str | None = None, val_qrels: str | None = None,
                 val_run: str | None = None, val_teacher_run: str | None = None, val_top_k: int = 100,
                 val_rel_level: int = 2, downloads: dict | None = None):
        self.name, self.root, self.collection, self.downloads = name, root, collection, downloads or {}
        self.queries_files = [queries] if isinstance(queries, (str, os.PathLike)) else list(queries or [])
        self.train_queries, self.train_qrels_file = train_queries, train_qrels
        self.hard_negatives_file, self.teacher_scores = hard_negatives, teacher_scores
        self.val_queries, self.val_qrels, self.val_run = val_queries, val_qrels, val_run
        self.val_teacher_run = val_teacher_run
        self.val_top_k, self.val_rel_level = val_top_k, val_rel_level
        self._validation = None

    def _settings(self) -> dict:  # as the data config has them (download.ensure_files reads keys and root)
        return {"root": self.root, "downloads": self.downloads, "collection": self.collection,
                "queries": self.queries_files, "train_queries": self.train_queries,
                "train_qrels": self.train_qrels_file, "hard_negatives": self.hard_negatives_file,
                "teacher_scores": self.teacher_scores, "val_qrels": self.val_qrels, "val_run": self.val_run}

    def check(self, needs_teacher: bool) -> None:
        super().check(needs_teacher)
        ensure_files(self._settings(), ["val_qrels", "val_run"])  # downloads what data.downloads lists, if missing
        for key in ("val_qrels", "val_run"):
            _exists(key, self._settings()[key], self.root)

    def fetch_store_files(self) -> None:
        ensure_files(self._settings(), MARCO_STORE_KEYS)
        for key in MARCO_STORE_KEYS:
            value = self._settings()[key]
            for path in value if isinstance(value, list) else [value]:
                if path is not None:
                    _exists(key, path, self.root)

    # --- the store's inputs ------------------------------------------------------------------------------------
    def store_inputs(self) -> dict:
        """The resolved input paths: a store's manifest records them, and a store is reused only for the same."""
        def path(key, required=True):
            v = self._settings()[key]
            if v is None:
                if required:
                    raise ConfigError(f"data.{key} is required (a path)")
                return None
            if not Path(str(v)).exists():
                raise MissingFileError(f"data.{key}: {v} does not exist; fix the path or set data.root=DIR")
            return str(Path(str(v)).resolve())

        if not self.queries_files:
            raise ConfigError("data.queries is required (a path or a list of paths)")
        for q in self.queries_files:
            if not Path(str(q)).exists():
                raise MissingFileError(f"data.queries: {q} does not exist; fix the path or set data.root=DIR")
        return {"collection": path("collection"), "queries": [str(Path(str(q)).resolve()) for q in self.queries_files],
                "train_qrels": path("train_qrels", False), "train_queries": path("train_queries", False),
                "hard_negatives": path("hard_negatives"), "teacher_scores": path("teacher_scores", False)}

    def store_key(self) -> dict:
        """The settings that decide a store's content, as configured (a store is named by their digest)."""
        return {k: self._settings()[k] for k in MARCO_STORE_KEYS}

    def store_files(self) -> list[str]:
        value = [self._settings()[k] for k in MARCO_STORE_KEYS]
        return [str(p) for v in value for p in (v if isinstance(v, list) else [v]) if p and Path(str(p)).exists()]

    def train_qrels(self):
        return iter_qrels(self.train_qrels_file) if self.train_qrels_file else iter(())

    def train_qids(self) -> set[int] | None:
        return {qid for qid, _ in iter_id_text(self.train_queries)} if self.train_queries else None

    def hard_negatives(self, dropped: Counter):
        return iter_hard_negatives(self.hard_negatives_file)

    def passages(self):
        return iter_id_text(self.collection)

    def queries(self):
        return (p for q in self.queries_files for p in iter_id_text(q))

    def teacher_score_chunks(self):
        return iter_teacher_score_chunks(self.teacher_scores)

    # --- evaluation ----------------------------------------------------------------------------------------------
    def validation_set(self):
        if self._validation is None:
            qrels, run = read_qrels(self.val_qrels), read_run(self.val_run)
            # a run may hold unjudged queries (DL19 top-1000: 200, 43 judged)
            self._validation = qrels, {q: docs for q, docs in run.items() if q in qrels}, None
        return self._validation

    def split(self, name: str | None) -> EvalSplit:
        if name not in (None, "val"):
            raise ConfigError(f"task.split={name}: data={self.name} has one set of judged queries (its val_* files); "
                              "set task.qrels, task.run and task.queries, or pick the data config of that set "
                              "(data=trec_dl19, trec_dl20, dev_small)")
        return EvalSplit(lambda: read_qrels(self.val_qrels), self.val_run, self.val_queries, self.collection)

    def describe(self) -> tuple[str, str]:
        return f"`{self.name}` (train qrels `{Path(str(self.train_qrels_file)).name}`)", f"`{Path(str(self.val_qrels)).name}`"


class BeirSource(Source):
    """A BEIR folder (conf/data/beir.yaml) and what task=mine and task=score wrote for it: string ids, stored as
    rows (IdRows). Validation re-ranks `val_top_k` of the mined `val_system` run of the val split.

    `data.name` is the public dataset the folder was fetched from (`data.root` then resolves to the fetched folder,
    marco_lightning.config.beir_root), or None; the source's `name`, its stores' prefix, is `beir-<folder name>`
    either way."""

    def __init__(self, name: str | None, root: str, mined_dir: str, hard_negatives: str, teacher_scores: str,
                 collection: str, queries: str, val_run: str, val_top_k: int, val_rel_level: int = 1,
                 val_system: str = "bm25", train_split: str = "train", val_split: str = "dev",
                 test_split: str = "test", val_fraction: float = 0.1, eval_top_k: int | None = None,
                 val_hard_negatives: str | None = None, val_fold: int = 0):
        self.dataset, self.root, self.mined_dir = name, root, mined_dir
        self.name = f"beir-{Path(str(root)).name}" if root else "beir"
        self.val_hard_negatives_file = val_hard_negatives
        self.refit = False  # for_refit(): the val queries train too
        self.collection, self.queries_file, self.val_run = collection, queries, val_run
        self.hard_negatives_file, self.teacher_scores = hard_negatives, teacher_scores
        self.val_top_k, self.val_rel_level, self.val_system, self.eval_top_k = val_top_k, val_rel_level, \
            val_system, eval_top_k
        self.split_names = {"train_split": train_split, "val_split": val_split, "test_split": test_split,
                            "val_fraction": val_fraction, "val_fold": int(val_fold)}
        # fold f > 0 (task.folds) trains on fold 0's val queries too: task=mine's val file has their negatives
        self.val_fold = int(val_fold)
        self._folder, self._rows, self._validation = None, None, None

    @property
    def folder(self) -> BeirFolder:
        if self._folder is None:
            if not self.root:
                raise ConfigError("data.root is required: the BEIR folder (corpus.jsonl, queries.jsonl, qrels/); or "
                                  "data.name=NAME, a public BEIR dataset (scifact, or a hub id) fetched into the cache")
            self._folder = BeirFolder(self.root, **self.split_names)
        return self._folder

    @property
    def spelling(self) -> str:
        """How the command line names this folder: data.name=NAME when it was fetched by that name, else data.root."""
        fetched = self.dataset and self.root and (Path(str(self.root)) / BEIR_FETCHED).is_file()
        return f"data.name={self.dataset}" if fetched else f"data.root={self.root}"

    @property
    def rows(self) -> IdRows:
        if self._rows is None:
            self._rows = IdRows(self.folder)
        return self._rows

    def __getstate__(self):  # DataLoader workers and spawned ranks get the settings, not the folder's dicts
        return {**self.__dict__, "_folder": None, "_rows": None, "_validation": None}

    def for_refit(self) -> BeirSource:
        """The training queries plus the val split's (held out of qrels/train.tsv, or qrels/dev.tsv), with the val
        queries' negatives task=mine wrote (data.val_hard_negatives): a store of its own (its key says so)."""
        path = self.val_hard_negatives_file
        if not path or not Path(path).is_file():
            raise ConfigError(f"data.val_hard_negatives={path}: not found; task.refit trains on the val queries too "
                              f"and needs their mined negatives: run `python run.py task=mine data=beir "
                              f"{self.spelling}` again (it reuses its runs)")
        refit = copy.copy(self)
        refit.refit, refit._validation = True, None
        return refit

    def run_path(self, split: str) -> str:
        """The mined run of a split (task=mine writes runs/<split>.<system>.trec); data.val_run for val."""
        return self.val_run if split == "val" else str(Path(self.mined_dir) / "runs" / f"{split}.{self.val_system}.trec")

    def mining_folder(self, task: str) -> BeirFolder:
        return self.folder

    def check(self, needs_teacher: bool) -> None:
        """A BEIR folder trains on what task=mine (and task=score, for distillation) wrote: say which to run."""
        fold = ((("val_hard_negatives", self.val_hard_negatives_file, "mine"),
                 ("val_run", self.run_path("train"), "mine"))  # fold f's val queries: the train split's run
                if self.val_fold else ())
        for key, path, task in (("hard_negatives", self.hard_negatives_file, "mine"),
                                ("val_run", self.run_path("val"), "mine"), *fold,
                                ("teacher_scores", self.teacher_scores, "score")):
            if key == "teacher_scores" and not needs_teacher:
                continue
            if not path or not Path(path).is_file() or (
                    key == "teacher_scores" and not teacher_scores_complete(path, self.hard_negatives_file)):
                hint = (f" (data.val_system={self.val_system}: the mined system whose val run is re-ranked; it "
                        "must be one of task=mine's task.systems)" if key == "val_run" else "")
                raise ConfigError(f"data.{key}={path}: not found, not complete or made for other mined negatives; "
                                  f"run `python run.py task={task} data=beir {self.spelling}` (it resumes; "
                                  f"README \"Your own collection\"){hint}")

    # --- the store's inputs ------------------------------------------------------------------------------------
    def store_inputs(self) -> dict:
        folder, hard_negatives = self.folder, self.hard_negatives_file
        if not hard_negatives or not Path(str(hard_negatives)).is_file():
            raise MissingFileError(f"data.hard_negatives={hard_negatives}: no mined negatives; run `python run.py "
                                   f"task=mine data=beir {self.spelling}` first")
        teacher = self.teacher_scores
        inputs = {"format": "beir", "root": str(folder.root.resolve()), "splits": folder.settings(),
                  "hard_negatives": str(Path(str(hard_negatives)).resolve()),
                  "teacher_scores": str(Path(str(teacher)).resolve())
                  if teacher_scores_complete(teacher, hard_negatives) else None}
        if self.refit:  # the val queries train too (their teacher scores: none, task=score scores the train file)
            inputs.update(refit=True, val_hard_negatives=str(Path(str(self.val_hard_negatives_file)).resolve()))
        return inputs

    def store_key(self) -> dict:
        key = {"format": "beir", "root": self.root, **self.split_names, "hard_negatives": self.hard_negatives_file,
               "teacher_scores": self.teacher_scores}
        return {**key, "refit": True, "val_hard_negatives": self.val_hard_negatives_file} if self.refit else key

    def store_files(self) -> list[str]:
        files = [str(p) for p in self.folder.files()]
        mined = (self.hard_negatives_file, self.teacher_scores,
                 *((self.val_hard_negatives_file,) if self.refit or self.val_fold else ()))
        return files + [str(p) for p in mined if p and Path(p).exists()]

    def _training_qrels(self) -> dict[str, dict[str, int]]:
        """The training queries' judgements: the train split's, and with refit the val split's too."""
        train = self.folder.qrels("train")
        if not self.refit:
            return train
        merged = {q: dict(docs) for q, docs in train.items()}
        for q, docs in self.folder.qrels("val").items():  # a query in both splits: its judgements of both
            merged.setdefault(q, {}).update(docs)
        return merged

    def train_qrels(self):
        q, p = self.rows.query_row, self.rows.passage_row
        return ((q[qid], p[pid], g) for qid, docs in self._training_qrels().items() for pid, g in docs.items())

    def train_qids(self) -> set[int]:
        return {self.rows.query_row[q] for q in self._training_qrels()}

    def hard_negatives(self, dropped: Counter):
        files = [self.hard_negatives_file, *((self.val_hard_negatives_file,) if self.refit or self.val_fold else ())]
        for path in files:  # a query in both files: the store keeps its first (train) list
            yield from self._hard_negatives(path, dropped)

    def _hard_negatives(self, path, dropped: Counter):
        q, p = self.rows.query_row, self.rows.passage_row
        for qid, pos, lists in iter_hard_negatives(path, id_type=str):
            if qid not in q:
                dropped["hard_negatives_query_not_in_queries"] += 1
                continue
            known = [x for x in pos if x in p]
            lists = {name: [p[x] for x in pids if x in p] for name, pids in lists.items()}
            dropped["hard_negatives_unknown_passage"] += len(pos) - len(known)
            yield q[qid], [p[x] for x in known], lists

    def passages(self) -> Iterator[tuple[int, str]]:
        return ((row, text) for row, (_, text) in enumerate(self.folder.corpus()))

    def queries(self) -> Iterator[tuple[int, str]]:
        return ((row, text) for row, text in enumerate(self.folder.queries.values()))

    def teacher_score_chunks(self, chunk_size: int = 1 << 20):
        q, p, rows = self.rows.query_row, self.rows.passage_row, []
        for qid, pid, score in iter_pair_scores(self.teacher_scores):
            if qid in q and pid in p:
                rows.append((q[qid], p[pid], score))
            if len(rows) == chunk_size:
                yield chunk_from_rows(rows)
                rows = []
        if rows:
            yield chunk_from_rows(rows)

    # --- evaluation ----------------------------------------------------------------------------------------------
    def validation_set(self):
        if self._validation is None:
            ids = self.rows
            run = read_run(self.run_path("val"))
            if self.val_fold:  # fold f's queries are training queries for task=mine: their run is the train split's
                run.update(read_run(self.run_path("train")))
            qrels, run = ids.to_rows(self.folder.qrels("val")), ids.to_rows(run)
            self._validation = qrels, {q: docs for q, docs in run.items() if q in qrels}, ids
        return self._validation

    def split(self, name: str | None) -> EvalSplit:
        name = name or "test"
        if name == "val" and self.val_fold:
            raise ConfigError(f"data.val_fold={self.val_fold} with task.split=val: the val run task=mine wrote is "
                              "fold 0's; evaluate a fold with task.mode=retrieve, or drop data.val_fold")
        return EvalSplit(lambda: self.folder.qrels(name), self.run_path(name), self.queries_file,
                         self.collection,
                         hint=f"\n  Mine it first: python run.py task=mine data=beir {self.spelling}")

    def describe(self) -> tuple[str, str]:
        folder = self.folder
        queries = (f"split {folder.split_names['train']} and the val queries ({folder.describe_split('val')}): "
                   "task.refit" if self.refit else f"split {folder.split_names['train']} minus the held-out val queries")
        data = f"BEIR folder `{folder.root.name}` ({queries}, negatives mined by task=mine)"
        return data, folder.describe_split("val")

    def run_record(self) -> dict:
        """What task=mine chose, filtered and left out (its manifest), recorded with the metrics of the model trained
        on it."""
        manifest = Path(self.mined_dir) / "manifest.json"
        if not manifest.is_file():
            return {"mining": None}
        m = json.loads(manifest.read_text())
        return {"mining": {k: m.get(k) for k in ("selection", "skipped", "systems", "left_out")}}
