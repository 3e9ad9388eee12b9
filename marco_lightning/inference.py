"""The one inference path: embed texts or score (query, passage) pairs with any of our models, as
sentence-transformers would, in batches of alike token length, results back in input order. Evaluation, mining
and teacher scoring all go through here. Batches are formed by token count, not by characters as
sentence-transformers' encode does: on 2,048 MS MARCO passages that pads ~20% fewer tokens (BENCHMARKS.md).

precision (task.precision): "auto" = bf16 autocast on CUDA, fp32 elsewhere; "bf16" = bf16 autocast on a CPU too
(faster only with bf16 units, AMX or AVX512-BF16; emulated and slower without: BENCHMARKS.md; embeddings within
cosine 0.999 of fp32, tests/test_models.py); "32" = fp32 everywhere. task.compile: `compile_model` below."""
from __future__ import annotations

import numpy as np
import torch

from marco_lightning.errors import ConfigError


def device(name: str) -> torch.device:
    """task.device: "auto" is CUDA when there is one, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _device(model) -> torch.device:
    return next(model.parameters()).device


PRECISIONS = ("auto", "bf16", "32")


def check_precision(precision) -> str:
    """task.precision as one of PRECISIONS; a task calls this before loading anything, inference on every call."""
    precision = str(precision)  # Hydra reads task.precision=32 as an int
    if precision not in PRECISIONS:
        raise ConfigError(f"task.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def uses_bf16(model, precision) -> bool:
    precision = check_precision(precision)
    return precision == "bf16" or (precision == "auto" and _device(model).type == "cuda")


def compile_model(model):
    """task.compile: torch.compile, in place, what the model runs (its sentence-transformers modules, or the
    cross-encoder), one graph for all batch shapes (dynamic=True; batches of one row get a second), with
    inductor's freezing: weights folded in as constants (plain compile gave nothing on a CPU, BENCHMARKS.md),
    so only while they stay fixed, as in the evaluate / mine / score tasks. About a minute of compiling first,
    per graph and per process; outputs as eager's to ~1e-6."""
    import torch._inductor.config

    # Process-wide: dynamo reads the global flag while tracing, so torch.compile(options=...) would not freeze.
    torch._inductor.config.freezing = True
    (model.st if model.kind == "bi" else model.encoder).compile(dynamic=True)
    return model


def _autocast(model, precision: str):
    return torch.autocast(_device(model).type, dtype=torch.bfloat16, enabled=uses_bf16(model, precision))


BLOCK = 4096  # rows tokenised at once, then batched in length order: one tokenisation, memory flat in n


def _cut(features: dict, rows: torch.Tensor) -> dict:
    """These rows of tokenised features, each group of token tensors cut to the columns its rows use
    (padding is contiguous, so this works for right and left padding alike); one value per row (a prompt's
    prompt_length) is only picked by rows."""
    if "attention_mask" in features:
        used = features["attention_mask"][rows].any(0)
        return {k: v[rows][:, used] if v.ndim > 1 else v[rows] for k, v in features.items()}
    return {k: _cut(v, rows) if isinstance(v, dict) else v[rows] if torch.is_tensor(v) else v
            for k, v in features.items()}


def _batches(featurize, width, n: int, batch_size: int):
    """(row numbers, features) covering range(n): each BLOCK of rows tokenised once (featurize(slice)), its
    rows ordered longest first by width(features) (a GPU out-of-memory shows at once), batches cut to their
    longest."""
    for start in range(0, n, BLOCK):
        features = featurize(slice(start, start + BLOCK))
        order = torch.argsort(width(features), descending=True, stable=True)
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            yield start + rows.numpy(), _cut(features, rows)


def _num_batches(n: int, batch_size: int) -> int:
    return sum(-(-min(BLOCK, n - start) // batch_size) for start in range(0, n, BLOCK))


def _to(features: dict, dev: torch.device) -> dict:
    return {k: ({n: t.to(dev, non_blocking=True) for n, t in v.items()} if isinstance(v, dict) else
                v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in features.items()}


@torch.inference_mode()
def encode(model, texts: list[str], batch_size: int, precision: str = "auto", role: str = "document") -> np.ndarray:
    """Vectors whose inner product is the bi-encoder's similarity (unit length for cos) of `texts` embedded as
    `role`: "query" is sentence-transformers' `encode_query`, "document" its `encode_document` (the model's query
    or document prompt prepended; a model without prompts: `encode`), cut at max_seq_length. Every caller says
    which: a query searches, a document is searched."""
    collator, dev = model.collator(), _device(model)
    collator.prompt(role)  # an unknown role fails here, even for no texts
    embeddings = np.empty((len(texts), model.dim), np.float32)
    batches = _batches(lambda block: collator.texts(texts[block], role), lambda f: f["attention_mask"].sum(1),
                       len(texts), batch_size)
    for rows, features in batches:
        with _autocast(model, precision):
            embeddings[rows] = model.output_embedding(_to(features, dev)).float().cpu().numpy()
    return embeddings


@torch.inference_mode()
def score(model, queries: list[str], passages: list[str], batch_size: int, progress: str | None = None,
          precision: str = "auto") -> np.ndarray:
    """The model's score of each (query, passage): a cross-encoder's logit, a bi-encoder's similarity (of the query
    embedded with its query prompt and the passage with its document prompt, Collator.pairs)."""
    import sys

    from tqdm import tqdm

    collate, dev = model.collator().pairs, _device(model)

    def featurize(block):
        return collate([(0, 0, q, p) for q, p in zip(queries[block], passages[block])])

    def width(batch):  # the tokens that set a batch's width: the pair (cross), the passage (bi)
        return (batch["pairs"] if "pairs" in batch else batch["doc"])["attention_mask"].sum(1)

    out = np.empty(len(queries), np.float32)
    batches = _batches(featurize, width, len(queries), batch_size)
    for rows, batch in tqdm(batches, total=_num_batches(len(queries), batch_size), desc=progress,
                            unit="batch", disable=progress is None, file=sys.stderr, mininterval=2):
        with _autocast(model, precision):
            out[rows] = model.score_pairs(_to(batch, dev)).float().cpu().numpy()
    return out
