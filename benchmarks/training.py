"""Training throughput (queries/s): this project's Lightning step vs sentence-transformers vs bare PyTorch.

Every contender trains all-MiniLM-L6-v2 (real weights) on the same real (query, positive, BM25 negative)
examples, query length 32, passage length 256 (all-MiniLM-L6-v2's max_seq_length, the issue's setting), AdamW lr
2e-5 wd 0.01, grad-norm clip 1.0, a linear schedule.
`python -m benchmarks.training` runs it alone.
"""
from __future__ import annotations

import random
import time
from functools import lru_cache, partial

from benchmarks.common import BACKBONE, QUERY_LEN, backbone_path, fmt, interleaved

LR, WD, CLIP = 2e-5, 0.01, 1.0
DOC_LEN = 256  # the model's own max_seq_length: what a user trains with (the other suites keep 128 for time)


def _param_groups(named_params):
    """No decay on biases and LayerNorm weights (the project's, and transformers.Trainer's, rule)."""
    decay, no_decay = [], []
    for _, p in named_params:
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone_path())


def doc_lengths(examples) -> list[list[int]]:
    """Token lengths (truncated at DOC_LEN) of each example's passages."""
    return [[min(len(ids), DOC_LEN) for ids in tokenizer()(ds)["input_ids"]] for _, ds, _ in examples]


