"""The prepared data: texts and training lists converted once by `prepare`, memory-mapped by `Store`.

A store folder holds, for `passages` and `queries`, sorted int64 ids, int64 offsets and one utf-8 blob each,
and for the training queries CSR-style lists of positives and hard negatives with their teacher scores (NaN
where there is none). `manifest.json` is written last, and the folder is built next to `out_dir` and renamed
into place, so a folder with a manifest is always complete.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from marco_lightning.data.msmarco import iter_teacher_score_chunks
from marco_lightning.data.negatives import SKIP_REASONS, skip_reasons, take_negatives
from marco_lightning.errors import ConfigError, DataFormatError, ExistingFileError, MissingFileError

FORMAT_VERSION = 1
TRAIN_ARRAYS = ("qids", "pos_offsets", "pos_pids", "pos_scores", "neg_offsets", "neg_pids", "neg_scores")


def _progress(it, desc, unit="lines", total=None):
    return tqdm(it, desc=desc, unit=unit, total=total, file=sys.stderr, mininterval=2, unit_scale=True)


# --- reading a store -----------------------------------------------------------------------------------------

class TextTable:
    """id -> text over memory-mapped sorted ids, offsets and a utf-8 blob."""

    def __init__(self, folder, name: str):
        self.folder, self.name = Path(folder), name
        self.ids = np.load(self.folder / f"{name}.ids.npy", mmap_mode="r")
        self.offsets = np.load(self.folder / f"{name}.offsets.npy", mmap_mode="r")
        blob = self.folder / f"{name}.text.bin"
        self.blob = np.memmap(blob, np.uint8, "r") if blob.stat().st_size else np.empty(0, np.uint8)
        if len(self.offsets) != len(self.ids) + 1 or int(self.offsets[-1]) != len(self.blob):
            raise DataFormatError(f"store {self.folder}: {name} files are inconsistent (damaged store?); "
                                  "delete the folder and run prepare again")

    def __reduce__(self):  # pickled (DataLoader workers, ddp_spawn) by path, never by content
        return TextTable, (self.folder, self.name)

    def __len__(self):
        return len(self.ids)

    def __contains__(self, id_) -> bool:
        i = np.searchsorted(self.ids, id_)
        return bool(i < len(self.ids) and self.ids[i] == id_)

    def positions(self, ids) -> np.ndarray:
        """Row of each id (vectorised); KeyError naming the ids that are not in the table."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.ids, ids)
        found = self.ids[np.minimum(pos, len(self.ids) - 1)] == ids if len(self.ids) else np.zeros(ids.shape, bool)
        if not found.all():
            missing = ids[~found][:10].tolist()
            raise KeyError(f"{self.name}: no text for id(s) {missing} ({int((~found).sum())} missing)")
        return pos

    def nbytes(self, ids) -> np.ndarray:
        """utf-8 length of each text (vectorised): a free stand-in for its token count."""
        pos = self.positions(ids)
        return self.offsets[pos + 1] - self.offsets[pos]

    def text(self, id_) -> str:
        return self.texts([id_])[0]

    def texts(self, ids) -> list[str]:
        pos = self.positions(ids)
        starts, ends = self.offsets[pos], self.offsets[pos + 1]
        return [self.blob[s:e].tobytes().decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist())]


