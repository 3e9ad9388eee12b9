"""SciFact end to end, project vs sentence-transformers' own path, side by side in one run (`make bench-scifact`).

Project: `task=mine` (bm25 + all-MiniLM-L6-v2), `experiment=beir_mnrl` (epochs chosen by the val split), the same
with its negatives re-mined by the model being trained every epoch (`negatives.refresh.every_n_epochs=1`), and
`task=evaluate task.mode=retrieve task.split=test`, each timed as a user runs it (a subprocess).
sentence-transformers: `encode` + exact search (zero-shot), `util.mine_hard_negatives` + MNRL, and in-batch-only
MNRL, trained with SentenceTransformerTrainer at the project's settings for 1 and 2 epochs and for the epochs the
project's val split chose, then scored with its own encode + exact search. Every metric: ir-measures on qrels/test.tsv.

    python -m benchmarks.scifact [--epochs 4] [--out benchmarks/scifact.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ST_PATHS = {"mined": "mine_hard_negatives + MNRL", "in_batch": "in-batch-only MNRL"}


def cli(args: list[str], log) -> float:
    start = time.time()
    tqdm = "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar"
    r = subprocess.run([sys.executable, "run.py", *args, "logger=none", tqdm], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if r.returncode:
        raise RuntimeError(f"python run.py {' '.join(args)} failed:\n{r.stderr[-4000:]}")
    log(f"  python run.py {' '.join(args)}: {time.time() - start:.0f} s")
    return time.time() - start


def st_test_metrics(st, folder, run_path: Path | None = None) -> dict:
    """sentence-transformers' own encode and similarity, full retrieval of the test queries (top 100, kept in
    run_path for a paired comparison)."""
    from marco_lightning.data.trec import write_run
    from marco_lightning.evaluation import compute_metrics

    qrels = folder.qrels("test")
    pids, texts = zip(*folder.corpus())
    sims = st.similarity(st.encode([folder.queries[q] for q in qrels], batch_size=64),
                         st.encode(list(texts), batch_size=64)).numpy()
    run = {q: {pids[i]: float(row[i]) for i in np.argsort(-row)[:100]} for q, row in zip(qrels, sims)}
    if run_path is not None:
        Path(run_path).parent.mkdir(parents=True, exist_ok=True)
        write_run(run, run_path, tag="sentence-transformers")
    return compute_metrics(qrels, run, rel_level=1, measures=("ndcg@10", "recall@100"))


def st_fine_tune(folder, epochs: int, mined: bool, out: Path, log) -> tuple[dict, dict]:
    """sentence-transformers' path: (mine_hard_negatives +) MNRL with SentenceTransformerTrainer. Returns the test
    metrics and the seconds to the trained model: total, of it mining and training. Its test run: out/run.trec."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from sentence_transformers.util import mine_hard_negatives

    from marco_lightning.models import resolve_backbone

    torch.manual_seed(42)
    start = time.time()
    st = SentenceTransformer(resolve_backbone(MINILM), device="cpu")
    corpus = dict(folder.corpus())
    # the same training queries as the project (val held out), the same positives (grade >= 1: Cranfield's grade-0
    # "no interest" judgements are not pairs to learn)
    train = {q: [p for p, grade in d.items() if grade >= 1] for q, d in folder.qrels("train").items()}
    data = Dataset.from_dict({"anchor": [folder.queries[q] for q, d in train.items() for _ in d],
                              "positive": [corpus[p] for d in train.values() for p in d]})
    mine_start = time.time()
    if mined:
        data = mine_hard_negatives(data, st, corpus=list(corpus.values()), num_negatives=1, batch_size=64,
                                   output_format="triplet", verbose=False)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=2e-5,
        warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", seed=42, logging_steps=10, dataloader_num_workers=0)
    train_start = time.time()
    SentenceTransformerTrainer(model=st, args=args, train_dataset=data,
                               loss=MultipleNegativesRankingLoss(st, scale=20.0)).train()
    end = time.time()
    seconds = {"total": end - start, "mine": train_start - mine_start, "train": end - train_start}
    log(f"  sentence-transformers {'mined' if mined else 'in-batch'} MNRL: {seconds['total']:.0f} s to a trained "
        f"model (mining {seconds['mine']:.0f} s, training {seconds['train']:.0f} s)")
    return st_test_metrics(st, folder, out / "run.trec"), seconds


