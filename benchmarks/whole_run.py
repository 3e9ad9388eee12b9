"""A whole training run as a user starts it: `python run.py` vs sentence-transformers' trainer, same examples.

Each contender is its own process, timed from outside (process wall time, imports and all); inside, a callback
times every training step as the loop runs it (Lightning: batch start to batch end; SentenceTransformerTrainer:
step begin to step end), and can hand torch.profiler's operator table of a few steps. Fixed costs (start-up,
the final validation and export) cancel in (wall at 20 steps - wall at 4 steps) / 16; what each epoch adds
(workers, checkpoints) stays in.

    python -m benchmarks.whole_run                   # the rounds, then the section for BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, fmt

BATCH, LR = 16, 2e-5
PROJECT = ["loss=margin_mse", f"batch_size={BATCH}", "task.validate_before=false", "++trainer.limit_val_batches=2"]


# ---------------------------------------------------------------- inside the measured processes
def _top_ops(prof, n: int = 20) -> list[dict]:
    events = prof.key_averages()
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]]


class _Clock:
    """Step times (and optionally a torch.profiler table of steps [first, last]) written to `out` as JSON."""

    def __init__(self, out: str, profile: str | None = None):
        self.out, self.times, self.sizes, self.step, self.prof, self.ops = Path(out), [], [], 0, None, None
        self.profile = tuple(int(s) for s in profile.split("-")) if profile else None

    def begin(self):
        if self.profile and self.step == self.profile[0]:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU]).__enter__()
        self.mark = time.perf_counter()

    def end(self, size: int = BATCH):
        self.times.append(time.perf_counter() - self.mark)
        self.sizes.append(size)
        if self.prof is not None and self.step == self.profile[1]:
            self.prof.__exit__(None, None, None)
            self.ops, self.prof = _top_ops(self.prof), None
        self.step += 1

    def save(self, examples=None):
        self.out.write_text(json.dumps({"times": self.times, "sizes": self.sizes, "ops": self.ops, "examples": examples}))


def StepClock(out: str, profile: str | None = None, examples: bool = False):
    """A Lightning callback (`+callbacks.clock._target_=benchmarks.whole_run.StepClock`); examples=True also
    writes the texts every step trained on, in order (the sentence-transformers side trains on those)."""
    import pytorch_lightning as pl

    class Callback(pl.Callback):
        def __init__(self):
            self.clock, self.rows = _Clock(out, profile), []

        def on_train_epoch_start(self, trainer, module):
            if examples:  # the sampler is set to this epoch already; reading the rows costs an untimed run only
                loader = trainer.train_dataloader
                self.rows += [loader.dataset[key] for key in loader.sampler]

        def on_train_batch_start(self, *args):
            self.clock.begin()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.clock.end(len(batch["query"]["input_ids"]))  # an epoch's last batch may be short

        def on_train_end(self, trainer, module):
            steps = len(self.clock.times)
            self.clock.save([[q, ds, t] for q, ds, t, *_ in self.rows[:steps * BATCH]] if examples else None)

    return Callback()


def st_train(examples: str, steps: int, out: str, profile: str | None = None) -> None:
    """What a sentence-transformers user runs: SentenceTransformerTrainer, MarginMSELoss, batch 16, lr 2e-5, warmup
    10%, fp32, its defaults otherwise; then the model saved."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    from benchmarks.common import backbone_path

    rows = [{"query": q, "positive": ds[0], "negative": ds[1], "label": t[0] - t[1]}
            for q, ds, t in json.loads(Path(examples).read_text())["examples"]]
    clock = _Clock(out, profile)

    class Callback(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            clock.begin()

        def on_step_end(self, *args, **kwargs):
            clock.end()

    model = SentenceTransformer(backbone_path(), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH,
                                                    max_steps=steps, learning_rate=LR, warmup_ratio=0.1,
                                                    save_strategy="no", report_to="none", seed=42)
        trainer = SentenceTransformerTrainer(model, args, train_dataset=Dataset.from_list(rows),
                                             loss=losses.MarginMSELoss(model), callbacks=[Callback()])
        trainer.train()
        model.save(str(Path(tmp) / "final_model"))
    clock.save()


# ---------------------------------------------------------------- the rounds, from outside
def _timed(cmd: list[str], log_file: Path) -> float:
    # a user's environment: not the in-process suites' settings (common.setup), which would, for one, stop the
    # tokenizer's own threads on the sentence-transformers side, which tokenises in its main process
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "TQDM_DISABLE")}
    start = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(cmd, check=False, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log_file}")
    return time.perf_counter() - start


