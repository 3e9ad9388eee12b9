"""Gathered MNRL on 2 CPU processes (gloo) == MNRL on one process with the whole batch: loss and gradients.

Convention (as under DDP): each rank's loss is the mean over its own queries and DDP averages gradients over
ranks, so the full-batch loss is the mean of the rank losses and its gradient is the rank gradient / world size.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from marco_lightning.grad_cache import cached_loss_backward
from marco_lightning.losses import MultipleNegativesRankingLoss
from marco_lightning.models import similarity_vectors

WORLD, B, K, D_IN, D = 2, 4, 2, 10, 6  # B queries per rank, K hard negatives
CACHED_GUARD = {"scale": 20.0, "guard_margin": 0.05, "query_ids": True}
# (the model's similarity, MNRL's arguments): the loss gets the vectors the model hands over for its similarity
CASES = {"mnrl": ("cos", {"scale": 20.0}), "symmetric": ("cos", {"scale": 20.0, "symmetric": True}),
         "one_negative_dot": ("dot", {"num_hard_negatives": 1, "scale": 1.0}),
         # the false-negative guard on the gathered candidates; with query ids (train_rows=positive): rows of one
         # query on the same rank and on different ranks
         "guard": ("cos", {"scale": 20.0, "guard_margin": 0.05}),
         "guard_relative_symmetric_ids": ("cos", {"scale": 20.0, "guard_margin": 0.1, "guard_strategy": "relative",
                                                  "symmetric": True, "query_ids": True}),
         "ids": ("cos", {"scale": 20.0, "query_ids": True}),
         # leave_out_judged: candidates the qrels judge relevant to a row's query, on its rank and the other
         "judged_symmetric": ("cos", {"scale": 20.0, "symmetric": True, "leave_out_judged": True, "judged": True})}
QUERY_IDS = torch.tensor([0, 1, 2, 0, 1, 3, 4, 5])  # the full batch's: query 0 twice on rank 0, query 1 on both
DOC_IDS = torch.arange(WORLD * B * (1 + K)).view(WORLD * B, 1 + K)  # row r's positive is document 3r
# each row's judged positives (-1 padded): row 0 also judges row 2's positive (same rank) and row 5's (the other
# rank), row 1 row 7's hard negative, row 4 row 0's hard negative, row 6 row 1's positive (the symmetric term)
JUDGED = torch.tensor([[0, 6, 15], [3, 22, -1], [6, -1, -1], [9, -1, -1],
                       [12, 1, -1], [15, -1, -1], [18, 3, -1], [21, -1, -1]])


def mnrl(similarity="cos", query_ids=None, judged=None, **kwargs):
    """MNRL as the module runs it for a bi-encoder of this similarity: on its similarity vectors (and, for
    `query_ids` True, this slice of QUERY_IDS; `judged`: this slice's (doc_ids, judged_ids))."""
    loss = MultipleNegativesRankingLoss(**kwargs)
    ids = {"query_ids": query_ids} if query_ids is not None else {}
    if judged is not None:
        ids.update(doc_ids=judged[0], judged_ids=judged[1])
    return lambda q, d, teacher=None: loss(similarity_vectors(q, similarity), similarity_vectors(d, similarity),
                                           teacher, **ids)


def ids_of(kwargs, rows):
    judged = None
    if kwargs.get("judged"):  # this slice's lists, as wide as its longest (ranks differ: the loss pads to gather)
        lists = JUDGED[rows]
        judged = DOC_IDS[rows], lists[:, : int((lists >= 0).sum(1).max())]
    return {**kwargs, "query_ids": QUERY_IDS[rows] if kwargs.get("query_ids") else None, "judged": judged}


def full_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, 1 + K, D_IN, generator=g)


def encoder():
    torch.manual_seed(1)
    return nn.Linear(D_IN, D)


def run(features_q, features_d, model, loss):
    """Loss of the encoder's embeddings, backward; returns (loss, grad wrt query features, grad wrt doc features)."""
    q, d = features_q.clone().requires_grad_(), features_d.clone().requires_grad_()
    value = loss(model(q), model(d))
    value.backward()
    return value.detach(), q.grad, d.grad


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    q, d = (x[rank * B:(rank + 1) * B] for x in full_batch())
    out = {}
    for name, (similarity, kwargs) in CASES.items():
        model = DistributedDataParallel(encoder())
        value, q_grad, d_grad = run(q, d, model, mnrl(similarity, **ids_of(kwargs, slice(rank * B, (rank + 1) * B))))
        out[name] = (value, q_grad, d_grad, [p.grad for p in model.parameters()])
    # GradCache on top: embed per mini-batch, gathered loss, one DDP backward per mini-batch
    model = DistributedDataParallel(encoder())
    value = cached_loss_backward(lambda batch: model(batch["x"]), {"x": q}, {"x": d.flatten(0, 1)},
                                 mnrl(scale=20.0), 3, torch.Tensor.backward)
    out["cached"] = (value, None, None, [p.grad for p in model.parameters()])
    # ... with the guard and query ids too: masks from the cached, gathered vectors
    model = DistributedDataParallel(encoder())
    value = cached_loss_backward(lambda batch: model(batch["x"]), {"x": q}, {"x": d.flatten(0, 1)},
                                 mnrl(**ids_of(CACHED_GUARD, slice(rank * B, (rank + 1) * B))), 3,
                                 torch.Tensor.backward)
    out["cached_guard_ids"] = (value, None, None, [p.grad for p in model.parameters()])
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20-30 s: spawning, and DDP's first construction imports torch._dynamo (~7 s)
@pytest.mark.timeout(120)
def test_gathered_mnrl_equals_single_process_full_batch(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    q, d = full_batch()
    full = {}
    for name, (similarity, kwargs) in {**CASES, "cached": ("cos", {"scale": 20.0}),
                                       "cached_guard_ids": ("cos", CACHED_GUARD)}.items():
        model = encoder()
        loss, q_grad, d_grad = run(q, d, model, mnrl(similarity, **ids_of(kwargs, slice(None))))
        full[name] = loss
        rank_losses = torch.stack([ranks[r][name][0] for r in range(WORLD)])
        assert loss > 0.1
        torch.testing.assert_close(rank_losses.mean(), loss, atol=1e-6, rtol=0)
        for r in range(WORLD):
            rows = slice(r * B, (r + 1) * B)
            _, rq_grad, rd_grad, param_grads = ranks[r][name]
            if rq_grad is not None:
                torch.testing.assert_close(rq_grad / WORLD, q_grad[rows], atol=1e-6, rtol=0)
                torch.testing.assert_close(rd_grad / WORLD, d_grad[rows], atol=1e-6, rtol=0)
            for got, p in zip(param_grads, model.parameters()):  # DDP already averaged these
                # sums over many terms reaching |2.6|: 1e-6 relative to the largest (float32 rounding)
                torch.testing.assert_close(got, p.grad, atol=1e-6 * max(1.0, p.grad.abs().max().item()), rtol=0)
    # the guard and the query ids did leave candidates out
    assert (full["guard"] - full["mnrl"]).abs() > 1e-3 and (full["ids"] - full["mnrl"]).abs() > 1e-3
    assert (full["judged_symmetric"] - full["symmetric"]).abs() > 1e-3
    # and the gathering did happen: rank 0 alone, with only its own candidates, has a different loss
    with torch.no_grad():
        local_only = mnrl(scale=20.0)(encoder()(q[:B]), encoder()(d[:B]))
    assert (ranks[0]["mnrl"][0] - local_only).abs() > 1e-3
