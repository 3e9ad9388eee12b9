"""task=evaluate: published numbers from real runs (mode score) and re-ranking equal to sentence-transformers."""
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, compose, needs_shared

DL = SHARED_DATA / "msmarco-trec-dl"


def evaluate(overrides, tmp_path, data="trec_dl19"):
    from marco_lightning.tasks.evaluate import main

    return main(compose(["task=evaluate", f"data={data}", *overrides], tmp_path))


@pytest.mark.parametrize("run,ndcg", [("BM25", 0.5058), ("D_BERT_KD_TASB", 0.7210),
                                      ("SPLADE_P_P_ENSEMBLE_DISTIL", 0.7308)])
@needs_shared
def test_score_mode_reproduces_published_dl19_values(run, ndcg, tmp_path):
    metrics = evaluate([f"task.run={DL}/runs/{run}_dl19.trec"], tmp_path)
    assert round(metrics["ndcg@10"], 4) == ndcg
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "run.trec").read_text().count("\n") == 4300  # 43 queries x top-100


def test_unknown_mode_and_missing_run_fail_clearly(tmp_path):
    from marco_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="task.mode"):
        evaluate(["task.mode=nope"], tmp_path, data="sample")
    with pytest.raises(ConfigError, match="task.run"):
        evaluate(["task.run=/nowhere.trec"], tmp_path, data="sample")
    top1000 = tmp_path / "top1000.tsv"  # unscored candidates: scoring them would measure docid order
    top1000.write_text("".join(f"19335\t{p}\tq\tpassage\n" for p in (1017759, 1082489, 109063)))
    with pytest.raises(ConfigError, match="ranks no candidate above another"):
        evaluate([f"task.run={top1000}"], tmp_path, data="sample")


@pytest.mark.slow
@needs_shared
def test_rerank_with_packaged_minilm_equals_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from marco_lightning.data.trec import read_qrels, read_run
    from marco_lightning.evaluation import compute_metrics
    from marco_lightning.models import resolve_backbone

    path = resolve_backbone("sentence-transformers/all-MiniLM-L6-v2")
    ours = evaluate(["task.mode=rerank", f"task.model_path={path}", f"task.run={DL}/runs/BM25_dl19.trec"], tmp_path)
    run = read_run(tmp_path / "run.trec")
    # Reference: sentence-transformers' own encode on the same pairs.
    queries = dict(line.rstrip("\n").split("\t", 1) for line in open(DL / "queries.dl19-passage.tsv"))
    pids = sorted({p for docs in run.values() for p in docs})
    texts = {}
    for line in open(DL / "collection.tsv", encoding="utf-8"):
        pid, text = line.rstrip("\n").split("\t", 1)
        texts[pid] = text
    st = SentenceTransformer(path, device="cpu")
    q_emb = dict(zip(queries, st.encode(list(queries.values()), batch_size=64)))
    p_emb = dict(zip(pids, st.encode([texts[p] for p in pids], batch_size=64)))
    ref = {q: {p: float(q_emb[q] @ p_emb[p]) for p in docs} for q, docs in run.items()}
    diffs = [abs(run[q][p] - ref[q][p]) for q in run for p in run[q]]
    assert max(diffs) < 1e-5
    qrels = read_qrels(DL / "qrels.dl19-passage.txt")
    assert ours["ndcg@10"] == pytest.approx(compute_metrics(qrels, ref)["ndcg@10"], abs=1e-9)


@needs_shared
def test_retrieve_mode_returns_the_exhaustive_numpy_top10(tmp_path):
    """faiss over a 3,000-passage real collection == brute-force numpy search with the same embeddings."""
    import torch

    from marco_lightning.data.trec import read_run
    from marco_lightning.models import BiEncoder
    from marco_lightning.retrieval import encode

    collection = tmp_path / "collection.tsv"
    with open(DL / "collection.tsv", encoding="utf-8") as src:
        collection.write_text("".join(next(src) for _ in range(3000)), encoding="utf-8")
    torch.manual_seed(0)
    evaluate(["task.mode=retrieve", "model=tiny", f"task.collection={collection}", "task.top_k=10"], tmp_path)
    run = read_run(tmp_path / "run.trec")
    torch.manual_seed(0)  # the same tiny random model again
    cfg = compose(["model=tiny"], tmp_path)
    model = BiEncoder(**{k: v for k, v in cfg.model.items() if k != "_target_"}).eval()
    lines = [line.rstrip("\n").split("\t", 1) for line in open(collection, encoding="utf-8")]
    queries = dict(line.rstrip("\n").split("\t", 1) for line in open(DL / "queries.dl19-passage.tsv"))
    P = encode(model, [t for _, t in lines], 64)
    Q = encode(model, list(queries.values()), 64)
    exact = Q @ P.T
    row_of = {pid: i for i, (pid, _) in enumerate(lines)}
    for qid, scores in zip(queries, exact):
        top = np.sort(scores)[::-1][:10]
        got = sorted(run[qid].items(), key=lambda kv: -kv[1])
        # the same 10 scores, each the exact score of the passage returned (a random tiny model has near-ties,
        # so equal-scored passages may swap places)
        np.testing.assert_allclose([s for _, s in got], top, atol=1e-5)
        np.testing.assert_allclose([scores[row_of[p]] for p, _ in got], top, atol=1e-5)
    assert (tmp_path / "index" / "index.faiss").exists()


def test_index_cache_is_keyed_by_the_model(tmp_path):
    """Two models, one task.index.dir: the second must search its own vectors, never the first model's."""
    from hydra.utils import instantiate

    from marco_lightning.retrieval import retrieve

    collection = tmp_path / "collection.tsv"
    with open(ROOT / "data" / "sample" / "collection.tsv", encoding="utf-8") as src:
        collection.write_text("".join(line for _, line in zip(range(300), src)), encoding="utf-8")
    queries = {"1": "what is the daily life of thai people", "2": "cost of interior concrete flooring"}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(instantiate(compose(["model=tiny"]).model).eval())
    shared_dir, runs = tmp_path / "index", []
    for model in models:
        runs.append(retrieve(model, collection, queries, top_k=10, index_dir=shared_dir))
    fresh = retrieve(models[1], collection, queries, top_k=10, index_dir=tmp_path / "fresh")
    assert runs[1] == fresh and runs[0] != runs[1]
    assert retrieve(models[1], collection, queries, top_k=10, index_dir=shared_dir) == fresh  # reused when it fits


def test_task_compile_compiles_the_loaded_model_once(tmp_path, monkeypatch):
    """task.compile=true hands the loaded model to inference.compile_model (the compiling itself: test_inference)."""
    import marco_lightning.tasks.evaluate as task

    seen = []
    monkeypatch.setattr(task, "compile_model", lambda model: seen.append(model) or model)
    evaluate(["task.mode=rerank", "model=tiny", "task.device=cpu", "task.top_k=5"], tmp_path, data="sample")
    assert seen == []
    evaluate(["task.mode=rerank", "model=tiny", "task.device=cpu", "task.top_k=5", "task.compile=true"], tmp_path,
             data="sample")
    assert len(seen) == 1 and seen[0].kind == "bi" and not seen[0].training
