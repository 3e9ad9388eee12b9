"""The one inference path: embed texts or score (query, passage) pairs with any of our models, as
sentence-transformers would, in batches of alike length (less padding), bf16 autocast on CUDA, results back in
input order. Evaluation, mining and teacher scoring all go through here."""
from __future__ import annotations

import numpy as np
import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _to(features: dict, dev: torch.device) -> dict:
    return {k: ({n: t.to(dev, non_blocking=True) for n, t in v.items()} if isinstance(v, dict) else
                v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in features.items()}


@torch.inference_mode()
def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Vectors whose inner product is the bi-encoder's similarity (unit length for cos): `encode` of
    sentence-transformers, queries and passages alike cut at max_seq_length."""
    collator, dev = model.collator(), _device(model)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for i in range(0, len(texts), batch_size):
        features = _to(collator.texts([texts[j] for j in order[i:i + batch_size]]), dev)
        with _autocast(dev):
            out.append(model.output_embedding(features).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.dim), np.float32)
    embeddings = np.empty((len(texts), out[0].shape[1]), np.float32)
    embeddings[order] = np.concatenate(out)
    return embeddings


@torch.inference_mode()
def score(model, queries: list[str], passages: list[str], batch_size: int, progress: str | None = None) -> np.ndarray:
    """The model's score of each (query, passage): a cross-encoder's logit, a bi-encoder's similarity."""
    import sys

    from tqdm import tqdm

    collate, dev = model.collator().pairs, _device(model)
    order = np.argsort([len(q) + len(p) for q, p in zip(queries, passages)], kind="stable")
    out = np.empty(len(queries), np.float32)
    for i in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", disable=progress is None,
                  file=sys.stderr, mininterval=2):
        rows = order[i:i + batch_size]
        batch = _to(collate([(0, 0, queries[j], passages[j]) for j in rows]), dev)
        with _autocast(dev):
            out[rows] = model.score_pairs(batch).float().cpu().numpy()
    return out
