"""Hot-path effects, each measured on its own: attention kernel, padding, AdamW kernel, bf16 autocast, compile.

(Tokenisation in DataLoader workers vs the main process is measured on the project's real Lightning path, in the
training benchmark.) `python -m benchmarks.hotpath` runs it alone.
"""
from __future__ import annotations

import os
import tempfile
import time
from functools import partial

import numpy as np

from benchmarks.common import DOC_LEN, QUERY_LEN, Stopwatch, backbone_path, fmt, interleaved, ratios, spread


def _adamw_step_time(params, steps: int = 3, **kwargs) -> float:
    """Seconds per AdamW step (gradients set; state allocated in an untimed first step)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **kwargs)
    optimizer.step()
    with Stopwatch() as sw:
        for _ in range(steps):
            optimizer.step()
    return sw.seconds / steps


def run(batch_size: int = 8, steps: int = 2, num_passages: int = 96, budget_s: float = 240, min_rounds: int = 2,
        max_rounds: int = 5, adamw_steps: int = 3, log=print) -> dict:
    import torch
    from transformers import AutoModel

    from benchmarks.common import BACKBONE, passages
    from benchmarks.evaluation import encode_sorted
    from benchmarks.training import bare, chunked_doc_tokens, padded_doc_tokens, windows
    from marco_lightning.models import BiEncoder

    res = {}
    examples, _, _ = windows(batch_size, 1, steps)
    models = {attn: AutoModel.from_pretrained(backbone_path(), attn_implementation=attn) for attn in ("sdpa", "eager")}
    log(f"hot path: training steps of batch {batch_size}, 1 warmup + {steps} timed")
    res["train"] = interleaved(
        {"sdpa": lambda: bare(examples, batch_size, 1, model=models["sdpa"]),
         "eager": lambda: bare(examples, batch_size, 1, model=models["eager"]),
         "max_length": lambda: bare(examples, batch_size, 1, padding="max_length", model=models["sdpa"]),
         "chunks": lambda: bare(examples, batch_size, 1, doc_chunks=4, model=models["sdpa"])},
        min_rounds, max_rounds, budget_s * 0.6, log)
    timed = examples[batch_size:]
    res["tokens"] = {"dynamic": padded_doc_tokens(timed, batch_size),
                     "chunks": chunked_doc_tokens(timed, batch_size, 4)}

    params = [p for p in BiEncoder(BACKBONE).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    log("hot path: AdamW step on all-MiniLM-L6-v2's parameters")
    adamw = partial(_adamw_step_time, params, adamw_steps)
    res["adamw"] = interleaved({"for-loop (torch's CPU default; the project)": adamw,
                                "foreach": partial(adamw, foreach=True),
                                "fused (transformers.Trainer's default)": partial(adamw, fused=True)},
                               min_rounds, max_rounds, budget_s * 0.1, log)

    bi = BiEncoder(BACKBONE, max_query_length=QUERY_LEN, max_doc_length=DOC_LEN).eval()
    texts = list(passages(limit=num_passages).values())

    def encode_rate(bf16: bool):
        def go():
            with Stopwatch() as sw, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                encode_sorted(bi, texts, 32)
            return len(texts) / sw.seconds
        return go

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encode_sorted(bi, texts, 32)
    high = encode_sorted(bi, texts, 32)
    cos = (low * high).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(high, axis=1)
    res["bf16_cosine_min"] = float(cos.min())
    log(f"hot path: encoding {len(texts)} passages, fp32 vs bf16 autocast (min cosine fp32/bf16 {cos.min():.4f})")
    res["encode"] = interleaved({"fp32": encode_rate(False), "bf16": encode_rate(True)},
                                min_rounds, max_rounds, budget_s * 0.3, log)
    res["num_passages"], res["batch_size"], res["steps"] = len(texts), batch_size, steps
    return res


def compile_run(batch_size: int = 32, min_rounds: int = 2, max_rounds: int = 3, budget_s: float = 120,
                log=print) -> dict:
    """torch.compile (inductor) of the encoder for inference, at one static shape (batch x 128), vs eager."""
    import torch

    from benchmarks.common import BACKBONE, passages
    from marco_lightning.models import BiEncoder

    bi = BiEncoder(BACKBONE, max_query_length=QUERY_LEN, max_doc_length=DOC_LEN).eval()
    features = dict(bi.tokenizer(list(passages(limit=batch_size).values()), padding="max_length", truncation=True,
                                 max_length=DOC_LEN, return_tensors="pt"))
    encoder = bi.encoder
    # A cold compile, as a first run would see it: inductor's on-disk cache would otherwise hide the cost.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")

    def per_batch(fn, n=3):
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(n):
                fn(**features)
            return (time.perf_counter() - start) / n

    with torch.no_grad():
        encoder(**features)
    compiled = torch.compile(encoder)
    with Stopwatch() as sw, torch.no_grad():
        compiled(**features)
    log(f"hot path: torch.compile took {sw.seconds:.0f} s")
    values = interleaved({"eager": lambda: per_batch(encoder), "compiled": lambda: per_batch(compiled)},
                         min_rounds, max_rounds, budget_s, log)
    return {"compile_s": sw.seconds, "values": values, "batch_size": batch_size}


def markdown(res: dict) -> str:
    train, adamw, enc, tok = res["train"], res["adamw"], res["encode"], res["tokens"]
    step_s = res["batch_size"] / spread(train["sdpa"])[0]
    share = spread(next(iter(adamw.values())))[0] / step_s
    adamw_rows = "\n".join(f"| {k} | {fmt([1000 * x for x in v], 0)} |" for k, v in adamw.items())
    out = f"""## Hot-path effects

