"""`make bench-data`: the data pipeline at MS MARCO scale, on synthetic files in the exact real formats.

    python -m benchmarks.data_pipeline                   # default scale (see --help), writes BENCHMARKS.md
    python -m benchmarks.data_pipeline --scale 1         # the full real shape: 8.8M passages, 160M scores
    python -m benchmarks.data_pipeline --scale 0.001 --out /tmp/B.md   # a smoke run

Measures, each in its own child process (so one's memory never counts toward another's):
1. generating the files (benchmarks/synthetic_msmarco.py) at --scale, and `prepare` on them (negatives=bm25,
   the MarginMSE default): seconds, peak RSS (os.wait4), the store's size on disk;
2. the training data pipeline on that store: open time, then TrainDataset + the project's Collator (the real
   MiniLM tokenizer) through a DataLoader with 2 workers, batch 64, one positive and one negative per query with
   teacher scores (MarginMSE): samples/s and the memory of the training process and of its workers;
3. at --small-scale (files small enough to load into dicts): `prepare` with negatives=mnrl_recipe (all 13
   systems, a teacher-score margin: the heaviest selection), and the baseline -- the score pickle loaded with
   pickle.load and the collection read into a dict, as sentence-transformers' MS MARCO scripts do.
Figures measured below scale 1 are extrapolated linearly with the measured per-item costs, and labelled so.
The synthetic files and stores are deleted at the end (--keep keeps them).
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

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Data pipeline"
BYTES_PER_SCALE = 11.0e9   # collection 3.3 GB + hard negatives 1.4 GB + scores 1.3 GB + store ~4.3 GB, at scale 1
# A MarginMSE epoch of 500k queries took under an hour on a V100 (REFERENCE.md): the step consumes this many.
V100_SAMPLES_PER_S = 500_000 / 3600
TARGET_FACTOR = 10
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
    """MB of RSS, of its anonymous part and of the pages only this process maps (private). File-backed pages
    of memory-mapped files count in RSS but are shared page cache the kernel can drop; a forked worker shares
    its parent's anonymous pages until it writes to them, so its private part is what it adds."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous", "Pss", "Private_Clean", "Private_Dirty"):
                out[key.lower()] = int(rest.split()[0]) / 1024
    out["private"] = out.pop("private_clean") + out.pop("private_dirty")
    return out


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def child_generate(args):
    from benchmarks.synthetic_msmarco import generate

    return generate(Path(args["out"]), args["scale"], log=lambda m: print(m, file=sys.stderr, flush=True))


def child_prepare(args):
    from marco_lightning.data.store import prepare

    start = time.perf_counter()
    out = prepare(_data(Path(args["data"])), NEGATIVES[args["negatives"]], args["store"], force=True)
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
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(model_cfg.backbone))
    collator = Collator(tokenizer, "bi", model_cfg.max_query_length, model_cfg.max_doc_length)
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
    # Collator or with the Rust tokenizer called directly (the same tensors, checked).
    order = sampler.indices()[:10 * BATCH].tolist()
    t = time.perf_counter()
    examples = [dataset[(0, i)] for i in order]
    result["draw_us"] = (time.perf_counter() - t) / len(order) * 1e6
    direct = DirectCollate(tokenizer, model_cfg.max_query_length, model_cfg.max_doc_length)
    a, b = collator.train(examples[:BATCH]), direct(examples[:BATCH])
    result["direct_identical"] = all(torch.equal(a[k][f], b[k][f]) for k in ("query", "docs") for f in a[k])
    batches_ = [examples[i:i + BATCH] for i in range(0, len(examples), BATCH)]
    for r in range(args["rounds"]):
        for name, fn in (("collator", collator.train), ("direct", direct))[::1 if r % 2 == 0 else -1]:
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
                result[f"memory_{workers}"] = {"main": _memory(), "workers": [_memory(p) for p in _children()]}
            del it
        result[f"samples_per_s_{workers}"] = rates
        result[f"first_batch_s_{workers}"] = firsts
        result["mean_doc_tokens"] = float(np.mean(tokens)) if tokens else float("nan")
    return result