class TrainLists:
    """For training query i: its positives and hard negatives (pids and teacher scores, NaN where none)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        for name in TRAIN_ARRAYS:
            setattr(self, name, np.load(self.folder / f"train.{name}.npy", mmap_mode="r"))
        q = len(self.qids)
        if len(self.pos_offsets) != q + 1 or len(self.neg_offsets) != q + 1 or \
                self.pos_offsets[-1] != len(self.pos_pids) or self.neg_offsets[-1] != len(self.neg_pids):
            raise DataFormatError(f"store {self.folder}: training lists are inconsistent (damaged store?); "
                                  "delete the folder and run prepare again")

    def __reduce__(self):
        return TrainLists, (self.folder,)

    def __len__(self):
        return len(self.qids)

    def positives(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.pos_offsets[i], self.pos_offsets[i + 1]
        return self.pos_pids[s:e], self.pos_scores[s:e]

    def negatives(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.neg_offsets[i], self.neg_offsets[i + 1]
        return self.neg_pids[s:e], self.neg_scores[s:e]


class Store:
    """A prepared store, opened read-only with numpy memmaps."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"no data store at {self.path}: run prepare (python run.py task=prepare)")
        if not (self.path / "manifest.json").is_file():
            raise MissingFileError(f"{self.path} is not a complete data store (no manifest.json): an interrupted "
                                   "prepare? Delete it and run prepare again")
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(f"{self.path}: store format {self.manifest.get('format_version')}, this code reads "
                                  f"{FORMAT_VERSION}; run prepare again with force=True (task=prepare task.force=true)")
        self.passages = TextTable(self.path, "passages")
        self.queries = TextTable(self.path, "queries")
        self.train = TrainLists(self.path)

    def __reduce__(self):
        return Store, (self.path,)

    def __repr__(self):
        m = self.manifest
        return (f"Store({str(self.path)!r}: {m['num_passages']} passages, {m['num_queries']} queries, "
                f"{m['num_train_queries']} training queries)")


# --- writing a store -----------------------------------------------------------------------------------------