def project_cmd(tmp: Path, name: str, steps: int, *extra: str, clock: str = "") -> list[str]:
    out = tmp / f"{name}.json"
    return [sys.executable, "run.py", *PROJECT, f"trainer.max_steps={steps}", f"paths.output_dir={tmp / name}",
            "+callbacks.clock._target_=benchmarks.whole_run.StepClock", f"+callbacks.clock.out={out}",
            *([f"+callbacks.clock.{clock}"] if clock else []), *extra]


def st_cmd(tmp: Path, name: str, steps: int, examples: Path, profile: str | None = None) -> list[str]:
    return [sys.executable, "-m", "benchmarks.whole_run", "st", "--examples", str(examples), "--steps", str(steps),
            "--out", str(tmp / f"{name}.json"), *(["--profile", profile] if profile else [])]


def run(long: int = 20, short: int = 4, rounds: int = 2, profile: str = "3-5", log=print) -> dict:
    """Round r runs every contender once, order rotated: project as shipped (length chunks) at `long` and `short`
    steps, project with model.length_chunks=1 at `long`, sentence-transformers at `long` and `short`. Then one
    profiled run of each plain step (not timed)."""
    tmp = Path(tempfile.mkdtemp(prefix="whole_run-"))
    examples = tmp / "examples.json"
    log(f"whole run: a warm-up project run (builds the store, writes the examples): {tmp}")
    _timed(project_cmd(tmp, "examples", long, clock="examples=true"), tmp / "examples.log")
    contenders = {
        "project": lambda n: project_cmd(tmp, f"project{n}", n),
        "project_plain": lambda n: project_cmd(tmp, f"project_plain{n}", n, "model.length_chunks=1"),
        "st": lambda n: st_cmd(tmp, f"st{n}", n, examples),
    }
    runs = [(name, n) for name in contenders for n in (long, short) if not (name == "project_plain" and n == short)]
    wall, steps, examples_run = {r: [] for r in runs}, {r: [] for r in runs}, {r: [] for r in runs}
    for r in range(rounds):
        for name, n in runs[r % len(runs):] + runs[:r % len(runs)]:
            seconds = _timed(contenders[name](n), tmp / f"{name}{n}.log")
            clock = json.loads((tmp / f"{name}{n}.json").read_text())
            full = [t for k, (t, size) in enumerate(zip(clock["times"], clock["sizes"])) if k >= 2 and size == BATCH]
            wall[name, n].append(seconds)
            examples_run[name, n].append(sum(clock["sizes"]))
            steps[name, n].append(statistics.median(full) if full else float("nan"))
            log(f"    round {r + 1} {name} {n} steps: wall {seconds:.1f} s, step median {steps[name, n][-1]:.2f} s")
    # per BATCH examples: the project's epochs end in a short batch (data/sample: 54 queries, 3 x 16 + 6)
    per_step = {name: [BATCH * (a - b) / (x - y) for a, b, x, y in zip(
        wall[name, long], wall[name, short], examples_run[name, long], examples_run[name, short])]
        for name in ("project", "st")}
    ops = {}
    for name, cmd in (("project_plain", project_cmd(tmp, "prof_project_plain", 6, "model.length_chunks=1",
                                                    clock=f"profile={profile}")),
                      ("st", st_cmd(tmp, "prof_st", 6, examples, profile))):
        _timed(cmd, tmp / f"prof_{name}.log")
        ops[name] = json.loads((tmp / f"prof_{name}.json").read_text())["ops"]
    return {"long": long, "short": short, "rounds": rounds, "profile": profile,
            "wall": {f"{k[0]}@{k[1]}": v for k, v in wall.items()},
            "step": {f"{k[0]}@{k[1]}": v for k, v in steps.items()}, "per_step": per_step, "ops": ops,
            "folder": str(tmp)}