class DirectCollate:
    """Collator.train for a bi-encoder through the Rust tokenizer directly: transformers 5's tokenizer call
    spends about half its time in Python (flattening every token list to check for emptiness)."""

    def __init__(self, tokenizer, max_query_length, max_doc_length):
        import copy

        self.backend, self.lengths = copy.deepcopy(tokenizer.backend_tokenizer), (max_query_length, max_doc_length)
        self.backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)

    def _tok(self, texts, max_length):
        import numpy as np
        import torch

        self.backend.enable_truncation(max_length)
        encs = self.backend.encode_batch(texts)
        return {k: torch.from_numpy(np.array([getattr(e, a) for e in encs], np.int64))
                for k, a in (("input_ids", "ids"), ("token_type_ids", "type_ids"), ("attention_mask", "attention_mask"))}

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
    before = _memory()["anonymous"]
    t = time.perf_counter()
    corpus = {}
    with open(args["path"], encoding="utf8") as f:
        for line in f:
            pid, passage = line.strip().split("\t")
            corpus[int(pid)] = passage
    return {"seconds": time.perf_counter() - t, "passages": len(corpus),
            "anon_mb": _memory()["anonymous"] - before}


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


def run(scale: float, small_scale: float, workdir: Path, rounds: int, batches: int, keep: bool, log=print) -> dict:
    workdir = workdir.absolute()
    probe = next(p for p in [workdir, *workdir.parents] if p.exists())
    need, free = (scale + small_scale) * BYTES_PER_SCALE, shutil.disk_usage(probe).free
    if need > 0.8 * free:
        raise SystemExit(f"--scale {scale} needs about {need / 1e9:.1f} GB in {workdir}, {free / 1e9:.1f} GB are "
                         "free: pass a smaller --scale or another --workdir")
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty; it is deleted after the run, so give an empty or new folder")
    res = {"machine": machine(), "scale": scale, "small_scale": small_scale}
    big, small = workdir / "files", workdir / "files-small"
    try:
        res["idle"] = run_child("idle", log)
        log(f"generating the files at scale {scale} into {big}")
        res["generate"] = run_child("generate", log, out=str(big), scale=scale)
        log(f"  {res['generate']['wall_s']:.0f} s; prepare (negatives=bm25)")
        res["prepare"] = run_child("prepare", log, data=str(big), negatives="bm25", store=str(workdir / "store"))
        res["prepare"]["store_bytes"] = _du(workdir / "store")
        log(f"  {res['prepare']['seconds']:.0f} s, peak RSS {res['prepare']['peak_rss_mb']:.0f} MB; the pipeline")
        res["pipeline"] = run_child("pipeline", log, store=str(workdir / "store"), workers=[2, 0], rounds=rounds,
                                    batches=batches)
        log(f"  {statistics.median(res['pipeline']['samples_per_s_2']):.0f} samples/s with 2 workers")
        shutil.rmtree(big)  # (disk) the store stays until the end, the files go now
        log(f"generating the files at scale {small_scale}; prepare (negatives=mnrl_recipe); baselines")
        res["generate_small"] = run_child("generate", log, out=str(small), scale=small_scale)
        res["prepare_mnrl"] = run_child("prepare", log, data=str(small), negatives="mnrl_recipe",
                                        store=str(workdir / "store-mnrl"))
        res["prepare_mnrl"]["store_bytes"] = _du(workdir / "store-mnrl")
        files = _data(small)
        res["baseline_scores"] = [run_child("baseline_scores", log, path=files["teacher_scores"]) for _ in range(2)]
        res["baseline_corpus"] = [run_child("baseline_corpus", log, path=files["collection"]) for _ in range(2)]
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
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


