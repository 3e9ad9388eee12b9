"""The one inference path: embed texts or score (query, passage) pairs with any of our models, as
sentence-transformers would, in batches of alike token length, results back in input order. Evaluation, mining
and teacher scoring all go through here. Batches are formed by token count, not by characters as
sentence-transformers' encode does: on 2,048 MS MARCO passages that pads ~20% fewer tokens (BENCHMARKS.md).

precision (task.precision): "auto" = bf16 autocast on CUDA, fp32 elsewhere; "bf16" = bf16 autocast on a CPU too
(faster only with bf16 units, AMX or AVX512-BF16; emulated and slower without: BENCHMARKS.md; embeddings within
cosine 0.999 of fp32, tests/test_models.py); "32" = fp32 everywhere."""
from __future__ import annotations

import numpy as np
import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


PRECISIONS = ("auto", "bf16", "32")


def uses_bf16(model, precision) -> bool:
    precision = str(precision)  # Hydra reads task.precision=32 as an int
    if precision not in PRECISIONS:
        raise ValueError(f"task.precision={precision!r}: use one of {PRECISIONS}")
    return precision == "bf16" or (precision == "auto" and _device(model).type == "cuda")


def _autocast(model, precision: str):
    return torch.autocast(_device(model).type, dtype=torch.bfloat16, enabled=uses_bf16(model, precision))


def _length_order(tokenize, n: int, chunk: int = 4096) -> np.ndarray:
    """Rows sorted by token count; tokenize(slice) -> features. Tokenising twice costs well under 1% of a CPU
    forward (more, next to a GPU's: still far less than the padding it saves)."""
    if not n:
        return np.zeros(0, np.int64)
    lengths = np.concatenate([tokenize(slice(i, i + chunk))["attention_mask"].sum(1).numpy()
                              for i in range(0, n, chunk)])
    return np.argsort(lengths, kind="stable")


def _to(features: dict, dev: torch.device) -> dict:
    return {k: ({n: t.to(dev, non_blocking=True) for n, t in v.items()} if isinstance(v, dict) else
                v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in features.items()}


@torch.inference_mode()
def encode(model, texts: list[str], batch_size: int, precision: str = "auto") -> np.ndarray:
    """Vectors whose inner product is the bi-encoder's similarity (unit length for cos): `encode` of
    sentence-transformers, queries and passages alike cut at max_seq_length."""
    collator, dev = model.collator(), _device(model)
    order = _length_order(lambda rows: collator.texts(texts[rows]), len(texts))
    out = []
    for i in range(0, len(texts), batch_size):
        features = _to(collator.texts([texts[j] for j in order[i:i + batch_size]]), dev)
        with _autocast(model, precision):
            out.append(model.output_embedding(features).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.dim), np.float32)
    embeddings = np.empty((len(texts), out[0].shape[1]), np.float32)
    embeddings[order] = np.concatenate(out)
    return embeddings


@torch.inference_mode()
def score(model, queries: list[str], passages: list[str], batch_size: int, progress: str | None = None,
          precision: str = "auto") -> np.ndarray:
    """The model's score of each (query, passage): a cross-encoder's logit, a bi-encoder's similarity."""
    import sys

    from tqdm import tqdm

    collate, dev = model.collator().pairs, _device(model)

    def pair_features(rows):  # the tokens that set a batch's width: the pair (cross), the passage (bi)
        batch = collate([(0, 0, q, p) for q, p in zip(queries[rows], passages[rows])])
        return batch["pairs"] if "pairs" in batch else batch["doc"]

    order = _length_order(pair_features, len(queries))
    out = np.empty(len(queries), np.float32)
    for i in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", disable=progress is None,
                  file=sys.stderr, mininterval=2):
        rows = order[i:i + batch_size]
        batch = _to(collate([(0, 0, queries[j], passages[j]) for j in rows]), dev)
        with _autocast(model, precision):
            out[rows] = model.score_pairs(batch).float().cpu().numpy()
    return out