def write_text_table(pairs: Iterable[tuple[int, str]], folder, name: str, dropped: Counter | None = None) -> int:
    """Write (id, text) pairs as a TextTable `name` in `folder`; duplicate ids keep their first text."""
    folder = Path(folder)
    raw = folder / f"{name}.text.unsorted"
    ids, lengths = array("q"), array("q")
    with open(raw, "wb", buffering=1 << 22) as f:
        for id_, text in pairs:
            b = text.encode("utf-8")
            f.write(b)
            ids.append(id_)
            lengths.append(len(b))
    ids, lengths = np.frombuffer(ids, np.int64), np.frombuffer(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    if len(ids) and not (np.diff(ids) > 0).all():  # unsorted or duplicates (queries files): reorder the blob
        order = np.argsort(ids, kind="stable")
        keep = np.concatenate([[True], ids[order][1:] != ids[order][:-1]])
        if dropped is not None and (~keep).sum():
            dropped[f"duplicate_{name}_id"] += int((~keep).sum())
        order = order[keep]
        src = np.memmap(raw, np.uint8, "r") if starts[-1] else np.empty(0, np.uint8)
        with open(folder / f"{name}.text.bin", "wb", buffering=1 << 22) as f:
            f.writelines(src[s:e] for s, e in zip(starts[order].tolist(), starts[order + 1].tolist()))
        del src
        raw.unlink()
        ids, lengths = ids[order], lengths[order]
        starts = np.concatenate([[0], np.cumsum(lengths)])
    else:
        raw.rename(folder / f"{name}.text.bin")
    np.save(folder / f"{name}.ids.npy", ids)
    np.save(folder / f"{name}.offsets.npy", starts.astype(np.int64))
    return len(ids)


def _pair_keys(qids, pids, check=True) -> np.ndarray:
    qids, pids = np.asarray(qids, np.int64), np.asarray(pids, np.int64)
    if check and len(qids) and (min(qids.min(), pids.min()) < 0 or max(qids.max(), pids.max()) >= 1 << 32):
        raise DataFormatError("teacher scores: query and passage ids must be in [0, 2^32) to be paired with their "
                              "scores; renumber the data's ids or train without data.teacher_scores")
    return (qids.astype(np.uint64) << np.uint64(32)) | pids.astype(np.uint64)


class TeacherScores:
    """Teacher scores as sorted uint64 keys (qid << 32 | pid) and float32 values, looked up by searchsorted."""

    def __init__(self, chunks, qids: np.ndarray, pairs: np.ndarray | None = None, name: str = ""):
        """Stream (qids, pids, scores) chunks (or a score file's path), keeping the scores of `qids` (sorted
        int64), and of `pairs` (sorted keys) if given."""
        if isinstance(chunks, (str, os.PathLike)):
            chunks, name = iter_teacher_score_chunks(chunks), Path(chunks).name
        keys, vals = [], []
        for q, p, s in _progress(chunks, f"teacher scores {name}", "chunks"):
            keep = _sorted_isin(q, qids)
            k = _pair_keys(q[keep], p[keep])
            if pairs is not None:
                sel = _sorted_isin(k, pairs)
                k, keep_s = k[sel], s[keep][sel]
            else:
                keep_s = s[keep]
            keys.append(k)
            vals.append(keep_s.astype(np.float32))
        keys = np.concatenate(keys) if keys else np.empty(0, np.uint64)
        vals = np.concatenate(vals) if vals else np.empty(0, np.float32)
        order = np.argsort(keys, kind="stable")
        keys, vals = keys[order], vals[order]
        last = np.append(keys[1:] != keys[:-1], True)  # a key given twice: the later score wins, as in a dict
        self.keys, self.vals = keys[last], vals[last]

    def __len__(self):
        return len(self.keys)

    def lookup(self, qid: int, pids) -> np.ndarray:
        """float32 scores of (qid, pid) for each pid, NaN where there is none."""
        # search the query's own (small, contiguous) range: a search over all 160M keys misses the cache
        lo, hi = np.searchsorted(self.keys, _pair_keys([qid, qid + 1], [0, 0], check=False)).tolist()
        keys, vals = self.keys[lo:hi], self.vals[lo:hi]
        if not len(keys):
            return np.full(len(pids), np.nan, np.float32)
        want = (np.uint64(qid) << np.uint64(32)) | np.asarray(pids, np.int64).view(np.uint64)
        i = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        return np.where(keys[i] == want, vals[i], np.float32(np.nan))

    def lookup_keys(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.full(len(keys), np.nan, np.float32)
        i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[i] == keys, self.vals[i], np.float32(np.nan))


def _sorted_isin(x: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    if not len(sorted_ref):
        return np.zeros(len(x), bool)
    i = np.minimum(np.searchsorted(sorted_ref, x), len(sorted_ref) - 1)
    return sorted_ref[i] == x


def _membership(sorted_ids: np.ndarray):
    """A fast `ids -> bool array` test: a bitmap when the ids are small non-negative ints (MS MARCO's are)."""
    if len(sorted_ids) and sorted_ids[0] >= 0 and sorted_ids[-1] < max(1 << 26, 4 * len(sorted_ids)):
        present = np.zeros(int(sorted_ids[-1]) + 2, bool)
        present[sorted_ids] = True
        last = np.uint64(len(present) - 1)  # negative ids (as uint64) and ids past the end land on a False slot
        return lambda ids: present[np.minimum(np.asarray(ids, np.int64).view(np.uint64), last)]
    return lambda ids: _sorted_isin(np.asarray(ids), sorted_ids)


def _negatives_config(negatives: Mapping, inputs: dict) -> dict:
    systems = negatives.get("systems")
    if systems != "all":
        if isinstance(systems, str) or systems is None or not len(systems):
            raise ConfigError(f"negatives.systems must be a list of system names or 'all', got {systems!r}")
        systems = [str(s) for s in systems]
    k, margin = negatives.get("num_per_system"), negatives.get("ce_score_margin")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"negatives.num_per_system must be a positive integer, got {k!r}")
    if margin is not None:
        margin = float(margin)
        if inputs["teacher_scores"] is None:
            raise ConfigError("negatives.ce_score_margin needs teacher scores: set data.teacher_scores (or "
                              "negatives.ce_score_margin=null)")
    return {"systems": systems, "num_per_system": k, "ce_score_margin": margin,
            "require_positive": bool(negatives.get("require_positive", True))}


def prepare(source, negatives: Mapping, out_dir, force: bool = False) -> Path:
    """Convert what `source` (a data.sources.Source) streams into a store at `out_dir`, with hard negatives chosen
    by `negatives`. An existing store made from the same settings is reused; a different one is replaced only with
    force=True."""
    inputs = source.store_inputs()
    neg = _negatives_config(negatives, inputs)
    out_dir = Path(out_dir).absolute()
    manifest = out_dir / "manifest.json"
    if manifest.is_file() and not force:
        old = json.loads(manifest.read_text())
        if old.get("inputs") == inputs and old.get("negatives") == neg and old.get("format_version") == FORMAT_VERSION:
            return out_dir
        raise ExistingFileError(f"{out_dir} holds a store made from other settings; pass force=True to replace it "
                                "(task=prepare task.force=true) or choose another folder (paths.cache_dir)")
    if out_dir.exists() and not manifest.is_file() and any(out_dir.iterdir()) and not force:
        raise ExistingFileError(f"{out_dir} exists and is not a data store; pass force=True to replace it "
                                "(task=prepare task.force=true) or choose another folder (paths.cache_dir)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a prepare that was killed
        if not process_alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.time()
        info = _build(source, inputs, neg, tmp)
        info.update(format_version=FORMAT_VERSION, inputs=inputs, negatives=neg,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - start, 1))
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():  # keep the old folder until the new one is in place
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True



def _build(src, inputs: dict, neg: dict, out: Path) -> dict:
    """Write the store's files into `out`, one function per step; return the manifest's counts."""
    dropped, seconds, clock = Counter(), {}, [time.time()]

    def step(name):  # seconds spent per step, for the manifest
        seconds[name], clock[0] = round(time.time() - clock[0], 1), time.time()

    qrels_pos, train_qids = _positives(src)
    step("qrels")
    cands = _candidates(src, neg, qrels_pos, train_qids, inputs["hard_negatives"], out / "candidates.tmp",
                        dropped)
    step("hard_negatives")
    num_passages, num_queries, queries, has_text = _texts(src, out, dropped)
    step("texts")
    teacher = _margin_teacher(src, cands, neg["ce_score_margin"], inputs["teacher_scores"])
    step("teacher_scores")
    kept_qids, pos_lists, neg_lists, per_system = _select(cands, queries, has_text, teacher, neg, dropped)
    step("selection")
    train = _training_lists(src, kept_qids, pos_lists, neg_lists, teacher, inputs["teacher_scores"], out)
    step("training_lists")

    unresolved = {r: dropped[r] for r in ("query_without_text", "positive_without_text", "negative_without_text")
                  if dropped[r]}
    if unresolved:
        warnings.warn(f"ids without text were dropped: {unresolved} (see manifest.json 'dropped')", stacklevel=3)
    return {
        "num_passages": num_passages, "num_queries": num_queries, "num_train_queries": len(train["qids"]),
        "num_positives": len(train["pos_pids"]), "num_negatives": len(train["neg_pids"]),
        "negatives_per_system": {s: per_system[s] for s in cands.systems},
        "num_teacher_scores": int(sum((~np.isnan(train[s])).sum() for s in ("pos_scores", "neg_scores"))),
        "systems_in_file": cands.systems_in_file,
        "dropped": dict(sorted((r, c) for r, c in dropped.items() if c)),
        "seconds_per_step": seconds,
    }


def _positives(src) -> tuple[dict[int, list[int]], set[int] | None]:
    """Step 1: each query's positives (qrels, grade >= 1) and the optional restriction of training queries."""
    qrels_pos: dict[int, list[int]] = {}
    for qid, pid, grade in _progress(src.train_qrels(), "train qrels"):
        if grade >= 1 and pid not in qrels_pos.setdefault(qid, []):
            qrels_pos[qid].append(pid)
    return qrels_pos, src.train_qids()


@dataclass
class _Candidates:
    """Step 2's output: a flat int64 file of pids and the row and segment indexes that cut it up."""
    path: Path
    row_qid: np.ndarray         # row r (a kept query): its qid; its block is flat[row_pos[r]:row_pos[r + 1]]
    row_pos: np.ndarray         # whose first row_npos[r] pids are positives, its candidate lists the segments
    row_npos: array             # row_seg[r]:row_seg[r + 1] (array('q'), as built: fast per-query indexing)
    row_seg: array
    seg_sys: array              # segment s: its system's index in the file, start in the flat file, length
    seg_start: array
    seg_len: array
    systems_in_file: list[str]  # every system the file names, in order of first appearance (= its index)
    systems: list[str]          # the chosen ones, in selection order
    rank: dict[int, int]        # file index -> position in `systems`

    def flat(self) -> np.ndarray:
        return np.memmap(self.path, np.int64, "r") if self.row_pos[-1] else np.empty(0, np.int64)


def _candidates(src, neg: dict, qrels_pos: dict, train_qids, file_name, path: Path,
                dropped: Counter) -> _Candidates:
    """Step 2: one pass over the hard negatives: each kept query's positives and lists, flat in `path`."""
    systems_seen: dict[str, int] = {}
    wanted = None if neg["systems"] == "all" else set(neg["systems"])
    row_qid, row_pos, row_npos, row_seg = array("q"), array("q"), array("q"), array("q")
    seg_sys, seg_start, seg_len = array("q"), array("q"), array("q")
    seen_qids, n = set(), 0
    with open(path, "wb", buffering=1 << 22) as f:
        for qid, pos, lists in _progress(src.hard_negatives(dropped), "hard negatives"):
            for name in lists:
                systems_seen.setdefault(name, len(systems_seen))
            if qid in seen_qids:
                dropped["duplicate_hard_negatives_qid"] += 1
                continue
            seen_qids.add(qid)
            if train_qids is not None and qid not in train_qids:
                dropped["query_not_in_train_queries"] += 1
                continue
            flat = list(qrels_pos.get(qid, ()))
            flat += [p for p in dict.fromkeys(pos) if p not in flat]
            if not flat and neg["require_positive"]:
                dropped["query_without_positive"] += 1
                continue
            row_qid.append(qid), row_pos.append(n), row_npos.append(len(flat)), row_seg.append(len(seg_sys))
            for name, pids in lists.items():
                if wanted is None or name in wanted:
                    seg_sys.append(systems_seen[name]), seg_start.append(n + len(flat)), seg_len.append(len(pids))
                    flat += pids
            f.write(np.asarray(flat, np.int64).tobytes())
            n += len(flat)
    row_pos.append(n), row_seg.append(len(seg_sys))
    dropped["query_not_in_hard_negatives"] += len(set(qrels_pos) - seen_qids)
    if wanted is not None and wanted - set(systems_seen):
        raise ConfigError(f"negatives.systems: unknown system(s) {sorted(wanted - set(systems_seen))}; "
                          f"{file_name} has: {list(systems_seen)}. Pick from those, or (a BEIR folder) rerun task=mine "
                          "with task.systems listing it: `model` is the model= bi-encoder, named by its backbone")
    systems = list(systems_seen) if wanted is None else neg["systems"]
    return _Candidates(path, np.frombuffer(row_qid, np.int64), np.frombuffer(row_pos, np.int64), row_npos,
                       row_seg, seg_sys, seg_start, seg_len, list(systems_seen), systems,
                       {systems_seen[s]: r for r, s in enumerate(systems)})


def _texts(src, out: Path, dropped: Counter) -> tuple[int, int, TextTable, Callable]:
    """Step 3: the passages and queries text tables; their sizes, the queries and a has-passage-text test."""
    num_passages = write_text_table(_progress(src.passages(), "collection"), out, "passages", dropped)
    num_queries = write_text_table(_progress(src.queries(), "queries"), out, "queries", dropped)
    return num_passages, num_queries, TextTable(out, "queries"), _membership(TextTable(out, "passages").ids)


def _margin_teacher(src, cands: _Candidates, margin: float | None, teacher_file) -> TeacherScores | None:
    """Step 4: with a margin, the teacher scores its filter needs; without, None (step 6 streams fewer)."""
    if margin is None:  # step 6 streams the selected pairs' scores only
        return None
    # compact sorted arrays of the candidate pairs' scores, unless listing them costs more (all 13 systems)
    pairs = np.unique(_pair_keys(np.repeat(cands.row_qid, np.diff(cands.row_pos)), cands.flat())) \
        if cands.row_pos[-1] <= 50_000_000 else None
    return TeacherScores(src.teacher_score_chunks(), np.unique(cands.row_qid), pairs, Path(teacher_file).name)


def _select(cands: _Candidates, queries: TextTable, has_text, teacher: TeacherScores | None, neg: dict,
            dropped: Counter) -> tuple[list[int], list[np.ndarray], list[np.ndarray], Counter]:
    """Step 5: the kept queries, their positives and negatives, the count per system; deletes the file."""
    # Query by query, exactly as sentence-transformers' MNRL recipe (data/negatives.py): systems in order,
    # each list best-first, skipping positives and margin failures, up to k new pids per system. Skips are
    # counted for the candidates the walk visited.
    k, margin = neg["num_per_system"], neg["ce_score_margin"]
    row_qid, row_pos, row_npos, row_seg = cands.row_qid, cands.row_pos, cands.row_npos, cands.row_seg
    seg_sys, seg_start, seg_len = cands.seg_sys, cands.seg_start, cands.seg_len
    systems, rank = cands.systems, cands.rank
    cand = cands.flat()
    per_system, skips = Counter(), np.zeros(len(SKIP_REASONS) + 1, np.int64)
    kept_qids, pos_lists, neg_lists = [], [], []
    for r in _progress(range(len(row_qid)), "selecting negatives", "queries"):
        qid = int(row_qid[r])
        if qid not in queries:
            dropped["query_without_text"] += 1
            continue
        block = np.asarray(cand[row_pos[r]:row_pos[r + 1]])  # positives, then one list per chosen system
        npos, text = row_npos[r], has_text(block)
        dropped["positive_without_text"] += int(npos - text[:npos].sum())
        positives = block[:npos][text[:npos]]
        if not len(positives) and neg["require_positive"]:
            dropped["query_without_positive"] += 1
            continue
        skip = skip_reasons(block, npos, text, teacher.lookup(qid, block) if margin is not None else None, margin)
        segs = sorted(range(row_seg[r], row_seg[r + 1]), key=lambda s: rank[seg_sys[s]])
        bounds = [(seg_start[s] - row_pos[r], seg_start[s] - row_pos[r] + seg_len[s]) for s in segs]
        negs, counts, visited = take_negatives(block, skip, bounds, k)
        for s, added in zip(segs, counts):
            per_system[systems[rank[seg_sys[s]]]] += added
        skips += np.bincount(skip[visited], minlength=len(skips))
        if not negs:
            dropped["query_without_negative"] += 1
            continue
        kept_qids.append(qid)
        pos_lists.append(positives)
        neg_lists.append(np.asarray(negs, np.int64))
    dropped.update({reason: int(c) for reason, c in zip(SKIP_REASONS, skips[1:])})
    del cand
    cands.path.unlink()
    return kept_qids, pos_lists, neg_lists, per_system


def _training_lists(src, kept_qids: list[int], pos_lists: list, neg_lists: list,
                    teacher: TeacherScores | None, teacher_file, out: Path) -> dict[str, np.ndarray]:
    """Step 6: the training arrays (TRAIN_ARRAYS), teacher scores NaN where none, saved in `out`."""
    kept = np.asarray(kept_qids, np.int64)
    pos_offsets = np.concatenate([[0], np.cumsum([len(p) for p in pos_lists], dtype=np.int64)]).astype(np.int64)
    neg_offsets = np.concatenate([[0], np.cumsum([len(p) for p in neg_lists], dtype=np.int64)]).astype(np.int64)
    pos_pids = np.concatenate(pos_lists) if pos_lists else np.empty(0, np.int64)
    neg_pids = np.concatenate(neg_lists) if neg_lists else np.empty(0, np.int64)
    pos_scores = np.full(len(pos_pids), np.nan, np.float32)
    neg_scores = np.full(len(neg_pids), np.nan, np.float32)
    if teacher_file:
        pos_keys = _pair_keys(np.repeat(kept, np.diff(pos_offsets)), pos_pids)
        neg_keys = _pair_keys(np.repeat(kept, np.diff(neg_offsets)), neg_pids)
        if teacher is None:  # no margin: stream only the selected pairs' scores
            teacher = TeacherScores(src.teacher_score_chunks(), np.unique(kept),
                                    np.unique(np.concatenate([pos_keys, neg_keys])), Path(teacher_file).name)
        pos_scores, neg_scores = teacher.lookup_keys(pos_keys), teacher.lookup_keys(neg_keys)
    arrays = {"qids": kept, "pos_offsets": pos_offsets, "pos_pids": pos_pids, "pos_scores": pos_scores,
              "neg_offsets": neg_offsets, "neg_pids": neg_pids, "neg_scores": neg_scores}
    for name, a in arrays.items():
        np.save(out / f"train.{name}.npy", a)
    return arrays
