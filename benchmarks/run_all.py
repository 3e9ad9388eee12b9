"""`make bench`: the benchmarks in one process, then BENCHMARKS.md rewritten with the results.

    python -m benchmarks.run_all                     # training, evaluation, hotpath, profiles
    python -m benchmarks.run_all --only compile      # torch.compile alone (minutes of compiling on CPU)
    python -m benchmarks.run_all --quick --out B.md  # tiny sizes, one round: checks that everything runs

Each suite has a time budget: its contenders run in rounds (at least 2) until the budget is spent, so a loaded
machine gets fewer rounds rather than an open-ended run. Sections this run does not write (`## Data pipeline`,
from `make bench-data`; a suite left out with --only) are carried over from the existing file; every section
ends with the date and load it was measured at.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, setup

DEFAULT = ("training", "whole_run", "evaluation", "hotpath", "profiles", "mining")
ORDER = ("Training throughput", "Whole run", "Evaluation throughput", "Hot-path effects", "torch.compile", "Profiles",
         "Mining", "SciFact: time to a trained model", "Data pipeline")
PLACEHOLDER = {
    "Data pipeline": "## Data pipeline\n\nNot measured yet: `make bench-data` fills this section.\n",
    "torch.compile": "## torch.compile\n\nNot measured yet: `python -m benchmarks.run_all --only compile` "
                     "(compiling takes minutes on CPU).\n",
    "SciFact: time to a trained model": "## SciFact: time to a trained model\n\nNot measured yet: "
                                        "`make bench-scifact` (about 4 hours on 2 cores).\n",
}


def suites(quick: bool, passages: int, batch_size: int) -> dict:
    """name -> () -> markdown. Quick: tiny sizes and one round, for the smoke test."""
    from benchmarks import evaluation, hotpath, mining, profiles, scifact, training, whole_run

    once = {"min_rounds": 1, "max_rounds": 1, "budget_s": 0}
    if quick:
        return {
            "training": lambda log: training.markdown(training.run(batch_size=2, steps=1, log=log, **once)),
            "whole_run": lambda log: whole_run.markdown(whole_run.run(long=4, short=3, rounds=1, profile="1-1",
                                                                      log=log)),
            "evaluation": lambda log: evaluation.markdown(
                evaluation.run(num_passages=8, num_pairs=8, batch_size=4, log=log, compile_=False, **once)),
            "hotpath": lambda log: hotpath.markdown(
                hotpath.run(batch_size=2, steps=1, num_passages=8, log=log, **once)),
            "profiles": lambda log: profiles.markdown(profiles.run(batch_size=2, num_passages=8, log=log)),
            "compile": lambda log: hotpath.compile_markdown(
                hotpath.compile_run(batch_size=2, log=log, **once)),
            "mining": lambda log: mining.markdown(mining.run(sizes=(2000,), side_passages=8, log=log, **once)),
            "scifact": lambda log: "## SciFact: time to a trained model\n\nNot part of --quick.\n",
        }
    return {
        "training": lambda log: training.markdown(training.run(batch_size=batch_size, budget_s=600, log=log)),
        "whole_run": lambda log: whole_run.markdown(whole_run.run(log=log)),  # ~15 min: processes from the shell
        "evaluation": lambda log: evaluation.markdown(
            evaluation.run(num_passages=passages, num_pairs=passages, budget_s=600, min_rounds=3, log=log)),
        "hotpath": lambda log: hotpath.markdown(hotpath.run(batch_size=batch_size, budget_s=240, log=log)),
        "profiles": lambda log: profiles.markdown(profiles.run(batch_size=batch_size, log=log)),
        "compile": lambda log: hotpath.compile_markdown(hotpath.compile_run(log=log)),
        "mining": lambda log: mining.markdown(mining.run(log=log)),
        "scifact": lambda log: scifact.markdown(scifact.run(epochs=4, log=log)),  # about 4 hours: make bench-scifact
    }


def sections(text: str) -> dict[str, str]:
    """'## Title' -> the section's text (heading included), up to the next '## '."""
    parts = re.split(r"(?m)^(?=## )", text)
    return {p.splitlines()[0][3:].strip(): p.rstrip() + "\n" for p in parts if p.startswith("## ")}


def merge(old_text: str, new: dict[str, str]) -> str:
    """New sections replace old ones of the same title; the others stay; known titles first, in ORDER."""
    merged = {**sections(old_text), **new}
    for title, text in PLACEHOLDER.items():
        merged.setdefault(title, text)
    titles = [t for t in ORDER if t in merged] + [t for t in merged if t not in ORDER]
    return "\n".join(merged[t] for t in titles)


def _load(la) -> str:
    return " / ".join(f"{x:.1f}" for x in la)


def header(info: dict, seconds: float, quick: bool) -> str:
    v = info["versions"]
    mode = " in --quick mode: tiny sizes, not figures to quote" if quick else ""
    return f"""# Benchmarks

Written by `make bench` (`python -m benchmarks.run_all`){mode}. Last run: {info['date']}, {seconds / 60:.1f}
minutes.

| machine | |
|---|---|
| CPU | {info['cpu']} |
| cores | {info['cores']} |
| CPU bf16 units | {info.get('cpu_bf16', 'unknown')} |
| torch threads | {info['torch_threads']} (`torch.set_num_threads`, every contender) |
| load average (1/5/15 min) at the start | {_load(info['load_average'])} |
| Python | {info['python']} |
| torch | {v['torch']} |
| transformers | {v['transformers']} |
| sentence-transformers | {v['sentence-transformers']} |
| pytorch-lightning | {v['pytorch-lightning']} (the `lightning` package: {v['lightning']}) |
| tokenizers / faiss-cpu / numpy | {v['tokenizers']} / {v['faiss-cpu']} / {v['numpy']} |

The machine is shared with other work (see the load averages), so absolute figures are noisy. The contenders
of each comparison run interleaved in one process (A B C, B C A, ...), so drift hits all of them: read the
ratios, each taken round by round. Every figure is a median over rounds with its min-max.
"""


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help="comma-separated suites: training, whole_run, evaluation, hotpath, profiles, mining, "
                             "compile, scifact")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--passages", type=int, default=512,
                        help="passages to encode, and cross-encoder pairs to score")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch: queries per step")
    args = parser.parse_args(argv)
    setup()
    start, info = time.perf_counter(), machine()
    available = suites(args.quick, args.passages, args.batch_size)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in available]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(available)}")

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    new = {}
    for name in chosen:
        text = available[name](log)
        stamp = f"\n_Measured {time.strftime('%Y-%m-%d %H:%M %Z')}, load average {_load(os.getloadavg())}._\n"
        new.update({title: body + stamp for title, body in sections(text).items()})
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    args.out.write_text(header(info, time.perf_counter() - start, args.quick) + "\n" + merge(old, new),
                        encoding="utf-8")
    log(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