def run(epochs: int, log=print, mined: str | None = None) -> dict:
    from sentence_transformers import SentenceTransformer

    from marco_lightning.data.beir import BeirFolder
    from marco_lightning.data.trec import read_run
    from marco_lightning.models import resolve_backbone
    from marco_lightning.significance import compare_runs

    folder = BeirFolder(SCIFACT)
    tmp = Path(tempfile.mkdtemp(prefix="scifact-"))
    mined_dir = Path(mined) if mined else tmp / "mined"
    data = ["data=beir", f"data.root={SCIFACT}", f"data.mined_dir={mined_dir}"]
    res: dict = {"epochs_max": epochs, "seconds": {}}
    if mined:  # an earlier task=mine of this benchmark: its stages' seconds from its manifest
        manifest = json.loads((mined_dir / "manifest.json").read_text())
        res["seconds"]["project_mine"] = sum(manifest["seconds"].values()) + sum(
            s["seconds"] for s in manifest["systems"].values())
        res["mine_reused"] = True
    else:
        log("project: task=mine")
        res["seconds"]["project_mine"] = cli(["task=mine", *data], log)
    dense = next((mined_dir / "cache").glob("dense-*"))

    def evaluate(name, *extra):
        out = tmp / f"eval-{name}"
        res["seconds"][f"project_eval_{name}"] = cli(["task=evaluate", *data, "task.split=test", *extra,
                                                      f"hydra.run.dir={out}"], log)
        return json.loads((out / "metrics.json").read_text())

    res["bm25"] = evaluate("bm25", "task.mode=score")
    res["zero_shot"] = evaluate("zero_shot", "task.mode=retrieve", f"task.index.dir={dense}")
    start = time.time()
    res["st_zero_shot"] = st_test_metrics(SentenceTransformer(resolve_backbone(MINILM), device="cpu"), folder)
    res["seconds"]["st_zero_shot"] = time.time() - start

    def train(name, *extra):  # experiment=beir_mnrl as a user runs it: its folder and metrics.json
        out = tmp / name
        res["seconds"][f"project_{name}"] = cli([*data, "experiment=beir_mnrl", f"trainer.max_epochs={epochs}", *extra,
                                                 f"hydra.run.dir={out}"], log)
        return out, json.loads((out / "metrics.json").read_text())

    log("project: experiment=beir_mnrl")
    train_dir, metrics = train("train")
    best = metrics["best_checkpoint"] or ""
    res["best_epoch"] = int(best.split("epoch")[1].split("-")[0]) + 1 if "epoch" in best else epochs
    res["project_val"] = {k: metrics[k] for k in ("before", "after")}
    res["project_split"] = metrics["seconds"]  # training, each validation pass
    res["fine_tuned"] = evaluate("fine_tuned", "task.mode=retrieve", f"task.model_path={train_dir / 'final_model'}")

    log("project: experiment=beir_mnrl negatives.refresh.every_n_epochs=1")  # the same, re-mined every epoch
    refresh_dir, metrics = train("train_refresh", "negatives.refresh.every_n_epochs=1")
    res["refresh_split"] = metrics["seconds"]
    res["refreshed"] = evaluate("refreshed", "task.mode=retrieve", f"task.model_path={refresh_dir / 'final_model'}")

    # sentence-transformers at 1 and 2 epochs and at the epochs the project's val split chose (the same budget)
    res["st"] = []
    for n in sorted({1, 2, res["best_epoch"]}):
        for kind, with_negatives in (("mined", True), ("in_batch", False)):
            test, seconds = st_fine_tune(folder, n, with_negatives, tmp / f"st-{kind}-{n}", log)
            res["st"].append({"kind": kind, "epochs": n, "test": test, "seconds": seconds,
                              "run": str(tmp / f"st-{kind}-{n}" / "run.trec")})
    # is the project's win over the best sentence-transformers row more than noise? paired, query by query
    best = max(res["st"], key=lambda r: r["test"]["ndcg@10"])
    res["vs_best_st"] = {"baseline": f"{best['kind']}@{best['epochs']}", **compare_runs(
        folder.qrels("test"), read_run(tmp / "eval-fine_tuned" / "run.trec"), read_run(best["run"]), rel_level=1,
        measures=("ndcg@10", "recall@100"))}
    return res