def length_grouped(examples, batch_size: int, seed: int = 0):
    """`group_by_length=true` on one pool: sort the examples by their longest passage's utf-8 length (the key
    EpochShardSampler gets from TrainDataset.doc_bytes), cut into batches, shuffle the batches."""
    keys = [max(len(d.encode("utf-8")) for d in ds) for _, ds, _ in examples]
    order = [examples[i] for i in sorted(range(len(examples)), key=lambda i: keys[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return [ex for b in batches for ex in b]


def padded_doc_tokens(examples, batch_size: int) -> float:
    """Passage tokens the model processes per example, padding included (dynamic padding, DOC_LEN max)."""
    lengths = doc_lengths(examples)
    return sum(max(max(ex) for ex in lengths[i:i + batch_size]) * 2 * len(lengths[i:i + batch_size])
               for i in range(0, len(lengths), batch_size)) / len(examples)


def chunked_doc_tokens(examples, batch_size: int, chunks: int) -> float:
    """As padded_doc_tokens, with each batch's passages sorted by length and padded in `chunks` groups."""
    lengths, total = doc_lengths(examples), 0
    for i in range(0, len(lengths), batch_size):
        docs = sorted((ln for ex in lengths[i:i + batch_size] for ln in ex), reverse=True)
        size = -(-len(docs) // chunks)
        total += sum(docs[s] * len(docs[s:s + size]) for s in range(0, len(docs), size))
    return total / len(examples)


def windows(batch_size: int, warmup: int, steps: int, pool_batches: int = 64, seed: int = 0):
    """(random, grouped, pool): the same warmup batch(es), then the same timed examples batched at random or
    by length. The timed examples are `steps` batches of a length-grouped pool of `pool_batches` batches,
    taken at evenly spaced quantiles of their padded length: the grouped window is as tight, and as long on
    average, as the batches of a real run with a buffer that size."""
    from benchmarks.common import train_examples

    examples = train_examples((pool_batches + warmup) * batch_size, seed=seed)
    cut = warmup * batch_size
    head, pool = examples[:cut], length_grouped(examples[cut:], batch_size, seed)
    batches = sorted((pool[i:i + batch_size] for i in range(0, len(pool), batch_size)),
                     key=lambda b: padded_doc_tokens(b, batch_size))
    grouped = [ex for k in range(steps) for ex in batches[int((k + 0.5) * len(batches) / steps)]]
    return head + random.Random(seed).sample(grouped, len(grouped)), head + grouped, pool


# ---------------------------------------------------------------- (a) this project, driven by Lightning
def project(examples, batch_size: int, warmup: int, workers: int = 2, precision: str = "32-true",
            fused: bool = True, others: dict | None = None, profiler=None,
            length_chunks: int = 4) -> dict[str, list[float]]:
    """RetrieverModule (MarginMSE) in a real pytorch_lightning.Trainer fed by the project's Collator, with
    the config's defaults: dropout on (the module's on_fit_start), fused AdamW (`optimizer.fused`).

    Returns the seconds of each timed step ("a": from the end of one step to the end of the next, data wait
    included), and of the `others` (steppers): after each timed step of Lightning each of them takes one step,
    so every contender's steps sit side by side in time (drift on a shared machine hits all of them)."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from marco_lightning.losses import MarginMSELoss
    from marco_lightning.models import BiEncoder
    from marco_lightning.module import RetrieverModule

    class Interleave(pl.Callback):
        def __init__(self):
            self.times, self.mark = {"a": [], **{name: [] for name in others or {}}}, 0.0

        def on_train_start(self, *args):
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            timed = batch_idx >= warmup
            if timed:
                self.times["a"].append(time.perf_counter() - self.mark)
            names, k = list(others or {}), batch_idx % max(len(others or {}), 1)
            for name in names[k:] + names[:k]:  # rotated; during warmup untimed: their first step after
                seconds = others[name].step()  # Lightning's set-up runs slow too
                if timed:
                    self.times[name].append(seconds)
            self.mark = time.perf_counter()

    model = BiEncoder(BACKBONE, similarity="dot", max_query_length=QUERY_LEN, max_doc_length=DOC_LEN,
                      length_chunks=length_chunks)
    optimizer = partial(torch.optim.AdamW, lr=LR, weight_decay=WD, fused=fused)
    module = RetrieverModule(model, MarginMSELoss(), optimizer, warmup_steps=0.1,
                             val_qrels={"0": {"0": 2}})  # never validated; the metric only needs some qrels
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=model.collator().train,
                        num_workers=workers)
    clock = Interleave()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=len(loader),
                         gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[clock], profiler=profiler)
    trainer.fit(module, train_dataloaders=loader)
    return clock.times


# ---------------------------------------------------------------- steppers: one timed step at a time
REPEAT = 10_000  # the DataLoaders of the steppers cycle over their examples


def _prime(model, optimizer, forward) -> None:
    """Untimed first-call costs: the optimizer's state (a step on zero gradients) and a first forward."""
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        forward()


def _timed_update(loss, model, optimizer, scheduler, start: float) -> float:
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def st_bi_encoder(max_seq_length: int = DOC_LEN):
    """all-MiniLM-L6-v2 as the project exports it (Transformer + mean Pooling, no Normalize)."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(backbone_path(), max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[transformer, models.Pooling(384, "mean")], device="cpu")


class SentenceTransformersStepper:
    """(b) SentenceTransformerTrainer's step without the Trainer object (its `accelerate` and `datasets` are
    not installed): its data collator in DataLoader workers, `collect_features`, its loss, then what
    transformers.Trainer does by default: backward, clip 1.0, fused AdamW (the default for torch >= 2.8), a
    linear schedule."""

    def __init__(self, examples, batch_size: int, loss: str = "margin_mse", workers: int = 2, bf16: bool = False):
        import torch
        from sentence_transformers import losses
        from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
        from torch.utils.data import DataLoader
        from transformers import get_linear_schedule_with_warmup

        self.model, self.bf16 = st_bi_encoder(), bf16
        self.model.train()
        if loss == "margin_mse":
            self.loss = losses.MarginMSELoss(self.model)
            rows = [{"query": q, "positive": d[0], "negative": d[1], "label": t} for q, d, t in examples]
        else:
            self.loss = losses.MultipleNegativesRankingLoss(self.model)  # scale 20, cosine: as the recipe
            rows = [{"query": q, "positive": d[0], "negative": d[1]} for q, d, _ in examples]
        collate = SentenceTransformerDataCollator(preprocess_fn=self.model.preprocess)
        # Workers start, and prefetch, from here on.
        self.batches = iter(DataLoader(rows * REPEAT, batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate))
        self.optimizer = torch.optim.AdamW(_param_groups(self.model.named_parameters()), lr=LR, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 100, 100_000)
        queries = self.model.preprocess([q for q, _, _ in examples[:batch_size]])
        _prime(self.model, self.optimizer, lambda: self.model(queries))

    def step(self) -> float:
        import torch
        from sentence_transformers import SentenceTransformerTrainer

        start = time.perf_counter()
        features, labels = SentenceTransformerTrainer.collect_features(None, next(self.batches))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # transformers.Trainer's bf16=True
            loss = self.loss(features, labels)
        return _timed_update(loss, self.model, self.optimizer, self.scheduler, start)


class BareStepper:
    """(c) a bare PyTorch loop: forward, MarginMSE, backward, clip, AdamW (torch's default, as the project), a
    linear schedule. Batches tokenised in advance, or (workers=N) made by the project's Collator in a
    DataLoader with N workers (0: in the main process). bf16: the forward under bf16 autocast, as
    Lightning's bf16-mixed does.

    doc_chunks > 1 (a proposal): each batch's passages sorted by length and embedded in that many chunks, each
    padded to its own longest, then put back in order: same batch, same loss, fewer padded tokens."""

    def __init__(self, examples, batch_size: int, padding="longest", attn: str = "sdpa", doc_chunks: int = 1,
                 workers: int | None = None, bf16: bool = False, model=None):
        import torch
        from torch.utils.data import DataLoader
        from transformers import AutoModel, get_linear_schedule_with_warmup

        from marco_lightning.models import Collator

        tok = tokenizer()

        def tokenize(texts, length):
            return dict(tok(texts, padding=padding, truncation=True, max_length=length, return_tensors="pt"))

        def docs(texts):
            if doc_chunks == 1:
                return [tokenize(texts, DOC_LEN)], None
            order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i])["input_ids"]))
            size = -(-len(texts) // doc_chunks)
            chunks = [tokenize([texts[i] for i in order[s:s + size]], DOC_LEN)
                      for s in range(0, len(texts), size)]
            return chunks, torch.argsort(torch.tensor(order))

        if workers is None:
            chunked = (examples[i:i + batch_size] for i in range(0, len(examples), batch_size))
            self.batches = [(tokenize([q for q, _, _ in b], QUERY_LEN),
                             docs([d for _, ds, _ in b for d in ds]), torch.tensor([t for _, _, t in b]))
                            for b in chunked]
            self.next = lambda: self.batches[self.i % len(self.batches)]
        else:
            loader = iter(DataLoader(examples * REPEAT, batch_size=batch_size, num_workers=workers,
                                     collate_fn=Collator(tok, "bi", QUERY_LEN, DOC_LEN).train))

            def fetch():
                batch = next(loader)
                return batch["query"], ([batch["docs"]], None), batch["teacher"]
            self.next = fetch
        if model is None:
            model = AutoModel.from_pretrained(backbone_path(), attn_implementation=attn)
            model.pooler = None  # unused, as in the project's BiEncoder
        self.model, self.bf16, self.i = model.train(), bf16, 0
        self.optimizer = torch.optim.AdamW(_param_groups(self.model.named_parameters()), lr=LR)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 100, 100_000)
        queries = tokenize([q for q, _, _ in examples[:batch_size]], QUERY_LEN)
        _prime(self.model, self.optimizer, lambda: self.model(**queries))

    def embed(self, features):
        hidden = self.model(**features).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        queries, (docs, inverse), teacher = self.next()
        self.i += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # as Lightning's bf16-mixed
            q = self.embed(queries)
            d = torch.cat([self.embed(c) for c in docs])
        d = (d if inverse is None else d[inverse]).float()
        q = q.float()
        scores = torch.einsum("bd,bnd->bn", q, d.view(q.shape[0], -1, q.shape[1]))
        loss = F.mse_loss(scores[:, 0] - scores[:, 1], teacher[:, 0] - teacher[:, 1])
        return _timed_update(loss, self.model, self.optimizer, self.scheduler, start)


CONTENDERS = {
    "a": "(a) project as shipped (random batches, `model.length_chunks=4`), fp32",
    "a_grouped": "(a) with `group_by_length=true` (batches of alike length)",
    "a_plain": "(a) with `model.length_chunks=1` (one padded batch: what (b) does)",
    "a_bf16": "(a) as shipped with `trainer.precision=bf16-mixed`",
    "b_mmse": "(b) sentence-transformers, MarginMSELoss, collator in 2 workers, fp32",
    "b_bf16": "(b) the same under bf16 autocast (SentenceTransformerTrainingArguments(bf16=True))",
    "c": "(c) bare PyTorch loop, tokenised in advance, one padded batch, fp32",
}


def run(batch_size: int = 16, warmup: int = 1, steps: int = 2, budget_s: float = 600, min_rounds: int = 2,
        max_rounds: int = 5, log=print) -> dict:
    """Each round: one Lightning run per variant of (a), in rotated order; after each of its timed steps the
    steppers take one step each (in rotated order): (b) at both precisions and (c) beside a and a_bf16, (c) beside
    the others. Ratios are taken within a run (side by side), and between runs through (c), the reference every
    run shares: a_plain/a = (a_plain/c) / (a/c) of the same round."""
    rand, grouped, _ = windows(batch_size, warmup, steps)
    window = rand[warmup * batch_size:]
    log(f"training: batch {batch_size} queries x (1 pos + 1 neg), {DOC_LEN} tokens, {warmup} warmup + {steps} timed")
    c = BareStepper(window, batch_size)
    beside = {"b_mmse": SentenceTransformersStepper(window, batch_size),
              "b_bf16": SentenceTransformersStepper(window, batch_size, bf16=True), "c": c}
    variants = {"a": lambda: project(rand, batch_size, warmup, others=beside),
                "a_grouped": lambda: project(grouped, batch_size, warmup, others={"c": c}),
                "a_plain": lambda: project(rand, batch_size, warmup, others={"c": c}, length_chunks=1),
                "a_bf16": lambda: project(rand, batch_size, warmup, precision="bf16-mixed", others=beside)}
    runs = interleaved(variants, min_rounds, max_rounds, budget_s, log,
                       show=lambda t: " ".join(f"{k} {batch_size * len(v) / sum(v):.3g}/s"
                                               for k, v in t.items()))
    qps, vs_c = {k: [] for k in CONTENDERS}, {}
    for variant, results in runs.items():
        for times in results:
            qps[variant].append(batch_size * len(times["a"]) / sum(times["a"]))
            if variant == "a":  # the steppers' own rates: from the run they all sit beside
                for name in ("b_mmse", "b_bf16", "c"):
                    qps[name].append(batch_size * len(times[name]) / sum(times[name]))
        vs_c[variant] = [sum(t["c"]) / sum(t["a"]) for t in results]  # throughput variant / c, per round

    def side_by_side(variant, other):
        return [sum(t[other]) / sum(t["a"]) for t in runs[variant]]

    ratio = {"a/b_mmse": side_by_side("a", "b_mmse"), "a_bf16/b_bf16": side_by_side("a_bf16", "b_bf16"),
             "a_bf16/b_mmse": side_by_side("a_bf16", "b_mmse"), "b_bf16/b_mmse": [
                 sum(t["b_mmse"]) / sum(t["b_bf16"]) for t in runs["a"]], "a/c": vs_c["a"]}
    ratio["a_grouped/a"] = [x / y for x, y in zip(vs_c["a_grouped"], vs_c["a"])]
    ratio["a/a_plain"] = [x / y for x, y in zip(vs_c["a"], vs_c["a_plain"])]
    ratio["a_plain/c"] = vs_c["a_plain"]
    cut = warmup * batch_size
    lengths = doc_lengths(window)
    tokens = {"real": sum(map(sum, lengths)) / len(lengths), "random": padded_doc_tokens(window, batch_size),
              "grouped": padded_doc_tokens(grouped[cut:], batch_size),
              "random_chunks": chunked_doc_tokens(window, batch_size, 4),
              "grouped_chunks": chunked_doc_tokens(grouped[cut:], batch_size, 4)}
    return {"batch_size": batch_size, "warmup": warmup, "steps": steps, "rounds": len(runs["a"]), "qps": qps,
            "ratio": ratio, "tokens": tokens}


def markdown(res: dict) -> str:
    v, r, t = res["qps"], res["ratio"], res["tokens"]
    rows = "\n".join(f"| {CONTENDERS[k]} | {fmt(v[k])} |" for k in CONTENDERS)
    targets = {"a/b_mmse": ">= 1.5 (equal precision, fp32)", "a_bf16/b_bf16": "(equal precision, bf16)",
               "a_bf16/b_mmse": "(the documented bf16 option vs ST's default fp32)",
               "b_bf16/b_mmse": "(what bf16 gives sentence-transformers)",
               "a_grouped/a": "(what length grouping adds)", "a/a_plain": "(what length chunks give)", "a/c": "", "a_plain/c": ">= 0.95 (Lightning's overhead)"}
    ratios_rows = "\n".join(f"| {k} | {fmt(r[k])} | {target} |" for k, target in targets.items())
    return f"""## Training throughput

all-MiniLM-L6-v2 (real weights), fp32 on CPU unless said, batch {res['batch_size']} queries x (1 positive + 1
BM25 negative), query 32 / passage {DOC_LEN} tokens (the model's max_seq_length), AdamW lr 2e-5 wd 0.01, grad-norm
clip 1.0, linear schedule, the same real TREC DL examples for every contender. Each round runs every variant of
(a) in a fresh `pytorch_lightning.Trainer` (order rotated each round; {res['warmup']} warmup step untimed, then
{res['steps']} timed steps, the wait for data included); after each Lightning step (untimed during warmup), (b) at
both precisions and (c) take one step each (order rotated) beside a and a_bf16, and (c) beside the other
variants, on the same examples: the contenders alternate step by step, so load from other processes hits them
alike. {res['rounds']} rounds; queries/s, median (min-max) over runs.

| contender | queries/s |
|---|---|
{rows}

Ratios of throughput, median (min-max) over rounds. `a/b`, `a_bf16/b` and `x/c` are measured side by side within
a run; the others go through (c), the reference every run shares: a/a_plain = (a/c) / (a_plain/c) of one round.

| ratio | median (min-max) | target |
|---|---|---|
{ratios_rows}

Where the speed comes from, at equal precision: fewer padded tokens, nothing else (the profile below shows the
model's forward and backward are ~98% of a step, the same computation in every contender). Passage tokens the
model processes per example, padding included: random batches padded to their longest {t['random']:.0f} (what (b)
and (c) do); random batches in 4 length chunks (as shipped) {t['random_chunks']:.0f}; length-grouped batches
{t['grouped']:.0f}; grouped and chunked {t['grouped_chunks']:.0f}; real tokens {t['real']:.0f}. So the padding bound
at {DOC_LEN} tokens is x{t['random'] / t['real']:.2f} and the shipped default reaches x{t['random'] / t['random_chunks']:.2f}
of it in tokens; attention, quadratic in the padded length, gains more.

- Length chunks (`model.length_chunks=4`, every loss, MNRL too, on by default): inside `BiEncoder.embed_group`
  (`CrossEncoder.candidate_scores`) the batch's passages (pairs) are sorted by length, run in 4 chunks each cut
  to its own longest, and put back in order: the same batch, scores and gradients (a test compares with one
  padded batch), only padding goes.
- Length grouping (`group_by_length=true`, off by default: it adds little on top of the chunks and changes which
  examples share a step; never with MNRL, whose in-batch negatives must stay a random mix): a pool of 64 batches
  is sorted by each example's longest passage (utf-8 bytes), cut into batches, the batches shuffled; its timed
  window is {res['steps']} of those batches at evenly spaced quantiles of their length.
- bf16 (`trainer.precision=bf16-mixed`) pays only where the hardware has bf16 units (GPUs; CPUs with AMX or
  AVX512-BF16, see the machine table): elsewhere torch emulates it, slower than fp32, as the rows above show.

Dropout is on in every contender (the project's module calls `.train()` when fitting starts, because
`from_pretrained` hands the backbone out in eval mode and Lightning 2.x keeps each module's mode). Fused AdamW is
the default (`optimizer.fused: true`); Lightning refuses to clip a fused optimizer's gradients under mixed
precision, so the module clips them itself (a test compares with the for-loop AdamW at 32-true and bf16-mixed).

(b) is SentenceTransformerTrainer's step without the Trainer object: sentence-transformers' own data collator
(in 2 DataLoader workers), `SentenceTransformerTrainer.collect_features`, its `MarginMSELoss` (embedding the
positive and negative columns in one merged forward, as the project does), then transformers.Trainer's
defaults: backward, clip 1.0, fused AdamW (`adamw_torch_fused`, the default for torch >= 2.8), linear schedule;
bf16: its loss under CPU bf16 autocast, as `bf16=True` does. The Trainer object itself adds per-step bookkeeping
of milliseconds. sentence-transformers truncates queries at the model's one max_seq_length ({DOC_LEN}), the
project at 32; real queries are far shorter than 32 tokens, so the tensors are the same.
"""


if __name__ == "__main__":
    from benchmarks.common import setup

    setup()
    print(markdown(run()))
