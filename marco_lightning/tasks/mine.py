"""task=mine: for a BEIR folder, ranked candidates of every split's queries from each system, and the training
queries' hard negatives in the layout of msmarco-hard-negatives.jsonl.gz.

Writes under data.mined_dir: runs/<split>.<system>.trec, hard-negatives.jsonl.gz, hard-negatives.val.jsonl.gz (the
val queries', by the same rule: what task.refit trains on), manifest.json (settings, what the margins skipped,
what the folder holds that was left out: documents and queries without text, judgements naming them or unknown
ids, per split file; seconds per stage). Encodings, the BM25 index and each system's finished runs are kept in
cache/ and runs/, so a killed run resumes where it stopped and a rerun with new selection settings searches
nothing again.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from marco_lightning.config import ConfigError, system_name
from marco_lightning.data.beir import SPLITS
from marco_lightning.data.sources import build_source
from marco_lightning.data.trec import read_run, write_run
from marco_lightning.evaluation import compute_metrics
from marco_lightning.inference import check_precision, device
from marco_lightning.mining import candidate_depth, select_negatives

# What task=mine hands a system's _target_ when its signature names it (a node in YAML stays short):
SETTINGS = ("collection",  # data.collection (BEIR: corpus.jsonl)
            "cache_dir",   # data.mined_dir/cache/<name>: a folder of the system's own
            "cache_root",  # data.mined_dir/cache: shared (Dense keeps encodings by weights there, whatever the name)
            "batch_size", "device", "precision", "compile")  # task.*; device resolved (auto: cuda when available)
SPELLINGS = ("bm25, model (the model= bi-encoder), a sentence-transformers folder or hub id, or a node "
             "{_target_: CLASS, name: NAME, ...} whose class has search(queries, k) and pair_scores(qid, query, rows) "
             "(marco_lightning.mining.Searcher)")
DENSE = "marco_lightning.mining.dense"
VAL_NEGATIVES = "hard-negatives.val.jsonl.gz"  # the val queries' (conf/data/beir.yaml data.val_hard_negatives)


def system_node(entry, cfg: DictConfig) -> dict:
    """One entry of task.systems as the node that builds it, its `name` filled in: the system's key in
    hard-negatives.jsonl.gz and in runs/<split>.<name>.trec. The short spellings: `bm25` -> mining.BM25 (name bm25);
    `model` -> mining.dense over the model= bi-encoder, any other string -> mining.dense over that folder or hub id
    (named by the folder or hub name). A node (a mapping with `_target_`) is taken as given; without a `name` it is
    named by its `model` (a folder, hub id or model node's backbone) if it has one, else by its _target_'s last
    part, lower-cased (mining.BM25: bm25)."""
    if isinstance(entry, str):
        if entry == "bm25":
            return {"_target_": "marco_lightning.mining.BM25", "name": "bm25"}
        if entry == "model":
            if get_class(cfg.model._target_).kind != "bi":
                raise ConfigError(f"task.systems: 'model' mines with the model= bi-encoder, but {cfg.model._target_} "
                                  "is a cross-encoder; list a bi-encoder path or hub id instead")
            return {"_target_": DENSE, "model": OmegaConf.to_container(cfg.model, resolve=True),
                    "name": system_name(cfg.model.backbone)}
        return {"_target_": DENSE, "model": entry, "name": system_name(entry)}
    node = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else entry
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise ConfigError(f"task.systems: {node!r} is neither a name nor a node with a _target_; an entry is "
                          f"{SPELLINGS}")
    node = dict(node)
    if node.get("name") is None:
        model = node.get("model")
        node["name"] = (system_name(model.get("backbone", "model") if isinstance(model, dict) else model)
                        if model is not None else node["_target_"].rsplit(".", 1)[-1].lower())
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(node["name"])):
        raise ConfigError(f"task.systems: name {node['name']!r} ({node['_target_']}): a system's name is part of "
                          "file names (runs/<split>.<name>.trec): letters, digits, '.', '_' and '-' only")
    node["name"] = str(node["name"])
    return node


def _settings_taken(node: dict) -> list[str]:
    """The SETTINGS the node's target takes and the node does not set; or a ConfigError naming task.systems: a
    _target_ that cannot be imported, a class without search / pair_scores, options its signature lacks."""
    where = f"task.systems: {node['name']} (_target_ {node['_target_']})"
    try:
        target = get_method(node["_target_"])
    except (ImportError, ValueError) as e:  # hydra's message names the module or attribute it missed
        raise ConfigError(f"{where} cannot be imported: {e}\n  An entry is {SPELLINGS}") from None
    if inspect.isclass(target):
        _check_methods(target, where)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it what the node says
        return []
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    given = [k for k in node if not k.startswith("_") and k != "name"]
    offered = [k for k in SETTINGS if (takes_any or k in params) and k not in given]
    if "_args_" not in node:
        try:
            inspect.signature(target).bind(**dict.fromkeys(given + offered))
        except TypeError as e:
            raise ConfigError(f"{where}: {e}; it takes: {', '.join(params)} (task=mine passes those of "
                              f"{', '.join(SETTINGS)} it names, the node the others)") from None
    return offered


def _check_methods(obj, where: str) -> None:
    missing = [m for m in ("search", "pair_scores") if not callable(getattr(obj, m, None))]
    if missing:
        what = obj.__qualname__ if isinstance(obj, type) else f"what it builds ({type(obj).__qualname__})"
        raise ConfigError(f"{where}: {what} has no {' or '.join(missing)}; a negative source has search(queries, k) "
                          "and pair_scores(qid, query, rows) (marco_lightning.mining.Searcher)")


def build_system(node: dict, cfg: DictConfig, cache: Path):
    """The Searcher of one system_node: hydra's instantiate of the node (nested `_target_` nodes, the model=
    bi-encoder among them, built too), given the SETTINGS its target names."""
    node = dict(node)
    name = node.pop("name")
    offered = _settings_taken({**node, "name": name})
    settings = {"collection": cfg.data.collection, "cache_dir": Path(cache) / name, "cache_root": Path(cache),
                "batch_size": int(cfg.task.batch_size), "device": device(cfg.task.device),
                "precision": cfg.task.precision, "compile": bool(cfg.task.compile)}
    if "cache_dir" in offered:
        settings["cache_dir"].mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # a random_init model (the tests') is the same model on every run
    system = instantiate(node, **{k: settings[k] for k in offered})
    _check_methods(system, f"task.systems: {name} (_target_ {node['_target_']})")
    return system


def load_system(entry, cfg: DictConfig, cache: Path):
    """The Searcher an entry of task.systems names (README "Your own collection")."""
    return build_system(system_node(entry, cfg), cfg, cache)


def main(cfg: DictConfig) -> dict:
    folder = build_source(cfg.data).mining_folder("mine")  # a BEIR folder (MS MARCO's negatives are published)
    if folder.val_fold:  # every fold trains on what fold 0's mining wrote (task.folds): one set of files
        raise ConfigError(f"data.val_fold={folder.val_fold}: task=mine mines the training queries once, for every "
                          "fold (the val split's negatives and run are fold 0's): drop data.val_fold")
    task = cfg.task
    lo, hi = (list(task.range) + [None, None])[:2]
    lo = int(lo or 0)
    margins = task.relative_margin is not None or task.absolute_margin is not None
    if int(task.depth) < 1 or lo < 0 or (hi is not None and int(hi) <= lo):
        raise ConfigError(f"task.depth={task.depth}, task.range=[{lo}, {hi}]: need depth >= 1 and "
                          "0 <= range_min < range_max")
    check_precision(task.precision)
    names = {}  # name -> (the entry as given: runs are reused for the same entry, node)
    for entry in task.systems:
        node = system_node(entry, cfg)
        if node["name"] in names:
            raise ConfigError(f"task.systems={list(task.systems)}: two entries share the name {node['name']!r} "
                              "(give one a `name:`)")
        _settings_taken(node)  # a wrong _target_ or option fails now, before any reading or encoding
        names[node["name"]] = (entry if isinstance(entry, str) else node, node)

    clock, seconds = time.time(), {}
    qrels = {s: folder.qrels(s) for s in SPLITS if s != "test" or folder.has_split_file(folder.split_names["test"])}
    queries = {q: folder.queries[q] for split in qrels.values() for q in split}
    rows = folder.pid_rows  # checks the corpus: duplicate ids fail here, documents without text are left out
    seconds["read"] = round(time.time() - clock, 1)
    max_pos = max(len(d) for split in qrels.values() for d in split.values())
    depth = max(candidate_depth(task.depth, lo, hi, margins, max_pos), int(task.run_depth))

    out = Path(cfg.data.mined_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    runs, scorers, summary = {}, {}, {}
    for name, (entry, node) in names.items():
        clock = time.time()
        system = build_system(node, cfg, cache)
        # a system's runs are reused when made by this system (its cache key: weights, collection) at this depth
        stamp = {"system": entry, "meta": _cache_key(system), "depth": depth,
                 "queries": hashlib.sha1(json.dumps([sorted(queries.items()), {s: sorted(qrels[s]) for s in qrels}])
                                         .encode()).hexdigest()}  # which query is in which split, too
        stamp_path = out / "runs" / f"{name}.json"
        files = {s: out / "runs" / f"{s}.{name}.trec" for s in qrels}
        if stamp["meta"] is not None and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(
                p.exists() for p in files.values()):
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

    # hard negatives of the training queries, each system's own scores deciding its margins; the val queries' too,
    # by the same rule, in their own file: only task.refit trains on them (data.val_hard_negatives)
    clock = time.time()
    pool = candidate_depth(int(task.depth), lo, hi, margins, max_pos)  # mine_hard_negatives' candidates

    def write_negatives(path: Path, judged_queries: dict):
        """Select and write the negatives of `judged_queries` (qid -> judgements); (counts, skipped, short)."""
        skipped, short, counts = {n: Counter() for n in names}, Counter(), Counter()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                io.TextIOWrapper(gz, encoding="utf-8") as f:  # mtime 0: the same negatives give the same bytes
            for qid, judged in judged_queries.items():
                pos = [p for p, grade in judged.items() if grade >= 1]
                if not pos:
                    continue
                neg = {}
                for name in names:
                    ids, scores = runs[name].get(qid, ([], []))  # a query no BM25 term matches has no candidates
                    ids, scores = ids[:pool], scores[:pool]
                    pos_scores = positive_scores(scorers[name], qid, queries[qid], pos, ids, scores, rows) \
                        if margins else []
                    neg[name] = select_negatives(ids, scores, pos, pos_scores, int(task.depth), lo, hi,
                                                 task.absolute_margin, task.relative_margin, skipped[name])
                    counts[name] += len(neg[name])
                    short[name] += len(neg[name]) < task.depth
                f.write(json.dumps({"qid": qid, "pos": pos, "neg": neg}) + "\n")
        if path.exists() and path.read_bytes() == tmp.read_bytes():
            tmp.unlink()  # unchanged: keep the file (and the teacher scores made for it) as they are
        else:
            tmp.replace(path)
        return counts, skipped, short

    path = out / "hard-negatives.jsonl.gz"
    counts, skipped, short = write_negatives(path, qrels["train"])
    val_counts, _, _ = write_negatives(out / VAL_NEGATIVES, qrels["val"])
    seconds["select"] = round(time.time() - clock, 1)

    manifest = {
        "root": str(folder.root.resolve()), "splits": {s: {"queries": len(qrels[s]), "source": folder.describe_split(s)}
                                                       for s in qrels},
        "queries_without_judgements": len(set(folder.queries) - set(queries)),  # in no split: not mined
        "left_out": folder.left_out(),  # documents and queries without text; judgements dropped, per split file
        "systems": summary,
        "selection": {"depth": int(task.depth), "range": [lo, hi], "relative_margin": task.relative_margin,
                      "absolute_margin": task.absolute_margin, "candidates_per_query": depth},
        "negatives": dict(counts), "skipped": {n: dict(c) for n, c in skipped.items()},
        "queries_short_of_depth": dict(short), "val_negatives": dict(val_counts), "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"Mined: {path} ({len(qrels['train'])} training queries; negatives per system {dict(counts)}; "
          f"margin skips {manifest['skipped']})\nRuns: {out / 'runs'}")
    return manifest


def _cache_key(system):
    """The system's cache_dir/meta.json (mining.Searcher), or None: nothing says its runs are still valid."""
    meta = Path(system.cache_dir) / "meta.json" if getattr(system, "cache_dir", None) else None
    return json.loads(meta.read_text()) if meta is not None and meta.is_file() else None


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
