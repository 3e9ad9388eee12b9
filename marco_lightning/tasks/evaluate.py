"""task=evaluate: score a run file, re-rank its top-k with a model, or retrieve from the whole collection.

Each mode writes `run.trec` and `metrics.json` into the run folder and prints a table. With task.baseline (another
run file, or the folder of an earlier evaluation) it also compares the two query by query (`comparison.json`: the
difference, wins / ties / losses and a paired randomization test's p-value):

    python run.py task=evaluate data=beir data.root=F task.mode=retrieve task.model_path=RUN/final_model \
        task.baseline=outputs/zero-shot-eval
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from marco_lightning.config import ConfigError, check_files, require_file
from marco_lightning.data.sources import build_source
from marco_lightning.data.texts import read_texts
from marco_lightning.data.trec import read_qrels, read_run, unranked, write_run
from marco_lightning.evaluation import compute_metrics, format_table, parse_measure
from marco_lightning.inference import check_precision, compile_model, device
from marco_lightning.models import load_model
from marco_lightning.retrieval import rerank, retrieve
from marco_lightning.significance import compare_runs, format_comparison

MODES = ("score", "rerank", "retrieve")


def main(cfg: DictConfig) -> dict:
    task, out = cfg.task, Path(cfg.paths.output_dir)
    if task.mode not in MODES:
        raise ConfigError(f"task.mode={task.mode!r}: use one of {', '.join(MODES)}")
    check_precision(task.precision)  # these settings fail before anything loads
    for measure in task.measures:
        parse_measure(measure)
    split = build_source(cfg.data).split(task.split)  # the data's judged queries; task.* files override its files
    run_path, queries, collection = task.run or split.run, task.queries or split.queries, \
        task.collection or split.collection
    if task.mode != "retrieve" and not run_path:
        raise ConfigError(f"task.mode={task.mode} needs task.run=PATH (a TREC run file)")
    if task.mode != "retrieve" and not Path(run_path).is_file():
        where = "task.run" if task.run else f"task.run (null: split {task.split or 'default'}'s run)"
        raise ConfigError(f"{where}: file not found: {run_path}" + split.hint)
    check_files(cfg, ["task.qrels"] if task.qrels else [])
    baseline = baseline_run(task.get("baseline"))  # read before a model loads: a wrong path fails first
    trials = task.get("randomization_trials")
    if baseline is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"task.randomization_trials={trials}: a number of sign flips >= 1 (10000 tells p to ~0.005)")
    for key, path in (("task.queries", queries), ("task.collection", collection)) if task.mode != "score" else ():
        require_file(key, path)
    qrels = read_qrels(task.qrels) if task.qrels else split.qrels()
    if task.mode == "score":
        run = read_run(run_path)
        lists = [docs for docs in run.values() if len(docs) > 1]
        if lists and all(unranked(docs) for docs in lists):
            raise ConfigError(f"task.run={run_path} ranks no candidate above another (a top-1000 candidate file?): "
                              "scoring it would measure docid order; re-rank it (task.mode=rerank) or pass a scored run")
    else:
        model = load_model(cfg.model, task.model_path).to(device(task.device)).eval()
        if task.compile:
            compile_model(model)
        queries = read_texts(queries)
        if task.mode == "rerank":
            run = rerank(model, read_run(run_path), queries, collection, task.top_k, task.batch_size,
                         task.precision)
        else:
            run = retrieve(model, collection, {q: queries[q] for q in qrels if q in queries}, top_k=task.top_k,
                           index_dir=task.index.dir or out / "index", index_factory=task.index.factory,
                           batch_size=task.batch_size, precision=task.precision)
    metrics = compute_metrics(qrels, run, rel_level=task.rel_level, measures=tuple(task.measures))
    write_run(run, out / "run.trec", tag=f"marco-lightning-{task.mode}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table({task.name or task.mode: metrics}))
    if baseline is not None:
        comparison = compare_runs(qrels, run, baseline, task.rel_level, tuple(task.measures),
                                  trials=trials)
        (out / "comparison.json").write_text(json.dumps({"baseline": str(task.baseline), **comparison}, indent=2))
        print(format_comparison(comparison, task.name or task.mode, "baseline"))
    print(f"Run folder: {out}  (run.trec, metrics.json{', comparison.json' if baseline is not None else ''})")
    return metrics


def baseline_run(path) -> dict | None:
    """task.baseline: a TREC run file, or a run folder holding one (run.trec: an earlier task=evaluate's)."""
    if path is None:
        return None
    file = Path(path) / "run.trec" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"task.baseline={path}: " + ("no run.trec in that folder" if Path(path).is_dir() else
                          "file not found") + "; give a TREC run file or the folder of an earlier task=evaluate")
    return read_run(file)