Training steps: the bare loop of the training benchmark (batch {res['batch_size']} queries x 2 passages, fp32, AdamW),
1 warmup + {res['steps']} timed steps a run, the same examples for each variant; queries/s, median (min-max).

| variant | queries/s | vs SDPA + dynamic padding |
|---|---|---|
| SDPA attention, dynamic padding (the project's setting) | {fmt(train['sdpa'])} | 1 |
| eager attention (`attn_implementation="eager"`) | {fmt(train['eager'])} | {fmt(ratios(train, 'eager', 'sdpa'))} |
| padding to max length (32 / 128) | {fmt(train['max_length'])} | {fmt(ratios(train, 'max_length', 'sdpa'))} |
| passages embedded in 4 length-sorted chunks (proposal) | {fmt(train['chunks'])} | {fmt(ratios(train, 'chunks', 'sdpa'))} |

At 128 tokens attention is a small share of the work, so the kernel matters little. Dynamic padding saves most on
queries (padded to the batch's longest, far below 32): a batch of {2 * res['batch_size']} random passages almost always holds one
that fills 128 tokens. Chunking (a proposal for `BiEncoder.loss_inputs`): sort the batch's passages by length,
embed them in 4 chunks each padded to its own longest, restore the order; the batch and the loss are unchanged
(so MNRL's in-batch negatives too), only padding goes: passage tokens per example {tok['dynamic']:.0f} -> {tok['chunks']:.0f}.

AdamW step over all-MiniLM-L6-v2's 22.7M parameters (11.7M of them the word embeddings, dense gradients every
step), milliseconds, median (min-max):

| implementation | ms/step |
|---|---|
{adamw_rows}

With the default (for-loop) implementation the optimizer step is about {100 * share:.0f}% of a bare training step
of batch {res['batch_size']} here.

bf16 autocast for inference (the CPU here has AMX; the project enables autocast only on CUDA): encoding
{res['num_passages']} passages in length order, passages/s; embeddings agree with fp32 to cosine >= {res['bf16_cosine_min']:.4f}.

| variant | passages/s |
|---|---|
| fp32 | {fmt(enc['fp32'])} |
| bf16 autocast | {fmt(enc['bf16'])} |
| ratio bf16 / fp32 | {fmt(ratios(enc, 'bf16', 'fp32'))} |
"""
    return out


def compile_markdown(c: dict) -> str:
    return f"""## torch.compile

torch.compile (inductor, default mode) of the encoder for inference at one static shape ({c['batch_size']} passages x
128 tokens), fp32, no grad: compiling took {c['compile_s']:.0f} s. Seconds per batch, median (min-max): eager
{fmt(c['values']['eager'])}, compiled {fmt(c['values']['compiled'])}; speed-up eager / compiled
{fmt(ratios(c['values'], 'eager', 'compiled'))}. Training would recompile for every new padded length (dynamic
padding) or need `dynamic=True`; not worth it on CPU unless the speed-up above is large.
"""


if __name__ == "__main__":
    from benchmarks.common import setup

    setup()
    print(markdown(run()))
