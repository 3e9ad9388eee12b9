"""Training throughput (queries/s): this project's Lightning step vs sentence-transformers vs a bare PyTorch loop.

Every contender trains all-MiniLM-L6-v2 (real weights) on the same real (query, positive, BM25 negative) examples
in the same order, query length 32, passage length 128, AdamW lr 2e-5 wd 0.01, grad-norm clip 1.0, a linear
schedule; each run starts from fresh weights, takes `warmup` steps untimed, then times `steps` steps (data loading
included). `python -m benchmarks.training` runs it alone.
"""
from __future__ import annotations

import random
import time
from functools import lru_cache, partial

from benchmarks.common import BACKBONE, DOC_LEN, QUERY_LEN, backbone_path, fmt, interleaved, ratios

LR, WD, CLIP = 2e-5, 0.01, 1.0


def _per_second(ends: list[float], warmup: int, batch_size: int) -> float:
    """Queries/s over the steps after warmup: from the end of the last warmup step to the end of the last step."""
    return (len(ends) - warmup) * batch_size / (ends[-1] - ends[warmup - 1])


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
    """Token lengths (truncated at 128) of each example's passages."""
    return [[min(len(ids), DOC_LEN) for ids in tokenizer()(ds)["input_ids"]] for _, ds, _ in examples]


