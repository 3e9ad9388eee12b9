"""Memory of a training run's process tree by how its DataLoader workers start (`datamodule.worker_start`): forked
from the training process, or from the forkserver. Fit's validation loader starts its workers after the first
training epoch, when the training process holds the backward pass's activations; forked workers share those pages,
and training then rewrites them, so the workers end up holding a copy. Peak PSS (each shared page counted once,
split between its sharers) of the whole tree, sampled every 0.2 s, the two runs one after the other.

    python -m benchmarks.worker_memory [--out benchmarks/worker_memory.json] [-- run.py overrides]

The overrides replace the default run (the repository's sample data, MiniLM, batch 32, 4 steps an epoch), e.g. a
BEIR folder with long documents: -- data=beir data.root=DIR experiment=beir_mnrl +trainer.limit_train_batches=4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, children, smaps


def tree(pid: int) -> list[int]:
    """pid and its descendants (the forkserver and its workers descend from the training process too)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += children(p)
        except FileNotFoundError:  # it ended since
            pass
    return out


def pss_kb(pid: int) -> int:
    try:
        return smaps(pid)["Pss"]
    except (FileNotFoundError, ProcessLookupError, PermissionError):  # it ended since
        return 0


DEFAULT_RUN = ["data=sample", "model=minilm", "batch_size=32", "+trainer.limit_train_batches=4", "data.val_top_k=20"]


def measure(worker_start: str, overrides: list[str], work: Path) -> dict:
    cmd = [sys.executable, "run.py", *overrides, "trainer.max_epochs=2", "logger=none",
           "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar",
           f"datamodule.worker_start={worker_start}", f"hydra.run.dir={work / worker_start}"]
    with open(work / f"{worker_start}.log", "w") as log:  # a file, not a pipe: progress bars would fill a pipe
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    peak, peak_main, start = 0, 0, time.perf_counter()
    while proc.poll() is None:
        pids = tree(proc.pid)
        sizes = [pss_kb(p) for p in pids]
        if sum(sizes) > peak:
            peak, peak_main = sum(sizes), sizes[0]
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(work / f'{worker_start}.log').read_text()[-3000:]}")
    return {"peak_pss_gb": round(peak / 2**20, 2), "training_process_gb": round(peak_main / 2**20, 2),
            "seconds": round(time.perf_counter() - start, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", default=DEFAULT_RUN)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "worker_memory.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {start: measure(start, args.overrides, Path(tmp)) for start in ("fork", "forkserver")}
    res["run"] = args.overrides
    res["fork_over_forkserver"] = round(res["fork"]["peak_pss_gb"] / res["forkserver"]["peak_pss_gb"], 2)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
