"""`make bench-data`: the data pipeline at MS MARCO scale, on synthetic files in the exact real formats.

    python -m benchmarks.data_pipeline                   # the full real shape (8.8M passages, 160M scores), ~16 min
    python -m benchmarks.data_pipeline --scale 0.3       # a fraction of it, extrapolated to the full shape
    python -m benchmarks.data_pipeline --scale 0.001 --mnrl-scale 0.001 --small-scale 0.001 --out /tmp/B.md

Each measurement runs in its own child process (one's memory never counts toward another's), one at a time:
1. the files (benchmarks/synthetic_msmarco.py) at --scale, then `prepare` with negatives=bm25 (the MarginMSE
   default): seconds, peak RSS (os.wait4), the store's size on disk;
2. the training data pipeline on that store: open time, then TrainDataset + the project's Collator (the real
   MiniLM tokenizer) through a DataLoader with 2 workers, batch 64, one positive and one negative per query with
   teacher scores (MarginMSE): samples/s, and the memory of the training process and of its workers;
3. `prepare` with negatives=mnrl_recipe (13 systems, a teacher-score margin: the heaviest selection) on files at
   --mnrl-scale (above 0.16 it takes the code path of the full scale: more than 50M candidate pairs);
4. the baseline, as sentence-transformers' MS MARCO scripts do it, at --small-scale (it has to fit in RAM): the
   score pickle through pickle.load (numpy.float32 values, and Python floats for comparison) and collection.tsv
   into a dict.
Figures measured below scale 1 are extrapolated linearly with the measured per-item costs, and labelled so.
The synthetic files and stores are deleted as soon as they are no longer needed (--keep keeps them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import children, smaps

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Data pipeline"
BYTES_PER_SCALE = 10.5e9   # at scale 1: collection 3.4 GB + hard negatives 1.6 GB + scores 1.4 GB + store 3.5 GB
# A MarginMSE epoch of 500k queries took under an hour on a V100 (sentence-transformers'
# examples/training/ms_marco/README.md, MarginMSE): the step consumes this many.
V100_SAMPLES_PER_S = 500_000 / 3600
TARGET_FACTOR = 10
# The largest scale whose generation + prepare takes about 15 minutes on a 2-core machine: the full one took
# 11 minutes here (shared, load ~4) and 21 under heavier load (~6); pass a fraction on a slower machine.
DEFAULT_SCALE = 1.0
BATCH = 64
NEGATIVES = {"bm25": {"systems": ["bm25"], "num_per_system": 5, "ce_score_margin": None, "require_positive": True},
             "mnrl_recipe": {"systems": "all", "num_per_system": 5, "ce_score_margin": 3.0,
                             "require_positive": True}}


def _data(folder: Path) -> dict:
    return {"collection": str(folder / "collection.tsv"), "queries": [str(folder / "queries.train.tsv")],
            "train_queries": str(folder / "queries.train.tsv"), "train_qrels": str(folder / "qrels.train.tsv"),
            "hard_negatives": str(folder / "msmarco-hard-negatives.jsonl.gz"),
            "teacher_scores": str(folder / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")}


# --- child processes --------------------------------------------------------------------------------------

def _memory(pid="self") -> dict:
    """MB of RSS; of its anonymous part; of its file-backed part (here mostly the memory-mapped store: page
    cache, shared by every process that maps it, which the kernel drops under pressure); and of private dirty
    pages (what this process alone holds: for a forked worker, what it added to what it shares with its parent)."""
    fields = smaps(pid)
    out = {key.lower(): fields[key] / 1024 for key in ("Rss", "Anonymous", "Private_Dirty")}
    out["file"] = out["rss"] - out["anonymous"]
    return out


def child_generate(args):
    from benchmarks.synthetic_msmarco import generate

    return generate(Path(args["out"]), args["scale"], log=lambda m: print(m, file=sys.stderr, flush=True),
                    pickle_module=args.get("pickle_module", "numpy.core.multiarray"))


def child_prepare(args):
    from marco_lightning.data.sources import MarcoSource
    from marco_lightning.data.store import prepare

    start = time.perf_counter()
    out = prepare(MarcoSource(**_data(Path(args["data"]))), NEGATIVES[args["negatives"]], args["store"], force=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": time.perf_counter() - start, "manifest": {k: manifest[k] for k in (
        "num_passages", "num_queries", "num_train_queries", "num_positives", "num_negatives", "num_teacher_scores",
        "seconds_per_step", "dropped")}}


def child_pipeline(args):
    """Open the store, then iterate the training DataLoader as training does; rounds of `batches` batches."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from marco_lightning.data.sampling import EpochShardSampler, TrainDataset, worker_init
    from marco_lightning.data.store import Store
    from marco_lightning.models import Collator, resolve_backbone

    torch.set_num_threads(2)
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "minilm.yaml")  # the default model's lengths
    backbone = resolve_backbone(model_cfg.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    # max_doc_length null: the model's own max_seq_length, as the bi-encoder resolves it
    doc_length = model_cfg.max_doc_length or json.loads((Path(backbone) / "sentence_bert_config.json").read_text())[
        "max_seq_length"]
    collator = Collator(tokenizer, "bi", model_cfg.max_query_length, doc_length)
    before = _memory()
    opens = []
    for _ in range(5):  # the first open is the one a run pays; the others show the spread
        t = time.perf_counter()
        store = Store(args["store"])
        dataset = TrainDataset(store, num_negatives=1, seed=0, with_teacher=True)
        opens.append(time.perf_counter() - t)
    sampler = EpochShardSampler(len(dataset), shuffle=True, seed=0)
    result = {"open_s": opens, "train_queries": len(dataset), "before_mb": before}
    # Where a batch's time goes, in this process: drawing the examples, then collating them with the project's
    # Collator (the Rust tokenizer called directly) or through transformers' tokenizer call (the same tensors, checked).
    order = sampler.indices()[:10 * BATCH].tolist()
    t = time.perf_counter()
    examples = [dataset[(0, i)] for i in order]
    result["draw_us"] = (time.perf_counter() - t) / len(order) * 1e6
    call = TokenizerCallCollate(tokenizer, model_cfg.max_query_length, model_cfg.max_doc_length)
    a, b = collator.train(examples[:BATCH]), call(examples[:BATCH])
    result["call_identical"] = all(torch.equal(a[k][f], b[k][f]) for k in ("query", "docs") for f in a[k])
    batches_ = [examples[i:i + BATCH] for i in range(0, len(examples), BATCH)]
    for r in range(args["rounds"]):
        for name, fn in (("collator", collator.train), ("call", call))[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            for batch in batches_:
                fn(batch)
            result.setdefault(f"collate_{name}_per_s", []).append(len(examples) / (time.perf_counter() - t))
    for workers in args["workers"]:
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collator.train,
                            num_workers=workers, worker_init_fn=worker_init if workers else None)
        rates, firsts, tokens = [], [], []
        for r in range(args["rounds"]):
            sampler.set_epoch(r)
            t = time.perf_counter()
            it = iter(loader)
            batch = next(it)
            firsts.append(time.perf_counter() - t)
            t, n = time.perf_counter(), 0
            for _ in range(args["batches"] - 1):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                n += len(batch["teacher"])
                tokens.append(int(batch["docs"]["attention_mask"].sum()) / len(batch["docs"]["attention_mask"]))
            rates.append(n / (time.perf_counter() - t) if n else float("nan"))
            if r == args["rounds"] - 1:  # memory while the workers are alive and have served many batches
                result[f"memory_{workers}"] = {"main": _memory(), "workers": [_memory(p) for p in children()]}
            del it
        result[f"samples_per_s_{workers}"] = rates
        result[f"first_batch_s_{workers}"] = firsts
        result["mean_doc_tokens"] = float(np.mean(tokens)) if tokens else float("nan")
    return result


class TokenizerCallCollate:
    """Collator.train as it was before it called the Rust tokenizer directly: through transformers' tokenizer
    call, whose Python wrapper (transformers 5 flattens every token list to check for emptiness) costs about as
    much as the tokenisation itself."""

    def __init__(self, tokenizer, max_query_length, max_doc_length):
        self.tokenizer, self.lengths = tokenizer, (max_query_length, max_doc_length)

    def _tok(self, texts, max_length):
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    def __call__(self, examples):
        import torch

        return {"group_size": len(examples[0][1]), "query": self._tok([q for q, _, _ in examples], self.lengths[0]),
                "docs": self._tok([d for _, ds, _ in examples for d in ds], self.lengths[1]),
                "teacher": torch.tensor([t for _, _, t in examples], dtype=torch.float32)}


def child_baseline_scores(args):
    """sentence-transformers' way: `ce_scores = pickle.load(gzip.open(...))`, the whole dict in RAM."""
    import gzip
    import pickle
    import resource

    before = _memory()["anonymous"]
    t = time.perf_counter()
    with gzip.open(args["path"], "rb") as f:
        scores = pickle.load(f)
    seconds = time.perf_counter() - t
    n = sum(len(v) for v in scores.values())
    return {"seconds": seconds, "scores": n, "anon_mb": _memory()["anonymous"] - before,
            "peak_delta_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
            "value_type": type(next(iter(next(iter(scores.values())).values()))).__name__}


def child_baseline_corpus(args):
    """sentence-transformers' way: `corpus[int(pid)] = passage` for every line of collection.tsv."""
    import resource

    before = _memory()["anonymous"]
    t = time.perf_counter()
    corpus = {}
    with open(args["path"], encoding="utf8") as f:
        for line in f:
            pid, passage = line.strip().split("\t")
            corpus[int(pid)] = passage
    return {"seconds": time.perf_counter() - t, "passages": len(corpus), "anon_mb": _memory()["anonymous"] - before,
            "peak_delta_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


CHILDREN = {"generate": child_generate, "prepare": child_prepare, "pipeline": child_pipeline,
            "baseline_scores": child_baseline_scores, "baseline_corpus": child_baseline_corpus}


def run_child(kind: str, log, **args) -> dict:
    """Run CHILDREN[kind](args) in a fresh interpreter; its result plus wall seconds and peak RSS (MB, the
    child's own maximum from os.wait4; for a DataLoader parent, the largest of it and its workers)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.data_pipeline", "--child", kind,
                                 json.dumps(args)], cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"benchmark child {kind} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    for line in stderr.splitlines():
        if line.strip().startswith(("collection", "queries")):  # the generator's progress lines
            log(f"    {line.strip()}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=time.perf_counter() - start, peak_rss_mb=usage.ru_maxrss / 1024)
    return result


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child_idle(args):
    """The interpreter with the store code imported: the fixed part of prepare's peak RSS."""
    import marco_lightning.data.store  # noqa: F401

    return {}


CHILDREN["idle"] = child_idle


# --- the run ------------------------------------------------------------------------------------------------

def machine() -> dict:
    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_gb, "python": platform.python_version(),
            "versions": {d: version(d) for d in ("numpy", "torch", "transformers", "tokenizers")},
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "load_average": os.getloadavg()}


def run(scale: float, mnrl_scale: float, small_scale: float, workdir: Path, rounds: int, batches: int, keep: bool,
        log=print) -> dict:
    workdir = workdir.absolute()
    probe = next(p for p in [workdir, *workdir.parents] if p.exists())
    need, free = max(scale, mnrl_scale, 2 * small_scale) * BYTES_PER_SCALE, shutil.disk_usage(probe).free
    if need > 0.8 * free:
        raise SystemExit(f"--scale {scale} needs about {need / 1e9:.1f} GB in {workdir}, {free / 1e9:.1f} GB are "
                         "free: pass a smaller --scale or another --workdir")
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty; it is deleted after the run, so give an empty or new folder")

    def done(*paths):  # (disk) each set of files goes as soon as it is measured
        for path in paths if not keep else ():
            shutil.rmtree(path, ignore_errors=True)

    res = {"machine": machine(), "scale": scale, "mnrl_scale": mnrl_scale, "small_scale": small_scale,
           "batches": batches}
    try:
        res["idle"] = run_child("idle", log)
        files, store = workdir / "files", workdir / "store"
        log(f"generating the files at scale {scale} into {files}")
        res["generate"] = run_child("generate", log, out=str(files), scale=scale)
        log(f"  {res['generate']['wall_s']:.0f} s; prepare (negatives=bm25)")
        res["prepare"] = run_child("prepare", log, data=str(files), negatives="bm25", store=str(store))
        res["prepare"]["store_bytes"] = _du(store)
        done(files)
        log(f"  {res['prepare']['seconds']:.0f} s, peak RSS {res['prepare']['peak_rss_mb']:.0f} MB; the pipeline")
        res["pipeline"] = run_child("pipeline", log, store=str(store), workers=[2, 0], rounds=rounds, batches=batches)
        log(f"  {statistics.median(res['pipeline']['samples_per_s_2']):.0f} samples/s with 2 workers")
        done(store)

        files, store = workdir / "files-mnrl", workdir / "store-mnrl"
        log(f"prepare (negatives=mnrl_recipe) on files at scale {mnrl_scale}")
        res["generate_mnrl"] = run_child("generate", log, out=str(files), scale=mnrl_scale)
        res["prepare_mnrl"] = run_child("prepare", log, data=str(files), negatives="mnrl_recipe", store=str(store))
        log(f"  {res['prepare_mnrl']['seconds']:.0f} s, peak RSS {res['prepare_mnrl']['peak_rss_mb']:.0f} MB")
        done(files, store)

        log(f"the baseline (Python dicts) at scale {small_scale}")
        for values, module in (("float32", "numpy.core.multiarray"), ("float", None)):
            files = workdir / f"files-{values}"
            res[f"generate_{values}"] = run_child("generate", log, out=str(files), scale=small_scale,
                                                  pickle_module=module)
            res[f"baseline_scores_{values}"] = [run_child("baseline_scores", log, path=_data(files)["teacher_scores"])
                                                for _ in range(2)]
            if values == "float32":
                res["baseline_corpus"] = [run_child("baseline_corpus", log, path=_data(files)["collection"])
                                          for _ in range(2)]
            done(files)
    finally:
        done(workdir)
    return res


# --- the report -----------------------------------------------------------------------------------------------

def _spread(values, digits=0, unit="") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}{unit} (1 run)"
    return f"{med:,.{digits}f}{unit} ({min(values):,.{digits}f}-{max(values):,.{digits}f}, {len(values)} runs)"


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _row(*cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(r: dict) -> str:
    from benchmarks.synthetic_msmarco import FULL

    m, s, sm, sb = r["machine"], r["scale"], r["mnrl_scale"], r["small_scale"]
    g, p, pm, pipe, idle = r["generate"], r["prepare"], r["prepare_mnrl"], r["pipeline"], r["idle"]["peak_rss_mb"]
    c = g["counts"]
    load = " / ".join(f"{x:.1f}" for x in m["load_average"])
    v = m["versions"]

    def full(value, at, fmt):  # the full-scale column: measured, or extrapolated linearly
        return fmt(value) if at >= 1 else f"{fmt(value / at)} (extrapolated)"

    def full_mem(peak, at):  # the interpreter's fixed part stays, the rest grows with the data
        return _gb(peak) if at >= 1 else f"{_gb(idle + (peak - idle) / at)} (extrapolated)"

    def minutes(x):
        return f"{x / 60:,.1f} min"

    rate2 = statistics.median(pipe["samples_per_s_2"])
    collate, call = (statistics.median(pipe[f"collate_{k}_per_s"]) for k in ("collator", "call"))
    need, target = V100_SAMPLES_PER_S, TARGET_FACTOR * V100_SAMPLES_PER_S
    mem = pipe["memory_2"]
    data_anon = mem["main"]["anonymous"] - pipe["before_mb"]["anonymous"]
    workers_dirty = sum(w["private_dirty"] for w in mem["workers"])
    sampler_mb = 0 if s >= 1 else 8 * FULL["with_positive"] * (1 - s) / 2**20  # the epoch order grows with scale
    train_data_mb = data_anon + workers_dirty + sampler_mb

    def per_item(rows, n_key):
        return {k: statistics.median(x[k] / x[n_key] for x in rows) for k in ("anon_mb", "peak_delta_mb", "seconds")}

    st = {k: per_item(r[f"baseline_scores_{k}"], "scores") for k in ("float32", "float")}
    corpus = per_item(r["baseline_corpus"], "passages")
    st_mb = st["float32"]["anon_mb"] * FULL["teacher_scores"] + corpus["anon_mb"] * FULL["passages"]
    st_s = st["float32"]["seconds"] * FULL["teacher_scores"] + corpus["seconds"] * FULL["passages"]

    def baseline_rows(values, what):
        rows, x = r[f"baseline_scores_{values}"], st[values]
        return [
            _row(f"`pickle.load` of the score pickle, {what}: held after loading",
                 f"{_spread([y['anon_mb'] for y in rows], 0, ' MB')}, {_spread([y['seconds'] for y in rows], 1, ' s')}",
                 f"{x['anon_mb'] * 2**20:.0f} bytes, {x['seconds'] * 1e6:.2f} us a score",
                 f"**{_gb(x['anon_mb'] * FULL['teacher_scores'])}**, {minutes(x['seconds'] * FULL['teacher_scores'])}"),
            _row("&nbsp;&nbsp;peak while loading (the unpickler's memo keeps every intermediate object)",
                 _spread([y["peak_delta_mb"] for y in rows], 0, " MB"), f"{x['peak_delta_mb'] * 2**20:.0f} bytes",
                 _gb(x["peak_delta_mb"] * FULL["teacher_scores"])),
        ]

    worker_mem = ", ".join(f"{_gb(w['rss'])} / {_gb(w['anonymous'])} / {_gb(w['private_dirty'])}" for w in mem["workers"])
    lines = [
        f"## {SECTION}",
        "",
        (f"Written by `make bench-data` (`python -m benchmarks.data_pipeline --scale {s:g}`), {m['date']}: "
         f"{m['cpu']}, {m['cores']} cores, {m['mem_gb']:.0f} GB RAM, load average {load} at the start (a shared "
         f"machine: other jobs ran alongside). Python {m['python']}, numpy {v['numpy']}, torch {v['torch']}, "
         f"transformers {v['transformers']}, tokenizers {v['tokenizers']}."),
        "",
        (f"Input: synthetic files in the exact real formats (`benchmarks/synthetic_msmarco.py`) at **scale {s:g}** "
         f"of the real shape: {c['passages']:,} passages (real MS MARCO texts, cycled; collection.tsv "
         f"{g['bytes']['collection'] / 1e9:.2f} GB), {c['queries']:,} training queries ({c['with_positive']:,} with "
         f"a positive, {c['qrels']:,} qrels), 13 systems x 50 negatives a line in msmarco-hard-negatives.jsonl.gz "
         f"({g['bytes']['hard_negatives'] / 1e9:.2f} GB), {c['teacher_scores']:,} teacher scores in the pickle.gz "
         f"as numpy.float32 values ({g['bytes']['teacher_scores'] / 1e9:.2f} GB). "
         + ("This is the full real shape." if s >= 1 else
            "The full-scale column extrapolates linearly with the measured per-item costs (labelled).")),
        "",
        _row("prepare (`task=prepare`), one run each", f"measured (scale {s:g})", "full MS MARCO"),
        "|---|---|---|",
        _row("generating the synthetic files (not part of training)", f"{g['wall_s']:,.0f} s",
             full(g["wall_s"], s, minutes)),
        _row("prepare, negatives=bm25 (the MarginMSE default): time", f"{p['seconds']:,.0f} s",
             full(p["seconds"], s, minutes)),
        _row("&nbsp;&nbsp;peak RSS", _gb(p["peak_rss_mb"]), full_mem(p["peak_rss_mb"], s)),
        _row("&nbsp;&nbsp;store on disk", f"{p['store_bytes'] / 1e9:.2f} GB",
             full(p["store_bytes"], s, lambda x: f"{x / 1e9:.2f} GB")),
        _row(f"prepare, negatives=mnrl_recipe (13 systems, margin 3), on files at scale {sm:g}: time",
             f"{pm['seconds']:,.0f} s (scale {sm:g})", full(pm["seconds"], sm, minutes)),
        _row("&nbsp;&nbsp;peak RSS", f"{_gb(pm['peak_rss_mb'])} (scale {sm:g})", full_mem(pm["peak_rss_mb"], sm)),
        "",
        (f"Peak RSS is the prepare process's own maximum (`os.wait4`); extrapolated, the interpreter's fixed "
         f"{idle:.0f} MB stays and the rest grows linearly. Seconds per step, bm25: "
         f"{p['manifest']['seconds_per_step']}; mnrl_recipe: {pm['manifest']['seconds_per_step']}."),
        "",
        _row(f"training data pipeline (store of scale {s:g})", "measured", "target"),
        "|---|---|---|",
        _row("open the store (`Store` + `TrainDataset`: memory maps)", _spread([x * 1000 for x in pipe["open_s"]], 1, " ms"),
             "seconds"),
        _row("first batch (2 workers start)", _spread(pipe["first_batch_s_2"], 2, " s"), "seconds"),
        _row(f"**samples/s**: TrainDataset + Collator (MiniLM tokenizer; query 32, passage 256 tokens) through a "
             f"DataLoader, 2 workers, batch {BATCH}, 1 positive + 1 negative + teacher scores",
             f"**{_spread(pipe['samples_per_s_2'])}**",
             f">= {target:,.0f} (10x the {need:.0f}/s a V100 step consumes)"),
        _row("samples/s with 0 workers (all in the training process)", _spread(pipe["samples_per_s_0"]), ""),
        _row("&nbsp;&nbsp;of which drawing examples (`TrainDataset`), per sample", f"{pipe['draw_us']:.0f} us", ""),
        _row("collating alone (tokenising) on one core: the project's `Collator`",
             f"{_spread(pipe['collate_collator_per_s'])} samples/s", ""),
        _row("&nbsp;&nbsp;the same through transformers' `tokenizer(...)` call (the `Collator` before it called the "
             f"Rust tokenizer directly; {'identical' if pipe['call_identical'] else 'NOT identical'} tensors)",
             f"{_spread(pipe['collate_call_per_s'])} samples/s ({collate / call:.2f}x slower)", ""),
        _row("training process: RSS / anonymous / file-backed (the store's pages)",
             f"{_gb(mem['main']['rss'])} / {_gb(mem['main']['anonymous'])} / {_gb(mem['main']['file'])}",
             "data < 2 GB"),
        _row("&nbsp;&nbsp;anonymous memory the data added (from before opening the store to after the 2-worker rounds)",
             f"{data_anon:+.0f} MB", ""),
        _row("each worker: RSS / anonymous (shared with the parent until written) / private dirty (its own)",
             worker_mem, ""),
        "",
        (f"{len(pipe['samples_per_s_2'])} rounds per setting, each a fresh epoch iterator of {r['batches']} "
         "batches timed from its first batch (startup excluded); median (min-max). Passages average "
         f"{pipe['mean_doc_tokens']:.0f} tokens. RSS grows with every passage read: each read maps a 64 KB window "
         "of the store's texts (the kernel's fault-around) from the page cache. Those pages are shared by the "
         "training process and its workers and dropped by the kernel under pressure; the anonymous memory is "
         "what the processes hold (about 200 MB each: torch and the tokenizer, not data)."),
        "",
        (f"Baseline, sentence-transformers' MS MARCO scripts (everything in Python dicts), measured at scale {sb:g} "
         f"({r['generate_float32']['counts']['teacher_scores']:,} scores, {r['generate_float32']['counts']['passages']:,} "
         f"passages) and extrapolated linearly to the real {FULL['teacher_scores'] / 1e6:.0f}M scores and "
         f"{FULL['passages']:,} passages (2 runs each):"),
        "",
        _row("", "measured", "per item", "full MS MARCO (extrapolated)"),
        "|---|---|---|---|",
        *baseline_rows("float32", "numpy.float32 values (as this benchmark's file)"),
        *baseline_rows("float", "if the values were Python floats"),
        _row("collection.tsv into `corpus[int(pid)] = passage`",
             f"{_spread([x['anon_mb'] for x in r['baseline_corpus']], 0, ' MB')}, "
             f"{_spread([x['seconds'] for x in r['baseline_corpus']], 1, ' s')}",
             f"{corpus['anon_mb'] * 2**20:.0f} bytes, {corpus['seconds'] * 1e6:.2f} us a passage",
             f"{_gb(corpus['anon_mb'] * FULL['passages'])}, {minutes(corpus['seconds'] * FULL['passages'])}"),
        "",
        _row("target", "this project", "sentence-transformers' scripts"),
        "|---|---|---|",
        _row("training process data memory < 2 GB at full scale",
             f"**{_gb(train_data_mb)}** anonymous: what the data added to the training process + both workers' "
             "own pages" + ("" if s >= 1 else " + the epoch order of all 503k queries"),
             f"{_gb(st_mb)} (scores + corpus, extrapolated)"),
        _row("startup in seconds",
             f"**{statistics.median(pipe['open_s']) * 1000:.0f} ms** to open + "
             f"{statistics.median(pipe['first_batch_s_2']):.1f} s to the first batch; the prepare before it runs "
             f"once ({full(p['seconds'], s, minutes)})",
             f"{minutes(st_s)} of loading, every run (extrapolated)"),
        _row(f">= 10x what a MiniLM MarginMSE step at batch {BATCH} consumes on a V100 ({need:.0f} samples/s: "
             "500k queries in under an hour, sentence-transformers' MS MARCO README)",
             f"**{rate2 / need:.1f}x** ({rate2:,.0f} samples/s, 2 workers on 2 shared cores): "
             + ("met. " if rate2 >= target else "not met here. ")
             + f"Tokenising bounds it: {collate:,.0f} samples/s per core with the `Collator`, so 10x takes "
             f"~{target / collate:.1f} free cores of workers (`num_workers`; GPU nodes have them)", ""),
        "",
        f"_Measured {m['date']}, load average {load}._",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this section of BENCHMARKS.md (another writer owns the others): one quick read-modify-write."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(rf"(?ms)^## {re.escape(SECTION)}\n.*?(?=^## |\Z)")
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip() + "\n\n", old, count=1).rstrip() + "\n"
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + text.rstrip() + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help=f"fraction of the real MS MARCO shape for prepare and the pipeline (default {DEFAULT_SCALE:g}: "
                             "the full shape: 11-21 minutes of generation + prepare on 2 shared cores, ~10 GB of "
                             "disk; the whole run ~16 minutes)")
    parser.add_argument("--mnrl-scale", type=float, default=0.2,
                        help="scale of the files for the negatives=mnrl_recipe prepare (default 0.2)")
    parser.add_argument("--small-scale", type=float, default=0.05,
                        help="scale of the files for the Python-dict baseline (default 0.05: ~2 GB of RAM)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/marco-bench-data"),
                        help="where the synthetic files and stores go (deleted at the end)")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline rounds per setting")
    parser.add_argument("--batches", type=int, default=150, help="batches per pipeline round")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files and stores")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return None
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    res = run(args.scale, args.mnrl_scale, args.small_scale, args.workdir, args.rounds, args.batches, args.keep, log)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    text = markdown(res)
    write_section(args.out, text)
    print(text)
    log(f"wrote the '{SECTION}' section of {args.out}")
    return res


if __name__ == "__main__":
    main()
