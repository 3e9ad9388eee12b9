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
# (the model's similarity, MNRL's arguments): the loss gets the vectors the model hands over for its similarity
CASES = {"mnrl": ("cos", {"scale": 20.0}), "symmetric": ("cos", {"scale": 20.0, "symmetric": True}),
         "one_negative_dot": ("dot", {"num_hard_negatives": 1, "scale": 1.0})}


def mnrl(similarity="cos", **kwargs):
    """MNRL as the module runs it for a bi-encoder of this similarity: on its similarity vectors."""
    loss = MultipleNegativesRankingLoss(**kwargs)
    return lambda q, d, teacher=None: loss(similarity_vectors(q, similarity), similarity_vectors(d, similarity), teacher)


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
        value, q_grad, d_grad = run(q, d, model, mnrl(similarity, **kwargs))
        out[name] = (value, q_grad, d_grad, [p.grad for p in model.parameters()])
    # GradCache on top: embed per mini-batch, gathered loss, one DDP backward per mini-batch
    model = DistributedDataParallel(encoder())
    value = cached_loss_backward(lambda batch: model(batch["x"]), {"x": q}, {"x": d.flatten(0, 1)},
                                 mnrl(scale=20.0), 3, torch.Tensor.backward)
    out["cached"] = (value, None, None, [p.grad for p in model.parameters()])
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
    for name, (similarity, kwargs) in {**CASES, "cached": ("cos", {"scale": 20.0})}.items():
        model = encoder()
        loss, q_grad, d_grad = run(q, d, model, mnrl(similarity, **kwargs))
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
    # and the gathering did happen: rank 0 alone, with only its own candidates, has a different loss
    with torch.no_grad():
        local_only = mnrl(scale=20.0)(encoder()(q[:B]), encoder()(d[:B]))
    assert (ranks[0]["mnrl"][0] - local_only).abs() > 1e-3