def markdown(res: dict) -> str:
    s = res["seconds"]
    rows = [("BM25 (bm25s, task=mine's run)", res["bm25"], ""),
            ("all-MiniLM-L6-v2 zero-shot, project `task=evaluate`", res["zero_shot"], ""),
            ("all-MiniLM-L6-v2 zero-shot, sentence-transformers encode + exact search", res["st_zero_shot"], ""),
            ((f"project: task=mine + experiment=beir_mnrl (best of {res['epochs_max']} epochs by val: "
              f"{res['best_epoch']})"), res["fine_tuned"],
             (f"{s['project_mine'] + s['project_train']:.0f} s (mine {s['project_mine']:.0f} + train "
              f"{s['project_train']:.0f})")),
            *([(f"project: the same with negatives.refresh.every_n_epochs=1 (up to {res['epochs_max']} epochs)",
                res["refreshed"], (f"{s['project_mine'] + s['project_train_refresh']:.0f} s (mine "
                                   f"{s['project_mine']:.0f} + train {s['project_train_refresh']:.0f}, of which "
                                   f"refresh {sum(res['refresh_split']['refresh']):.0f})"))]
              if "refreshed" in res else []),
            *[(f"sentence-transformers: {ST_PATHS[r['kind']]}, {r['epochs']} epoch(s)", r["test"],
               f"{r['seconds']['total']:.0f} s") for r in res["st"]]]
    lines = ["## SciFact: time to a trained model", "",
             ("SciFact test split (300 claims, 5,183 abstracts), nDCG@10 and recall@100 by ir-measures on "
              "qrels/test.tsv; training on qrels/train.tsv less the 10% the project holds out for validation "
              "(the sentence-transformers runs train on the same queries). `python -m benchmarks.scifact`."), "",
             "| model | nDCG@10 | recall@100 | time to the trained model |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {t} |" for name, m, t in rows]
    if "project_split" in res:  # where the time to a model goes (issue 22's item 6)
        split = res["project_split"]
        st = next(r["seconds"] for r in res["st"] if r["kind"] == "mined" and r["epochs"] == res["best_epoch"])
        val = sum(split["validation"])
        lines += ["", "| time (s) | project (beir_mnrl) | sentence-transformers (mined) |", "|---|---:|---:|",
                  (f"| mining (task=mine: bm25 + the model / mine_hard_negatives) | {s['project_mine']:.0f} | "
                   f"{st['mine']:.0f} |"),
                  (f"| training (project {split['epochs']} epoch(s), sentence-transformers {res['best_epoch']}) | "
                   f"{split['training']:.0f} | {st['train']:.0f} |"),
                  (f"| validation ({len(split['validation'])} pass(es) during the fit; share of training) | "
                   f"{val:.0f} ({(split['validation_share'] or 0):.1%}) | - |"),
                  f"| the whole command(s) | {s['project_mine'] + s['project_train']:.0f} | {st['total']:.0f} |"]
    if "vs_best_st" in res:
        c, base = res["vs_best_st"]["ndcg@10"], res["vs_best_st"]["baseline"]
        lines += ["", (f"The project against the best sentence-transformers row ({base}), query by query: nDCG@10 "
                       f"{c['delta']:+.4f}, better on {c['wins']} claims, worse on {c['losses']}, level on "
                       f"{c['ties']}; paired randomization test p = {c['p']:.4f} (marco_lightning.significance).")]
    lines += ["", (f"Evaluation of each model on the test split (encoding 5,183 abstracts): project "
                   f"{s['project_eval_fine_tuned']:.0f} s; the zero-shot project evaluation reuses task=mine's "
                   f"embeddings ({s['project_eval_zero_shot']:.0f} s), sentence-transformers' took "
                   f"{s['st_zero_shot']:.0f} s."), ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "scifact.json"))
    p.add_argument("--mined", default=None, help="reuse this task=mine output folder (its seconds are reported)")
    args = p.parse_args()
    res = run(args.epochs, mined=args.mined)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
