"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

An in-batch loss such as MNRL needs every embedding of the batch at once, but its gradient w.r.t. the encoder only
needs d loss / d embedding. So: (1) embed all inputs in mini-batches without a graph, (2) compute the loss on those
embeddings and cache its gradient w.r.t. them, (3) re-embed each mini-batch with a graph and back-propagate the
cached gradient. Same loss and gradients as one big batch; activation memory of one mini-batch.
"""

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from marco_lightning.errors import ConfigError


class RandContext:
    """Snapshot of the CPU and CUDA RNG states; `with ctx:` replays them (then restores the outer RNG), so the
    re-embedding in pass 3 draws exactly the dropout masks of pass 1."""

    def __init__(self, *tensors):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)


def _num_rows(inputs: Mapping) -> int:
    return next(v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.ndim > 0)


def _rows(inputs: Mapping, begin: int, end: int) -> dict:
    """Rows begin:end of every batch-indexed tensor; anything else passes through."""
    n = _num_rows(inputs)
    return {k: v[begin:end] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v for k, v in inputs.items()}


def _embed_no_grad(embed, inputs, mini_batch_size):
    """Pass 1: embeddings of all rows (no graph) and, per mini-batch, its slice and the RNG state it started from."""
    chunks, replay = [], []
    n = _num_rows(inputs)
    for begin in range(0, n, mini_batch_size):
        batch = _rows(inputs, begin, min(begin + mini_batch_size, n))
        state = RandContext(*[v for v in batch.values() if torch.is_tensor(v)])
        with torch.no_grad():
            chunks.append(embed(batch))
        replay.append((batch, state, slice(begin, begin + mini_batch_size)))
    return torch.cat(chunks), replay


def cached_loss_backward(embed: Callable[[dict], torch.Tensor], query_inputs: Mapping, doc_inputs: Mapping,
                         loss: Callable, mini_batch_size: int, backward: Callable[[torch.Tensor], None],
                         teacher: torch.Tensor | None = None,
                         no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                         ) -> torch.Tensor:
    """Run forward AND backward of a bi-encoder loss over the whole batch, a mini-batch of inputs at a time.

    embed: inputs dict -> embeddings [n, d] (the encoder, in train mode). query_inputs: tensors with B rows.
    doc_inputs: tensors with B * (1+k) rows, query b's positive and k negatives at rows b*(1+k) ... (b+1)*(1+k)-1.
    loss: a bi-encoder loss, loss(query_emb [B, d], doc_emb [B, 1+k, d], teacher). backward: called once per
    mini-batch on a scalar, e.g. LightningModule.manual_backward (so AMP loss scaling applies). no_sync: DDP's
    `no_sync`: gradients accumulate locally and are all-reduced once, in the step's last backward.
    Returns the (detached) loss; the parameters' .grad hold its gradient when this returns.
    """
    if mini_batch_size < 1:
        raise ConfigError(f"GradCache: mini_batch_size={mini_batch_size} must be >= 1 (null: no GradCache)")
    n_queries, n_docs = _num_rows(query_inputs), _num_rows(doc_inputs)
    if n_docs % n_queries:
        raise ValueError(f"GradCache: {n_docs} document rows for {n_queries} queries; expected B * (1+k) rows")
    # (1) embed everything without a graph, remembering each mini-batch's RNG state
    query_emb, query_replay = _embed_no_grad(embed, query_inputs, mini_batch_size)
    doc_emb, doc_replay = _embed_no_grad(embed, doc_inputs, mini_batch_size)
    # (2) loss on the detached embeddings; cache d loss / d embedding
    query_emb, doc_emb = query_emb.detach().requires_grad_(), doc_emb.detach().requires_grad_()
    with torch.enable_grad():
        value = loss(query_emb, doc_emb.view(n_queries, n_docs // n_queries, -1), teacher)
        grads = torch.autograd.grad(value, [query_emb, doc_emb], materialize_grads=True)
    # (3) re-embed with a graph under the same RNG state; d(emb . cached_grad)/d theta = d loss / d theta
    chunks = [(item, grad) for replay, grad in ((query_replay, grads[0]), (doc_replay, grads[1])) for item in replay]
    for i, ((batch, state, rows), grad) in enumerate(chunks):
        with state, (no_sync() if i < len(chunks) - 1 else contextlib.nullcontext()):
            emb = embed(batch)
            dtype = torch.promote_types(emb.dtype, torch.float32)  # keep the surrogate at least fp32 under AMP
            backward((emb.to(dtype) * grad[rows].to(dtype)).sum())
    return value.detach()
