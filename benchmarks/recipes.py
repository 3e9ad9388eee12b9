"""Recipes for your own collection, measured side by side on several BEIR folders: sentence-transformers' two paths
(in-batch MNRL; mine_hard_negatives + MNRL) at 1 and 2 epochs against the project's recipe and its levers, each a
row, each timed. Every test number: ir-measures on the folder's qrels/test.tsv, by full retrieval.

Each cell is written to the JSON as soon as it is done, so a killed run continues where it stopped (--out); a cell is
kept by its key (folder/variant@epochs): after changing what a variant means, delete its cells.

    python -m benchmarks.recipes --folders /work/classic/cranfield,/work/classic/cisi [--variants a,b] [--out F]

`--compare CELL BASELINE` (keys of two finished cells of one folder) pairs their test runs query by query: the
difference, wins / ties / losses and a randomization test's p-value (marco_lightning.significance).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.scifact import cli, st_fine_tune, st_test_metrics

# project variants: name -> (mined-dir variant, training overrides). Mining variants: name -> task=mine overrides.
MINING = {"default": [], "own_rel05": ["task.systems=[model]", "task.relative_margin=0.05"]}
# training queries cut at 32 tokens, as every recipe was measured before session 10 (the BEIR experiments now train
# them up to max_seq_length, as evaluated)
Q32 = "model.max_query_length=32"
# the recipe shipped before 2026-12-06: every mined system's top-5 rotating, one row per query, val on the top 30
ROTATION = ["experiment=beir_mnrl", "train_rows=query", "negatives.systems=all", "negatives.num_per_system=5",
            "data.val_top_k=30", Q32]
VARIANTS = {
    # the shipped recipe: the model's own top-1 negative, a row per (query, positive), val on the top 10, queries
    # up to max_seq_length
    "beir_mnrl": ("default", ["experiment=beir_mnrl"]),
    "beir_mnrl_q32": ("default", ["experiment=beir_mnrl", Q32]),  # as shipped on 2026-12-06 before session 10
    "rotation": ("default", ROTATION),  # BM25 + dense top-5s rotating, one row a query
    "in_batch": ("default", [*ROTATION, "loss.num_hard_negatives=0"]),  # no hard negatives
    "pairs_in_batch": ("default", ["experiment=beir_mnrl", "loss.num_hard_negatives=0"]),  # sentence-transformers' in-batch
    "pairs_in_batch_q32": ("default", ["experiment=beir_mnrl", "loss.num_hard_negatives=0", Q32]),
    "rows_positive": ("default", [*ROTATION, "train_rows=positive"]),  # sentence-transformers' unit
    "guard": ("default", [*ROTATION, "train_rows=positive", "loss.guard_margin=0.0"]),  # GIST's rule
    # the model's own top-5 under NV-Retriever's rule; validation re-ranks that run (task=mine names it by the backbone)
    "own_rel05": ("own_rel05", [*ROTATION, "train_rows=positive", "data.val_system=all-MiniLM-L6-v2"]),
    # the shipped recipe as first measured (val on the top 30)
    "st_like": ("default", ["experiment=beir_mnrl", "data.val_top_k=30", Q32]),
    # re-mined by the model being trained before every epoch but the first: the recipe's rule (its own top-1), and
    # negatives.refresh's default rule (a random one of its top 5 under NV-Retriever's rule)
    "refresh": ("default", ["experiment=beir_mnrl", "negatives.refresh.every_n_epochs=1"]),
    "refresh_top5_rel05": ("default", ["experiment=beir_mnrl", "negatives.refresh.every_n_epochs=1",
                                       "negatives.refresh.depth=5", "negatives.refresh.relative_margin=0.05"]),
    # the shipped recipe's levers (README "Levers"): a fresh model on train + val for the epochs val chose; up to
    # @N epochs, stopped by val (patience 2); 4x the in-batch negatives at the same passes and memory (GradCache)
    "refit": ("default", ["experiment=beir_mnrl", "task.refit=true"]),
    "early_stop": ("default", ["experiment=beir_mnrl", "callbacks=early_stop"]),
    # warm-up over a tenth of one epoch (0.01 of the 10-epoch run) instead of the whole first epoch
    "warmup_tenth_epoch": ("default", ["experiment=beir_mnrl", "scheduler.warmup_steps=0.01"]),
    # candidates the qrels judge relevant to the row's query left out of its softmax (another query's positive or
    # hard negative; CISI: 3.5 of a row's 63 candidates), with and without the mined negative
    "judged": ("default", ["experiment=beir_mnrl", "loss.leave_out_judged=true"]),
    "judged_in_batch": ("default", ["experiment=beir_mnrl", "loss.leave_out_judged=true", "loss.num_hard_negatives=0"]),
    "gradcache128": ("default", ["experiment=beir_mnrl", "batch_size=128", "mini_batch_size=32"]),
    # one command: with and without the mined negative, chosen by the mean val over 3 folds of the training queries
    # (what experiment=beir_choose sets, spelled out as measured)
    "choose_folds3": ("default", ["experiment=beir_mnrl", "task.folds=3",
                                  "task.candidates={mined:[],in_batch:['loss.num_hard_negatives=0']}"]),
}


def project_cell(folder: Path, work: Path, mining: str, overrides: list[str], epochs: int, log) -> dict:
    mined_dir = work / f"mined-{mining}"
    data = ["data=beir", f"data.root={folder}", f"data.mined_dir={mined_dir}"]
    seconds = {}
    if not (mined_dir / "manifest.json").exists():
        seconds["mine"] = cli(["task=mine", *data, *MINING[mining]], log)
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="train-"))
    seconds["train"] = cli([*data, *overrides, f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}"], log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_dir = run_dir / "eval"
    seconds["evaluate"] = cli(["task=evaluate", *data, "task.mode=retrieve", "task.split=test",
                               f"task.model_path={run_dir / 'final_model'}", f"hydra.run.dir={eval_dir}"], log)
    chose = metrics.get("selection", metrics)  # task.refit: the run that chose the epochs has the val numbers
    return {"test": json.loads((eval_dir / "metrics.json").read_text()), "run": str(eval_dir / "run.trec"),
            "val": chose.get("after"),
            "val_before": chose.get("before"), "best": chose.get("best_checkpoint") or "", "seconds": seconds,
            "train_split": chose.get("seconds"),  # the run's own split: training, validation, refresh
            **{k: metrics[k] for k in ("candidates", "chosen", "final_model", "refit", "refresh") if k in metrics}}


def st_cell(folder: Path, work: Path, mined: bool, epochs: int, log) -> dict:
    from marco_lightning.data.beir import BeirFolder

    out = work / "st" / f"{'mined' if mined else 'in_batch'}@{epochs}"
    metrics, seconds = st_fine_tune(BeirFolder(folder), epochs, mined, out, log)
    return {"test": metrics, "run": str(out / "run.trec"), "seconds": seconds}


def run(folders: list[Path], variants: list[str], epochs: list[int], out: Path, log=print, st: bool = True) -> dict:
    res = json.loads(out.read_text()) if out.exists() else {}

    def cell(key: str, make, *args):
        if key not in res:
            log(f"{key} ...")
            start = time.time()
            res[key] = make(*args)
            res[key]["wall_s"] = round(time.time() - start, 1)
            out.write_text(json.dumps(res, indent=2))
        return res[key]

    for folder in folders:
        work = ROOT / "cache" / "recipes" / folder.name
        work.mkdir(parents=True, exist_ok=True)
        cell(f"{folder.name}/zero_shot", zero_shot, folder, work)
        for n in epochs:
            if st:
                cell(f"{folder.name}/st_in_batch@{n}", st_cell, folder, work, False, n, log)
                cell(f"{folder.name}/st_mined@{n}", st_cell, folder, work, True, n, log)
            for v in variants:
                cell(f"{folder.name}/{v}@{n}", project_cell, folder, work, *VARIANTS[v], n, log)
    return res


def zero_shot(folder: Path, work: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from marco_lightning.data.beir import BeirFolder
    from marco_lightning.models import resolve_backbone

    st = SentenceTransformer(resolve_backbone("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    run = work / "zero_shot" / "run.trec"
    return {"test": st_test_metrics(st, BeirFolder(folder), run), "run": str(run)}


def markdown(res: dict) -> str:
    folders = list(dict.fromkeys(k.split("/")[0] for k in res))
    rows = list(dict.fromkeys(k.split("/")[1] for k in res))
    lines = ["| recipe | " + " | ".join(folders) + " |", "|---|" + "---:|" * len(folders)]
    for r in rows:
        cells = []
        for f in folders:
            c = res.get(f"{f}/{r}")
            cells.append("-" if c is None else f"{c['test']['ndcg@10']:.4f} ({c.get('wall_s', 0) / 60:.0f} min)")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(res: dict, key: str, baseline: str, folders: list[Path]) -> str:
    from marco_lightning.data.beir import BeirFolder
    from marco_lightning.data.trec import read_run
    from marco_lightning.significance import compare_runs, format_comparison

    name = key.split("/")[0]
    folder = next((f for f in folders if f.name == name), None)
    if folder is None or baseline.split("/")[0] != name:
        raise SystemExit(f"--compare {key} {baseline}: two cells of one folder, named in --folders")
    for k in (key, baseline):
        if "run" not in res.get(k, {}):
            raise SystemExit(f"--compare: cell {k} is not in {sorted(res)} or kept no test run (made before runs were kept)")
    comparison = compare_runs(BeirFolder(folder).qrels("test"), read_run(res[key]["run"]),
                              read_run(res[baseline]["run"]), rel_level=1, measures=("ndcg@10", "recall@100"))
    return format_comparison(comparison, key, baseline)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", required=True, help="comma-separated BEIR folders")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", default="1,2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "recipes.json")
    p.add_argument("--no-st", dest="st", action="store_false",
                   help="project rows only (early_stop@10 without sentence-transformers at 10 epochs)")
    p.add_argument("--compare", nargs=2, metavar=("CELL", "BASELINE"),
                   help="two finished cells of one folder, e.g. cisi/judged_in_batch@10 cisi/st_in_batch@2")
    args = p.parse_args()
    if args.compare:
        print(compare(json.loads(args.out.read_text()), *args.compare, [Path(f) for f in args.folders.split(",")]))
        return
    res = run([Path(f) for f in args.folders.split(",")], args.variants.split(","),
              [int(e) for e in args.epochs.split(",")], args.out, st=args.st)
    print(markdown(res))


if __name__ == "__main__":
    main()