def markdown(r: dict) -> str:
    from benchmarks.synthetic_msmarco import FULL

    m, s, s2 = r["machine"], r["scale"], r["small_scale"]
    g, p, pipe, idle = r["generate"], r["prepare"], r["pipeline"], r["idle"]["peak_rss_mb"]
    c, c2 = g["counts"], r["generate_small"]["counts"]
    pm = r["prepare_mnrl"]
    full = s >= 1

    def extra(value, per_scale, fmt, at=s):  # the full-scale column: measured, or extrapolated linearly
        return fmt(value) if at >= 1 else f"{fmt(per_scale)} (extrapolated)"

    def mem(peak, at):  # fixed interpreter part + the part that grows with the data
        return idle + (peak - idle) / at

    rate2, rate0 = pipe["samples_per_s_2"], pipe["samples_per_s_0"]
    need = V100_SAMPLES_PER_S
    mem2 = pipe["memory_2"]
    data_anon = mem2["main"]["anonymous"] - pipe["before_mb"]["anonymous"]
    workers_private = sum(w["private"] for w in mem2["workers"])
    sc = r["baseline_scores"]
    per_score_mb = statistics.median(x["anon_mb"] / x["scores"] for x in sc)
    per_score_s = statistics.median(x["seconds"] / x["scores"] for x in sc)
    peak_per_score = statistics.median(x["peak_delta_mb"] / x["scores"] for x in sc)
    bc = r["baseline_corpus"]
    per_passage_mb = statistics.median(x["anon_mb"] / x["passages"] for x in bc)
    per_passage_s = statistics.median(x["seconds"] / x["passages"] for x in bc)
    st_full_mb = per_score_mb * FULL["teacher_scores"] + per_passage_mb * FULL["passages"]
    st_full_s = per_score_s * FULL["teacher_scores"] + per_passage_s * FULL["passages"]
    train_data_mb = data_anon + workers_private + 8 * FULL["with_positive"] / 2**20 * (0 if full else 1)
    v = m["versions"]
    lines = [
        f"## {SECTION}",
        "",
        (f"Written by `make bench-data` (`python -m benchmarks.data_pipeline --scale {s:g}`), {m['date']}: "
        f"{m['cpu']}, {m['cores']} cores, {m['mem_gb']:.0f} GB RAM, load average "
        f"{' / '.join(f'{x:.1f}' for x in m['load_average'])} at the start (a shared machine: other jobs ran "
        f"alongside). Python {m['python']}, numpy {v['numpy']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, tokenizers {v['tokenizers']}."),
        "",
        f"Input: synthetic files in the exact real formats (`benchmarks/synthetic_msmarco.py`) at **scale {s:g}** "
        f"of the real shape: {c['passages']:,} passages (real MS MARCO texts, cycled), {c['queries']:,} training "
        f"queries ({c['with_positive']:,} with a positive, {c['qrels']:,} qrels), 13 systems x 50 negatives a "
        f"line in msmarco-hard-negatives.jsonl.gz ({g['bytes']['hard_negatives'] / 1e9:.2f} GB), "
        f"{c['teacher_scores']:,} teacher scores in the pickle.gz, numpy.float32 values "
        f"({g['bytes']['teacher_scores'] / 1e9:.2f} GB), collection.tsv {g['bytes']['collection'] / 1e9:.2f} GB. "
        + ("This is the full real shape." if full else
           "The full-scale column extrapolates linearly with the measured per-item costs (labelled)."),
        "",
        f"| prepare (`task=prepare`) | measured at scale {s:g} | full MS MARCO |",
        "|---|---|---|",
        (f"| generating the synthetic files (not part of training) | {g['wall_s']:,.0f} s | "
        f"{extra(g['wall_s'], g['wall_s'] / s, lambda x: f'{x:,.0f} s')} |"),
        (f"| prepare, negatives=bm25 (the MarginMSE default): time | {p['seconds']:,.0f} s (1 run) | "
        f"{extra(p['seconds'], p['seconds'] / s, lambda x: f'{x / 60:,.1f} min')} |"),
        (f"| prepare, negatives=bm25: peak RSS | {_gb(p['peak_rss_mb'])} | "
        f"{extra(p['peak_rss_mb'], mem(p['peak_rss_mb'], s), _gb)} |"),
        (f"| store on disk | {p['store_bytes'] / 1e9:.2f} GB | "
        f"{extra(p['store_bytes'], p['store_bytes'] / s, lambda x: f'{x / 1e9:.2f} GB')} |"),
        (f"| prepare, negatives=mnrl_recipe (13 systems, margin 3; at scale {s2:g}): time | {pm['seconds']:,.0f} s "
        f"(1 run, scale {s2:g}) | {extra(pm['seconds'], pm['seconds'] / s2, lambda x: f'{x / 60:,.1f} min', s2)} |"),
        (f"| prepare, negatives=mnrl_recipe: peak RSS | {_gb(pm['peak_rss_mb'])} (scale {s2:g}) | "
        f"{extra(pm['peak_rss_mb'], mem(pm['peak_rss_mb'], s2), _gb, s2)} |"),
        "",
        (f"Peak RSS is the prepare process's own maximum (`os.wait4`); its extrapolation keeps the interpreter's "
        f"fixed {idle:.0f} MB and scales the rest. Per step (s, bm25): {p['manifest']['seconds_per_step']}."),
        "",
        f"| training data pipeline (store of scale {s:g}) | measured | target |",
        "|---|---|---|",
        f"| open the store (`Store` + `TrainDataset`, memory-mapped) | {_spread([x * 1000 for x in pipe['open_s']], 1, ' ms')} | seconds |",
        f"| first batch (2 workers start, tokenizer sent to them) | {_spread(pipe['first_batch_s_2'], 2, ' s')} | seconds |",
        (f"| samples/s: TrainDataset + Collator (MiniLM tokenizer, query 32 / passage 256 tokens), DataLoader, "
        f"2 workers, batch {BATCH}, 1 positive + 1 negative + teacher scores | {_spread(rate2)} | "
        f">= {TARGET_FACTOR * need:,.0f} ({TARGET_FACTOR}x a V100 step: {need:,.0f}/s) |"),
        f"| samples/s in the training process itself (0 workers: the cost of one core) | {_spread(rate0)} | |",
        (f"| training process: RSS / anonymous memory | {_gb(mem2['main']['rss'])} / {_gb(mem2['main']['anonymous'])} "
        f"(torch, the tokenizer and the data; the data added {data_anon:+.0f} MB anonymous after the store was "
        "opened and two epochs iterated) | |"),
        "| each DataLoader worker: RSS / anonymous / private (what the fork added) | "
        + ", ".join(f"{_gb(w['rss'])} / {_gb(w['anonymous'])} / {_gb(w['private'])}" for w in mem2["workers"])
        + " | |",
        (f"| in the training process, per batch of {BATCH}: drawing the examples (`TrainDataset`) | "
        f"{pipe['draw_us'] * BATCH / 1000:.0f} ms ({pipe['draw_us']:.0f} us a sample) | |"),
        (f"| collating only (tokenising), samples/s on one core: the project's `Collator` | "
        f"{_spread(pipe['collate_collator_per_s'])} | |"),
        (f"| the same with the Rust tokenizer called directly (`tokenizer.backend_tokenizer.encode_batch`; "
        f"{'identical' if pipe['direct_identical'] else 'NOT identical'} tensors) | "
        f"{_spread(pipe['collate_direct_per_s'])} | |"),
        "",
        (f"{rounds_note(pipe)} Passage texts average {pipe['mean_doc_tokens']:.0f} tokens after truncation. "
        "RSS counts the pages of the memory-mapped store a process has touched: shared page cache that the "
        "kernel drops under pressure; the anonymous part is what each process really holds."),
        "",
        (f"Baseline, sentence-transformers' MS MARCO scripts (everything in Python dicts), measured at scale {s2:g} "
        f"({c2['teacher_scores']:,} scores, {c2['passages']:,} passages) and extrapolated linearly to the real "
        f"{FULL['teacher_scores'] / 1e6:.0f}M scores and {FULL['passages']:,} passages:"),
        "",
        "| | measured | per item | full MS MARCO (extrapolated) |",
        "|---|---|---|---|",
        (f"| `pickle.load` of the score pickle ({sc[0]['value_type']} values): held after loading | "
        f"{_spread([x['anon_mb'] for x in sc], 0, ' MB')}, {_spread([x['seconds'] for x in sc], 1, ' s')} | "
        f"{per_score_mb * 2**20:.0f} bytes, {per_score_s * 1e6:.2f} us a score | "
        f"{_gb(per_score_mb * FULL['teacher_scores'])}, {per_score_s * FULL['teacher_scores'] / 60:.1f} min |"),
        (f"| the same, peak while loading (the unpickler's memo holds every intermediate object) | "
        f"{_spread([x['peak_delta_mb'] for x in sc], 0, ' MB')} | {peak_per_score * 2**20:.0f} bytes | "
        f"{_gb(peak_per_score * FULL['teacher_scores'])} |"),
        (f"| collection.tsv into `corpus[int(pid)] = passage` | {_spread([x['anon_mb'] for x in bc], 0, ' MB')}, "
        f"{_spread([x['seconds'] for x in bc], 1, ' s')} | {per_passage_mb * 2**20:.0f} bytes, "
        f"{per_passage_s * 1e6:.2f} us a passage | {_gb(per_passage_mb * FULL['passages'])}, "
        f"{per_passage_s * FULL['passages'] / 60:.1f} min |"),
        "",
        "| target | this project | sentence-transformers' scripts |",
        "|---|---|---|",
        (f"| training process data memory < 2 GB at full scale | {_gb(train_data_mb)} anonymous (training process "
        f"data + both workers{'' if full else ' + the sampler order of 500k queries'}) | {_gb(st_full_mb)} "
        "(extrapolated; more with workers) |"),
        (f"| startup in seconds | {statistics.median(pipe['open_s']) * 1000:.0f} ms to open + "
        f"{statistics.median(pipe['first_batch_s_2']):.1f} s to the first batch (after a {p['seconds'] / s / 60:.0f}"
        f"-minute prepare, once{'' if full else ', extrapolated'}) | {st_full_s / 60:.0f} min of loading, every run "
        "(extrapolated) |"),
        (f"| >= {TARGET_FACTOR}x what a MiniLM MarginMSE step at batch 64 consumes on a V100 ({need:.0f} samples/s, "
        f"from 500k queries in under an hour, REFERENCE.md) | {statistics.median(rate2) / need:.0f}x "
        f"({statistics.median(rate2):,.0f} samples/s on 2 shared cores) | |"),
        "",
        f"_Measured {m['date']}, load average {' / '.join(f'{x:.1f}' for x in m['load_average'])}._",
        "",
    ]
    return "\n".join(lines)


def rounds_note(pipe) -> str:
    n = len(pipe["samples_per_s_2"])
    return (f"Throughput: {n} rounds per setting, each a fresh epoch iterator timed from its first batch to its "
            f"last (startup excluded); median (min-max).")


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
                        help=f"fraction of the real MS MARCO shape for prepare and the pipeline (default {DEFAULT_SCALE}: "
                             "about 15 minutes of generation + prepare on 2 cores; 1 = full)")
    parser.add_argument("--small-scale", type=float, default=0.05,
                        help="scale of the files for the dict baseline and the mnrl_recipe prepare (default 0.05)")
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

    res = run(args.scale, args.small_scale, args.workdir, args.rounds, args.batches, args.keep, log)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    text = markdown(res)
    write_section(args.out, text)
    print(text)
    log(f"wrote the '{SECTION}' section of {args.out}")
    return res


if __name__ == "__main__":
    main()