def markdown(res: dict) -> str:
    long, step, per = res["long"], res["step"], res["per_step"]
    ratio = lambda a, b: [y / x for x, y in zip(a, b)]
    rows = [("the step as the loop runs it, length chunks on (as shipped); median of the steps after 2",
             step[f"project@{long}"], step[f"st@{long}"]),
            ("the same, `model.length_chunks=1` (one padded batch, what sentence-transformers does)",
             step[f"project_plain@{long}"], step[f"st@{long}"]),
            (f"a whole run: process wall time at {long} steps - at {res['short']}, per {BATCH} examples trained on",
             per["project"], per["st"])]
    table = "\n".join(f"| {what} | {fmt(a)} | {fmt(b)} | {fmt(ratio(a, b))} |" for what, a, b in rows)
    names = {o["op"] for side in res["ops"].values() for o in side}
    by = {side: {o["op"]: o for o in ops} for side, ops in res["ops"].items()}
    steps = int(res["profile"].split("-")[1]) - int(res["profile"].split("-")[0]) + 1
    top = sorted(names, key=lambda n: -max(by[s].get(n, {"self_ms": 0})["self_ms"] for s in by))[:12]
    op_rows = "\n".join(
        f"| `{n}` | " + " | ".join(f"{by[s][n]['self_ms'] / steps:.0f}" if n in by[s] else "-"
                                   for s in ("project_plain", "st")) + " |" for n in top)
    total = {s: sum(o["self_ms"] for o in ops) / steps for s, ops in res["ops"].items()}
    share = by["st"].get("aten::bernoulli_", {"self_ms": 0})["self_ms"] / steps / max(total["st"], 1e-9)
    return f"""## Whole run

What a user sees, each side its own process started from the shell, on the same examples: `python run.py
{' '.join(PROJECT)}` (data/sample, MarginMSE, batch {BATCH}, passages up to 256 tokens, fp32, everything else as
shipped: 2 DataLoader workers, W&B offline, the rich progress bar, checkpoints) against a
`SentenceTransformerTrainer` script (MarginMSELoss, batch {BATCH}, lr 2e-5, 10% warmup, fp32, its defaults:
tokenising in the main process; the model saved at the end), trained on the very rows the project's sampler drew,
in its own shuffled order. Step = one optimizer step as each loop runs it (Lightning's batch start to end;
the trainer's step begin to end; the project's short last batch of each epoch left out of the step median, and the whole run
counted per {BATCH} examples). {res['rounds']} rounds, contenders in rotated order; seconds, median (min-max)
over rounds; the ratio (sentence-transformers / project: above 1, the project is faster) is taken round by round.
`python -m benchmarks.whole_run`.

| what | project (s) | sentence-transformers (s) | ratio |
|---|---|---|---|
{table}

Where a plain step's time goes, torch.profiler over steps {res['profile']} (self CPU ms per step, top operators;
profiling slows both alike): project with `model.length_chunks=1`, the top operators {total['project_plain']:.0f} ms a step;
sentence-transformers {total['st']:.0f} ms.

| operator | project, plain | sentence-transformers |
|---|---|---|
{op_rows}

Per-epoch costs: the DataLoader workers persist across epochs (`persistent_workers`, unless negatives refresh).
Forked anew each epoch, as before 2026-12-06, they made each epoch's first step 3.5-4.0 s instead of ~2.4 s on
the sample's 4-step epochs (two runs of 20 steps each way, side by side: 68 s vs 57 s of process wall time): the
fork's copy-on-write pages and the new workers' tokenising landed on the step. A checkpoint write costs ~0.6 s
(last.ckpt with the optimizer state, 270 MB; Lightning's SimpleProfiler), once per validation: nothing to cut
at one validation per epoch. The validation pass embeds each distinct query and passage of a batch once.

The plain steps are the same computation (BERT's matrix products, its dropout, fused AdamW on both sides) at the
same cost: the project's step is faster only through its length chunks, which process fewer padded tokens. The
largest item after the matrix products is `aten::bernoulli_`, dropout's masks ({share:.0%} of sentence-transformers'
plain step): torch draws them from one serial CPU generator, ~15 ns a number, on the attention probabilities
(batch x heads x length^2) and the hidden states. numpy's PCG64 makes the same Bernoulli(0.9) mask ~3x faster,
but it would be another random stream than the one sentence-transformers and the project share (a run would no
longer follow `seed` through torch alone); left as it is. On a GPU the masks come from a parallel generator.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="rounds", choices=["rounds", "st"])
    parser.add_argument("--examples"), parser.add_argument("--steps", type=int), parser.add_argument("--out")
    parser.add_argument("--profile"), parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.what == "st":
        st_train(args.examples, args.steps, args.out, args.profile)
    else:
        result = run(rounds=args.rounds)
        Path(result["folder"], "result.json").write_text(json.dumps(result))
        print(markdown(result))
