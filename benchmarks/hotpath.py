"""Hot-path effects, each measured on its own: attention kernel, padding, where tokenisation runs, bf16, the
AdamW kernel, and (separately, slow) torch.compile. `python -m benchmarks.hotpath` runs it alone.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.common import DOC_LEN, QUERY_LEN, Stopwatch, backbone_path, fmt, interleaved, ratios, spread


class _AdamWStepper:
    """One AdamW implementation over the given parameters (gradients set): step() times optimizer.step()."""

    def __init__(self, params, **kwargs):
        import torch

        self.optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **kwargs)
        self.optimizer.step()  # untimed: allocates the state

    def step(self) -> float:
        with Stopwatch() as sw:
            self.optimizer.step()
        return sw.seconds


class _EncodeStepper:
    """Encoding passages in length order, fp32 or under bf16 autocast: step() times one pass over batches
    tokenised in advance (the model's work alone; `inference.encode(..., precision="bf16")` is the shipped path)."""

    def __init__(self, model, texts, bf16: bool, batch_size: int = 32):
        from benchmarks.evaluation import length_order

        texts = [texts[i] for i in length_order(texts)]
        collator = model.collator()
        self.batches = [collator._tok(texts[i:i + batch_size], DOC_LEN)
                        for i in range(0, len(texts), batch_size)]
        self.model, self.bf16 = model, bf16

    def embed(self):
        import torch

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return np.concatenate([self.model.output_embedding(f).float().numpy() for f in self.batches])

    def step(self) -> float:
        with Stopwatch() as sw:
            self.embed()
        return sw.seconds


TRAIN_VARIANTS = {
    "sdpa": "SDPA attention, dynamic padding, tokenised in advance (as (c))",
    "eager": 'eager attention (`attn_implementation="eager"`)',
    "max_length": "padding to max length (32 / 256)",
    "chunks": "passages embedded in 4 length-sorted chunks (as `model.length_chunks=4` does)",
    "collate_workers": "the project's Collator in 2 DataLoader workers (the project's default)",
    "collate_main": "the project's Collator in the main process (`num_workers=0`)",
    "bf16": "bf16 autocast, as `trainer.precision=bf16-mixed` (fast only with CPU bf16 units: machine table)",
}


def run(batch_size: int = 8, steps: int = 1, num_passages: int = 64, budget_s: float = 240,
        min_rounds: int = 2, max_rounds: int = 5, log=print) -> dict:
    """Each comparison's variants alternate step by step (see common.interleaved_steps)."""
    import torch
    from transformers import AutoModel

    from benchmarks.common import BACKBONE, interleaved_steps, passages
    from benchmarks.training import BareStepper, chunked_doc_tokens, padded_doc_tokens, windows
    from marco_lightning.models import BiEncoder

    res = {"batch_size": batch_size, "steps": steps}
    window = windows(batch_size, 0, 2)[0]  # two batches; a round of one step each alternates between them
    sdpa, eager = (AutoModel.from_pretrained(backbone_path(), attn_implementation=a)
                   for a in ("sdpa", "eager"))
    sdpa.pooler = eager.pooler = None  # unused, as in the project's BiEncoder
    log(f"hot path: training steps of batch {batch_size}, {steps} a round per variant")
    steppers = {"sdpa": BareStepper(window, batch_size, model=sdpa),
                "eager": BareStepper(window, batch_size, model=eager),
                "max_length": BareStepper(window, batch_size, padding="max_length", model=sdpa),
                "chunks": BareStepper(window, batch_size, doc_chunks=4, model=sdpa),
                "collate_workers": BareStepper(window, batch_size, workers=2, model=sdpa),
                "collate_main": BareStepper(window, batch_size, workers=0, model=sdpa),
                "bf16": BareStepper(window, batch_size, bf16=True, model=sdpa)}
    res["train"] = interleaved_steps(steppers, steps, min_rounds, max_rounds, budget_s * 0.6, log)
    res["tokens"] = {"dynamic": padded_doc_tokens(window, batch_size),
                     "chunks": chunked_doc_tokens(window, batch_size, 4)}
    del steppers, sdpa, eager

    params = list(BiEncoder(BACKBONE, similarity="dot").parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    log("hot path: AdamW step on all-MiniLM-L6-v2's parameters")
    res["adamw"] = interleaved_steps({"for-loop": _AdamWStepper(params),
                                      "foreach": _AdamWStepper(params, foreach=True),
                                      "fused": _AdamWStepper(params, fused=True)},
                                     2, min_rounds, max_rounds, budget_s * 0.1, log)
    del params

    bi = BiEncoder(BACKBONE, similarity="dot", max_query_length=QUERY_LEN, max_doc_length=DOC_LEN).eval()
    texts = list(passages(limit=num_passages).values())
    fp32, bf16 = _EncodeStepper(bi, texts, False), _EncodeStepper(bi, texts, True)
    low, high = bf16.embed(), fp32.embed()
    cos = (low * high).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(high, axis=1)
    res["bf16_cosine_min"], res["num_passages"] = float(cos.min()), len(texts)
    log(f"hot path: encoding {len(texts)} passages, fp32 vs bf16 autocast (min cosine {cos.min():.5f})")
    res["encode"] = interleaved_steps({"fp32": fp32, "bf16": bf16},
                                      1, min_rounds, max_rounds, budget_s * 0.3, log)
    return res


def compile_run(batch_size: int = 32, min_rounds: int = 2, max_rounds: int = 3, budget_s: float = 120,
                log=print) -> dict:
    """torch.compile (inductor) of the encoder for inference, at one static shape (batch x 128), vs eager."""
    import torch
    import torch._inductor.config

    from benchmarks.common import BACKBONE, passages
    from marco_lightning.models import BiEncoder

    bi = BiEncoder(BACKBONE, similarity="dot", max_query_length=QUERY_LEN, max_doc_length=DOC_LEN).eval()
    texts = list(passages(limit=batch_size).values())
    features = dict(bi.tokenizer(texts, padding="max_length", truncation=True, max_length=DOC_LEN,
                                 return_tensors="pt"))
    encoder = bi.st[0].model  # the Hugging Face transformer inside the sentence-transformers model

    def per_batch(fn, n=3):
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(n):
                fn(**features)
            return (time.perf_counter() - start) / n

    with torch.no_grad():
        encoder(**features)
    # A cold compile, as a first run would see it: inductor's on-disk cache would otherwise hide the cost.
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with (tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache,
          torch._inductor.config.patch(freezing=False)):  # plain compile, even after task.compile's rows ran
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            compiled = torch.compile(encoder)
            with Stopwatch() as sw, torch.no_grad():
                compiled(**features)
            log(f"hot path: torch.compile took {sw.seconds:.0f} s")
            contenders = {"eager": lambda: per_batch(encoder), "compiled": lambda: per_batch(compiled)}
            values = interleaved(contenders, min_rounds, max_rounds, budget_s, log)
        finally:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache
    return {"compile_s": sw.seconds, "values": values, "batch_size": batch_size}


def markdown(res: dict) -> str:
    train, adamw, enc, tok, b = res["train"], res["adamw"], res["encode"], res["tokens"], res["batch_size"]

    def qps(name):
        return fmt([b / x for x in train[name]])

    rows = "\n".join(f"| {label} | {qps(k)} | {fmt(ratios(train, 'sdpa', k))} |"
                     for k, label in TRAIN_VARIANTS.items())
    labels = {"for-loop": "for-loop (torch's CPU default; `optimizer.fused=false`)", "foreach": "foreach",
              "fused": "fused (the project's default, as transformers.Trainer's)"}
    adamw_rows = "\n".join(f"| {label} | {fmt([1000 * x for x in adamw[k]], 0)} | "
                           f"{fmt(ratios(adamw, 'for-loop', k))} |" for k, label in labels.items())
    share = spread(adamw["for-loop"])[0] / spread(train["sdpa"])[0]
    return f"""## Hot-path effects

Each comparison's variants alternate step by step (order rotated each step), on the same examples; figures are
medians (min-max) over {len(train['sdpa'])} rounds of {res['steps']} steps per variant, ratios taken round by
round.

Training steps (the bare loop (c): batch {b} queries x 2 passages of up to 256 tokens, fp32, AdamW, clip 1.0):

| variant | queries/s | speed vs the first row |
|---|---|---|
{rows}

What each row changes: the attention kernel (SDPA's fused kernel vs the explicit softmax(QK^T)V); padding to
the batch's longest vs to the maximum (queries gain most: they are far below 32 tokens, while a batch of
{2 * b} random passages often holds a long one); chunking, what `BiEncoder.embed_group` does with
`model.length_chunks=4`: sort the batch's passages by length, embed them in 4 chunks each padded to its own
longest, restore the order, so the batch and the loss are unchanged (MNRL's in-batch negatives too) and only
padding goes (passage tokens per example {tok['dynamic']:.0f} -> {tok['chunks']:.0f}); where the Collator
tokenises (on 2 cores, workers compete with the 2 torch threads); bf16 autocast, which is what Lightning's
`bf16-mixed` does on CPU.

AdamW step over all-MiniLM-L6-v2's 22.7M parameters (11.7M of them the word embeddings, which get dense
gradients every step):

| implementation | ms/step | speed vs for-loop |
|---|---|---|
{adamw_rows}

With the for-loop implementation the optimizer step is about {100 * share:.0f}% of a bare training step of
batch {b}.

bf16 autocast for inference (`task.precision=bf16`; "auto" uses it on CUDA only; on a CPU it pays only with bf16
units, see the machine table): encoding {res['num_passages']} passages in length order; embeddings agree
with fp32 to cosine >= {res['bf16_cosine_min']:.5f}.

| variant | passages/s |
|---|---|
| fp32 | {fmt([res['num_passages'] / x for x in enc['fp32']])} |
| bf16 autocast | {fmt([res['num_passages'] / x for x in enc['bf16']])} |
| speed bf16 / fp32 | {fmt(ratios(enc, 'fp32', 'bf16'))} |
"""


def compile_markdown(c: dict) -> str:
    return f"""## torch.compile

torch.compile (inductor, default mode) of the encoder for inference at one static shape ({c['batch_size']}
passages x 128 tokens), fp32, no grad: compiling took {c['compile_s']:.0f} s. Seconds per batch, median
(min-max): eager {fmt(c['values']['eager'])}, compiled {fmt(c['values']['compiled'])}; speed-up eager /
compiled {fmt(ratios(c['values'], 'eager', 'compiled'))}. Training would recompile for every new padded length
(dynamic padding) or need `dynamic=True`; not worth it on CPU unless the speed-up above is large.
"""


if __name__ == "__main__":
    from benchmarks.common import setup

    setup()
    print(markdown(run()))