def length_grouped(examples, batch_size: int, seed: int = 0):
    """The proposal: sort a buffer of examples by their longer passage's token count, cut it into batches,
    shuffle the batches. Batches then pad to similar lengths instead of to the longest of a random mix.
    (Character counts, as sentence-transformers' encode uses, group less tightly here: ~1.17x fewer padded
    tokens instead of ~1.3x, because the two passages of an example differ.)"""
    keys = [max(ln) for ln in doc_lengths(examples)]
    order = [examples[i] for i in sorted(range(len(examples)), key=lambda i: -keys[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return [ex for b in batches for ex in b]


def padded_doc_tokens(examples, batch_size: int) -> float:
    """Passage tokens the model processes per example, padding included (dynamic padding, 128 max)."""
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
    """(random, grouped, pool): the same warmup batches, then the same timed examples batched at random or by
    length. The timed examples are `steps` batches picked at random from a length-grouped pool of `pool_batches`
    batches, so the grouped window is as tight as in a real run with a buffer that size."""
    from benchmarks.common import train_examples

    examples = train_examples((pool_batches + warmup) * batch_size, seed=seed)
    head, pool = examples[:warmup * batch_size], length_grouped(examples[warmup * batch_size:], batch_size, seed)
    picked = random.Random(seed).sample(range(pool_batches), steps)
    grouped = [ex for i in picked for ex in pool[i * batch_size:(i + 1) * batch_size]]
    return head + random.Random(seed).sample(grouped, len(grouped)), head + grouped, pool


# ---------------------------------------------------------------- (a) this project, driven by Lightning
def project(examples, batch_size: int, warmup: int, workers: int = 2, precision: str = "32-true",
            fused: bool = False, profiler=None) -> float:
    """RetrieverModule (MarginMSE) in a real pytorch_lightning.Trainer fed by the project's Collator in workers."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from marco_lightning.losses import MarginMSELoss
    from marco_lightning.models import BiEncoder
    from marco_lightning.module import RetrieverModule

    class Clock(pl.Callback):
        def __init__(self):
            self.ends = []

        def on_train_batch_end(self, *args):
            self.ends.append(time.perf_counter())

    model = BiEncoder(BACKBONE, max_query_length=QUERY_LEN, max_doc_length=DOC_LEN)
    optimizer = partial(torch.optim.AdamW, lr=LR, weight_decay=WD, **({"fused": True} if fused else {}))
    module = RetrieverModule(model, MarginMSELoss(), optimizer, warmup_steps=0.1,
                             val_qrels={"0": {"0": 2}})  # never validated; the metric only needs some qrels
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=model.collator().train, num_workers=workers)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=len(loader),
                         gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock],
                         profiler=profiler)
    trainer.fit(module, train_dataloaders=loader)
    return _per_second(clock.ends, warmup, batch_size)


# ---------------------------------------------------------------- (b) sentence-transformers
def st_bi_encoder():
    """all-MiniLM-L6-v2 as the project exports it (Transformer + mean Pooling, no Normalize), 128 tokens."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(backbone_path(), max_seq_length=DOC_LEN)
    return SentenceTransformer(modules=[transformer, models.Pooling(384, "mean")], device="cpu")


def sentence_transformers(examples, batch_size: int, warmup: int, loss: str = "margin_mse",
                          workers: int = 2) -> float:
    """SentenceTransformerTrainer's step without the Trainer object (its `accelerate` and `datasets` are not
    installed): its data collator in DataLoader workers, `collect_features`, its loss, then what
    transformers.Trainer does by default: backward, clip 1.0, fused AdamW (the default for torch >= 2.8),
    a linear schedule."""
    import torch
    from sentence_transformers import SentenceTransformerTrainer, losses
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    model = st_bi_encoder()
    model.train()
    if loss == "margin_mse":
        loss_fn = losses.MarginMSELoss(model)
        rows = [{"query": q, "positive": d[0], "negative": d[1], "label": t} for q, d, t in examples]
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model)  # scale 20, cosine: as the recipe
        rows = [{"query": q, "positive": d[0], "negative": d[1]} for q, d, _ in examples]
    loader = DataLoader(rows, batch_size=batch_size, num_workers=workers,
                        collate_fn=SentenceTransformerDataCollator(preprocess_fn=model.preprocess))
    optimizer = torch.optim.AdamW(_param_groups(model.named_parameters()), lr=LR, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, len(loader) // 10), len(loader))
    ends = []
    for batch in loader:
        features, labels = SentenceTransformerTrainer.collect_features(None, batch)
        loss_fn(features, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return _per_second(ends, warmup, batch_size)


# ---------------------------------------------------------------- (c) bare PyTorch
def bare(examples, batch_size: int, warmup: int, padding="longest", attn: str = "sdpa", doc_chunks: int = 1,
         model=None) -> float:
    """Tokenised in advance; forward, MarginMSE, backward, clip, AdamW (torch's default, as the project), schedule.

    doc_chunks > 1 (a proposal): each batch's passages sorted by length and embedded in that many chunks, each
    padded to its own longest, then put back in order: same batch, same loss, fewer padded tokens."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, get_linear_schedule_with_warmup

    tok = tokenizer()

    def tokenize(texts, length):
        return dict(tok(texts, padding=padding, truncation=True, max_length=length, return_tensors="pt"))

    def doc_features(texts):
        if doc_chunks == 1:
            return [tokenize(texts, DOC_LEN)], None
        order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i])["input_ids"]))
        size = -(-len(texts) // doc_chunks)
        chunks = [tokenize([texts[i] for i in order[s:s + size]], DOC_LEN) for s in range(0, len(texts), size)]
        return chunks, torch.argsort(torch.tensor(order))

    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batches.append((tokenize([q for q, _, _ in chunk], QUERY_LEN),
                        doc_features([d for _, ds, _ in chunk for d in ds]),
                        torch.tensor([t for _, _, t in chunk])))
    if model is None:
        model = AutoModel.from_pretrained(backbone_path(), attn_implementation=attn)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model.named_parameters()), lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, len(batches) // 10), len(batches))

    def embed(features):
        hidden = model(**features).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    ends = []
    for queries, (docs, inverse), teacher in batches:
        q = embed(queries)
        d = torch.cat([embed(c) for c in docs])
        d = d if inverse is None else d[inverse]
        scores = torch.einsum("bd,bnd->bn", q, d.view(q.shape[0], -1, q.shape[1]))
        F.mse_loss(scores[:, 0] - scores[:, 1], teacher[:, 0] - teacher[:, 1]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return _per_second(ends, warmup, batch_size)


CONTENDERS = {
    "a": "(a) project: Lightning, MarginMSE, Collator in 2 workers",
    "a_fast": "(a) + length-grouped batches + fused AdamW (proposals), fp32",
    "a_bf16": "(a) + length-grouped + `trainer.precision=bf16-mixed` (AMX on this CPU; AdamW not fused, see below)",
    "a_main": "(a) with tokenisation in the main process (`num_workers=0`)",
    "b_mmse": "(b) sentence-transformers, MarginMSELoss, 2 workers",
    "b_mnrl": "(b) sentence-transformers, MultipleNegativesRankingLoss, 2 workers",
    "c": "(c) bare PyTorch loop, tokenised in advance",
}


def run(batch_size: int = 8, warmup: int = 1, steps: int = 2, budget_s: float = 420, min_rounds: int = 2,
        max_rounds: int = 5, log=print) -> dict:
    rand, grouped, pool = windows(batch_size, warmup, steps)
    args = (rand, batch_size, warmup)
    contenders = {"a": lambda: project(*args),
                  "a_fast": lambda: project(grouped, batch_size, warmup, fused=True),
                  "a_bf16": lambda: project(grouped, batch_size, warmup, precision="bf16-mixed"),
                  "a_main": lambda: project(*args, workers=0),
                  "b_mmse": lambda: sentence_transformers(*args),
                  "b_mnrl": lambda: sentence_transformers(*args, loss="mnrl"),
                  "c": lambda: bare(*args)}
    log(f"training: batch {batch_size} queries x (1 pos + 1 neg), {warmup} warmup + {steps} timed steps a run")
    values = interleaved(contenders, min_rounds, max_rounds, budget_s, log)
    cut = warmup * batch_size
    lengths = doc_lengths(rand[cut:])
    tokens = {"real": sum(map(sum, lengths)) / len(lengths), "random": padded_doc_tokens(rand[cut:], batch_size),
              "grouped": padded_doc_tokens(grouped[cut:], batch_size),
              "pool_random": padded_doc_tokens(random.Random(0).sample(pool, len(pool)), batch_size),
              "pool_grouped": padded_doc_tokens(pool, batch_size)}
    return {"batch_size": batch_size, "warmup": warmup, "steps": steps, "rounds": len(values["a"]),
            "values": values, "tokens": tokens}


def markdown(res: dict) -> str:
    v, t = res["values"], res["tokens"]
    rows = "\n".join(f"| {CONTENDERS[k]} | {fmt(v[k])} |" for k in CONTENDERS)

    def ratio(a, b, target=""):
        return f"| {a} / {b} | {fmt(ratios(v, a, b))} | {target} |"

    return f"""## Training throughput

all-MiniLM-L6-v2 (real weights), fp32 on CPU unless said, batch {res['batch_size']} queries x (1 positive + 1 BM25
negative), query 32 / passage 128 tokens, AdamW lr 2e-5 wd 0.01, grad-norm clip 1.0, linear schedule. The same
real TREC DL examples in the same order for every contender; each run starts from fresh weights, {res['warmup']}
warmup step untimed, then {res['steps']} timed steps (data loading included); {res['rounds']} rounds, the order of
the contenders rotated each round. Queries/s, median (min-max) over rounds. Ratios are taken round by round (the
runs of a round ran back to back), then median (min-max).

| contender | queries/s |
|---|---|
{rows}

| ratio | median (min-max) | target |
|---|---|---|
{ratio("a", "b_mmse", ">= 1.0")}
{ratio("a", "b_mnrl", ">= 1.0")}
{ratio("a", "c", ">= 0.95 (at most 5% overhead)")}
{ratio("a_fast", "b_mmse", ">= 1.5")}
{ratio("a_fast", "a", "")}
{ratio("a_bf16", "b_mmse", ">= 1.5 (bf16 vs fp32)")}
{ratio("a_main", "a", "")}

Length grouping (a proposal; the project has no such option yet): a buffer of 64 batches of examples is sorted by
the token count of each example's longer passage, cut into batches, and the batches shuffled; the timed window is
{res['steps']} of those batches picked at random, and the other contenders get the same examples in random batches.
Passage tokens the model processes per example, padding included (real tokens {t['real']:.0f}): timed window random
{t['random']:.0f} vs grouped {t['grouped']:.0f} (x{t['random'] / t['grouped']:.2f}); the whole 64-batch buffer random
{t['pool_random']:.0f} vs grouped {t['pool_grouped']:.0f} (x{t['pool_random'] / t['pool_grouped']:.2f}). Fused AdamW:
`+optimizer.fused=true` works today as a Hydra override (see Hot-path effects for its share of a step), but only at
`32-true`: Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer, bf16 included.

(b) is SentenceTransformerTrainer's step without the Trainer object, because its `train` extra (`accelerate`,
`datasets`) is not installed here: sentence-transformers' own data collator (in 2 DataLoader workers),
`SentenceTransformerTrainer.collect_features`, its `MarginMSELoss` / `MultipleNegativesRankingLoss` (which embed
the positive and negative columns in one merged forward, as the project does), then transformers.Trainer's
defaults: backward, clip 1.0, fused AdamW (`adamw_torch_fused`, the default for torch >= 2.8), linear schedule.
The Trainer object itself adds per-step bookkeeping of milliseconds. sentence-transformers truncates queries at
the model's one max_seq_length (128), the project at 32; real queries are far shorter than 32 tokens, so the
tensors are the same.
"""


if __name__ == "__main__":
    from benchmarks.common import setup

    setup()
    print(markdown(run()))
