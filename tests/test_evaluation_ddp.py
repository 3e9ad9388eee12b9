"""Validation across 2 CPU processes (gloo): every rank must measure the whole run, as one process would."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from marco_lightning.data.trec import read_qrels, read_run
from marco_lightning.evaluation import compute_metrics
from marco_lightning.module import gather_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msmarco-trec-dl"
MEASURES = ("ndcg@10", "mrr@10", "recall@100", "map")


def _rows():
    """BM25 DL19 top-100 with random scores, one row dropped so that DistributedSampler has to pad."""
    qrels = read_qrels(DATA / "qrels.dl19-passage.txt")
    run = read_run(DATA / "runs/BM25_dl19.trec")
    qids, pids = zip(*[(int(q), int(p)) for q, docs in run.items() for p in docs][:-1])
    scores = torch.randn(len(qids), generator=torch.Generator().manual_seed(0))
    return qrels, scores, torch.tensor(qids), torch.tensor(pids)


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    qrels, scores, qids, pids = _rows()
    mine = torch.tensor(list(DistributedSampler(range(len(qids)), world_size, rank, shuffle=False)))
    rows = [torch.stack([qids[b].double(), pids[b].double(), scores[b].double()], 1) for b in mine.split(500)]
    values = compute_metrics(qrels, gather_run(rows), 2, MEASURES)  # what RetrieverModule logs on each rank
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rows": len(mine), **values}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
def test_two_ranks_agree_with_single_process(tmp_path):
    mp.spawn(_worker, args=(2, tmp_path / "store", tmp_path), nprocs=2, join=True)
    qrels, scores, qids, pids = _rows()
    run = {}
    for q, p, s in zip(qids.tolist(), pids.tolist(), scores.tolist()):
        run.setdefault(str(q), {})[str(p)] = s
    expected = compute_metrics(qrels, run, 2, MEASURES)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r.pop("rows") for r in results] == [
        2150,
        2150,
    ]  # 4299 rows + 1 padding duplicate, split in halves
    for values in results:
        assert values == pytest.approx(expected, abs=1e-6)
