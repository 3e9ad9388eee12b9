"""Where the time goes: Lightning's per-hook timings of the project's training step, and the top torch
operators of the project's encoding. `python -m benchmarks.profiles` runs it alone."""
from __future__ import annotations

from benchmarks.common import DOC_LEN, QUERY_LEN, Stopwatch


def lightning_hooks(batch_size: int = 8, steps: int = 3) -> dict[str, float]:
    """Mean seconds per step of the parts of the project's Lightning step (pytorch_lightning's
    SimpleProfiler), the first (warmup) step left out."""
    import tempfile

    from pytorch_lightning.profilers import SimpleProfiler

    from benchmarks.training import project, windows

    examples, _, _ = windows(batch_size, 1, steps - 1)
    with tempfile.TemporaryDirectory() as tmp:  # its report goes to a file there, not to stdout
        profiler = SimpleProfiler(dirpath=tmp, filename="fit")
        project(examples, batch_size, 1, profiler=profiler)  # as shipped: dropout on, fused AdamW

    def mean(action):  # SimpleProfiler's action names, e.g. "[Strategy]SingleDeviceStrategy.backward"
        durations = next((d for name, d in profiler.recorded_durations.items()
                          if name == action or name.endswith("." + action)), [0.0])
        steady = durations[1:] or durations
        return sum(steady) / len(steady)

    forward, backward, clip = mean("training_step"), mean("backward"), mean("configure_gradient_clipping")
    optimizer_step, batch = mean("optimizer_step"), mean("run_training_batch")
    zero_grad = mean("optimizer_zero_grad")
    # optimizer_step runs Lightning's closure (forward, zero_grad, backward) and clipping before AdamW itself.
    return {"forward (`training_step`: embed, loss, log)": forward, "backward": backward,
            "gradient clipping": clip, "zero_grad": zero_grad,
            "AdamW step (rest of `optimizer_step`)": optimizer_step - forward - backward - clip - zero_grad,
            "other Lightning work in the step": batch - optimizer_step,
            "waiting for the next batch (`train_dataloader_next`)": mean("train_dataloader_next")}


def encode_ops(num_passages: int = 64, batch_size: int = 32) -> tuple[list[tuple[str, float]], float]:
    """Top operators by self CPU time (share of the total) while the project encodes passages."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import BACKBONE, passages
    from marco_lightning.models import BiEncoder
    from marco_lightning.retrieval import encode

    model = BiEncoder(BACKBONE, similarity="dot", max_query_length=QUERY_LEN, max_doc_length=DOC_LEN).eval()
    texts = list(passages(limit=num_passages).values())
    encode(model, texts[:batch_size], batch_size)
    with profile(activities=[ProfilerActivity.CPU]) as prof, Stopwatch() as sw:
        encode(model, texts, batch_size)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return [(e.key, e.self_cpu_time_total / total) for e in top], sw.seconds


def run(batch_size: int = 8, num_passages: int = 32, log=print) -> dict:
    log("profiles: Lightning hooks of a short fit, torch operators of encoding")
    hooks = lightning_hooks(batch_size)
    ops, seconds = encode_ops(num_passages)
    return {"hooks": hooks, "ops": ops, "encode_seconds": seconds, "batch_size": batch_size,
            "num_passages": num_passages}


def markdown(res: dict) -> str:
    step = sum(res["hooks"].values())
    hooks = "\n".join(f"| {name} | {1000 * sec:.0f} | {100 * sec / step:.1f}% |"
                      for name, sec in res["hooks"].items())
    ops = "\n".join(f"| `{name}` | {100 * share:.0f}% |" for name, share in res["ops"])
    adamw_share = next(sec for name, sec in res["hooks"].items() if name.startswith("AdamW")) / step
    return f"""## Profiles

The project's training step under Lightning's `SimpleProfiler` (batch {res['batch_size']}, fp32, Collator in 2
workers, dropout on, fused AdamW, as shipped; means over the steps after the first): what Lightning itself adds
is the "other" row; the rest is the model's work, the optimizer, and the wait for the workers.

| part of a step | ms | share |
|---|---|---|
{hooks}

What stands between the project and more speed at equal precision. Training: the model's forward and backward
are the same computation as in sentence-transformers and the bare loop, and they are nearly the whole step;
Lightning's own work is the "other" row, the optimizer (fused AdamW, {100 * adamw_share:.0f}% of a step) and the
wait for the workers are small. So at equal batches the project can only tie (b) and (c); beyond that only
fewer tokens help (length grouping), or a lower precision (bf16-mixed, under Hot-path effects). Evaluation: the
project batches in length order as sentence-transformers does, so both do the same work (Evaluation
throughput); the operator profile below shows where that time goes.

torch.profiler while the project encodes {res['num_passages']} passages (self CPU time, top operators). The
matrix multiplications (`aten::addmm`, `aten::mm`) and most element-wise work scale with the tokens processed,
padding included: fewer padded tokens (length order) is the lever for encoding and re-ranking.

| operator | share of self CPU time |
|---|---|
{ops}
"""


if __name__ == "__main__":
    from benchmarks.common import setup

    setup()
    print(markdown(run()))
