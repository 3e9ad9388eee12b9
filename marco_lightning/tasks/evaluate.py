"""task=evaluate: score a run file, re-rank its top-k with a model, or retrieve from the whole collection.

Each mode writes `run.trec` and `metrics.json` into the run folder and prints a table.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from marco_lightning.config import ConfigError, check_files
from marco_lightning.data.sources import build_source
from marco_lightning.data.texts import read_texts
from marco_lightning.inference import compile_model

MODES = ("score", "rerank", "retrieve")


def main(cfg: DictConfig) -> dict:
    from marco_lightning.data.trec import read_qrels, read_run, unranked, write_run
    from marco_lightning.evaluation import compute_metrics, format_table

    task, out = cfg.task, Path(cfg.paths.output_dir)
    if task.mode not in MODES:
        raise ConfigError(f"task.mode={task.mode!r}: use one of {', '.join(MODES)}")
    split = build_source(cfg.data).split(task.split)  # the data's judged queries; task.* files override its files
    run_path, queries, collection = task.run or split.run, task.queries or split.queries, \
        task.collection or split.collection
    if task.mode != "retrieve" and not run_path:
        raise ConfigError(f"task.mode={task.mode} needs task.run=PATH (a TREC run file)")
    if task.mode != "retrieve" and not Path(run_path).is_file():
        raise ConfigError(f"task.run: file not found: {run_path}" + split.hint)
    check_files(cfg, ["task.qrels"] if task.qrels else [])
    for key, path in (("task.queries", queries), ("task.collection", collection)) if task.mode != "score" else ():
        if not Path(path).exists():
            raise ConfigError(f"{key}: file not found: {path}\n  Fix the path (override {key}=...) or set "
                              "data.root=DIR to the folder holding the files.")
    qrels = read_qrels(task.qrels) if task.qrels else split.qrels()
    if task.mode == "score":
        run = read_run(run_path)
        lists = [docs for docs in run.values() if len(docs) > 1]
        if lists and all(unranked(docs) for docs in lists):
            raise ConfigError(f"task.run={run_path} ranks no candidate above another (a top-1000 candidate file?): "
                              "scoring it would measure docid order; re-rank it (task.mode=rerank) or pass a scored run")
    else:
        model = load_model(cfg).to(device(task.device)).eval()
        if task.compile:
            compile_model(model)
        queries = read_texts(queries)
        if task.mode == "rerank":
            run = rerank(model, read_run(run_path), queries, collection, task.top_k, task.batch_size,
                         task.precision)
        else:
            from marco_lightning.retrieval import retrieve

            run = retrieve(model, collection, {q: queries[q] for q in qrels if q in queries}, top_k=task.top_k,
                           index_dir=task.index.dir or out / "index", index_factory=task.index.factory,
                           batch_size=task.batch_size, precision=task.precision)
    metrics = compute_metrics(qrels, run, rel_level=task.rel_level, measures=tuple(task.measures))
    write_run(run, out / "run.trec", tag=f"marco-lightning-{task.mode}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table({task.name or task.mode: metrics}))
    print(f"Run folder: {out}  (run.trec, metrics.json)")
    return metrics


def device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def load_model(cfg: DictConfig):
    """task.model_path: an exported final_model/ folder or a Lightning .ckpt; none: build `model=` from config."""
    from hydra.utils import instantiate

    from marco_lightning.models import from_exported, load_checkpoint_weights

    path = cfg.task.model_path
    if path and Path(path).is_dir():
        return from_exported(path)
    if not path:
        return instantiate(cfg.model)
    import torch

    # the similarity it was trained with (Normalize has no weights: the state dict alone cannot tell)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    trained = {"similarity": ckpt.get("similarity"), "max_doc_length": ckpt.get("max_seq_length")}
    model = instantiate(cfg.model, **{k: v for k, v in trained.items() if v and k in cfg.model})
    return load_checkpoint_weights(model, path)


def rerank(model, run, queries, collection, top_k: int, batch_size: int,
           precision: str = "auto") -> dict[str, dict[str, float]]:
    from marco_lightning.data.trec import top_candidates
    from marco_lightning.inference import score

    rows = [(qid, pid) for qid, docs in run.items() if qid in queries
            for pid in top_candidates(qid, docs, top_k, key="task.top_k")]
    passages = read_texts(collection, keep={pid for _, pid in rows})  # streams the collection, keeps what is needed
    missing = sorted({pid for _, pid in rows if pid not in passages})
    if missing:
        raise ValueError(f"{len(missing)} run passages have no text in {collection} (e.g. {missing[:3]})")
    scores = score(model, [queries[q] for q, _ in rows], [passages[p] for _, p in rows], batch_size, "re-ranking",
                   precision)
    out: dict[str, dict[str, float]] = {}
    for (q, p), s in zip(rows, scores.tolist()):
        out.setdefault(q, {})[p] = s
    return out
