"""The one inference path against sentence-transformers: blocks tokenised once, batches in token-length order
cut to their own longest, results back in input order, the same numbers as `encode` / `predict`."""
import numpy as np
import pytest
import torch
from conftest import ROOT

from marco_lightning import inference
from marco_lightning.models import BiEncoder, CrossEncoder

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def texts():
    with open(ROOT / "data" / "sample" / "collection.tsv", encoding="utf-8") as f:
        passages = [line.split("\t", 1)[1].rstrip("\n") for _, line in zip(range(21), f)]
    return passages + ["", "short", "naïve café ☕ 東京"]  # 24: blocks of 7 leave a partial one


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random bi-encoder and cross-encoder, exported: sentence-transformers loads them as the reference."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    BiEncoder(BACKBONE, pooling="mean", random_init=TINY, max_doc_length=64).save(root / "bi")
    CrossEncoder(BACKBONE, random_init=TINY, max_query_length=16, max_doc_length=48).save(root / "ce")
    return root


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(inference, "BLOCK", 7)  # several blocks, the last one partial


def test_encode_equals_sentence_transformers(texts, exported, small_blocks):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(exported / "bi"), device="cpu")
    ours = inference.encode(BiEncoder(str(exported / "bi")).eval(), texts, 4, "32")
    np.testing.assert_allclose(ours, st.encode(texts, batch_size=4, normalize_embeddings=True), atol=2e-6)
    assert inference.encode(BiEncoder(str(exported / "bi")), [], 4).shape == (0, 32)


def test_score_equals_sentence_transformers(texts, exported, small_blocks):
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from sentence_transformers import SentenceTransformer

    queries = [f"query {i} about {t[:12]}" for i, t in enumerate(reversed(texts))]
    ce = CrossEncoder(str(exported / "ce"), max_query_length=16, max_doc_length=48).eval()
    want = STCrossEncoder(str(exported / "ce"), device="cpu", activation_fn=torch.nn.Identity()).predict(
        list(zip(queries, texts)), batch_size=4)
    np.testing.assert_allclose(inference.score(ce, queries, texts, 4, precision="32"), want, atol=1e-5)

    st = SentenceTransformer(str(exported / "bi"), device="cpu")
    want = st.similarity_pairwise(st.encode(queries), st.encode(texts)).numpy()
    bi = BiEncoder(str(exported / "bi")).eval()
    np.testing.assert_allclose(inference.score(bi, queries, texts, 4, precision="32"), want, atol=1e-5)


def test_batches_are_cut_to_their_longest_for_either_padding_side(small_blocks):
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    for mask, expect in ((right, [[8, 9], [4, 0]]), (right.flip(1), [[10, 11], [0, 7]])):  # right, left padding
        features = {"qid": torch.tensor([7, 8, 9]),
                    "pairs": {"input_ids": torch.arange(12).view(3, 4) * mask, "attention_mask": mask}}
        cut = inference._cut(features, torch.tensor([2, 1]))
        assert cut["qid"].tolist() == [9, 8]
        assert cut["pairs"]["input_ids"].tolist() == expect
        assert cut["pairs"]["attention_mask"].tolist() == (torch.tensor(expect) > 0).int().tolist()
    assert inference._num_batches(24, 4) == 7 and inference._num_batches(21, 7) == 3  # blocks of 7


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compiled_model_gives_eager_outputs(texts, exported, monkeypatch):
    """task.compile (torch.compile with frozen weights): the same embeddings and scores as eager, to float
    noise; frozen indeed, so a weight changed after compiling is not seen (why it is for fixed weights only)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "freezing", torch._inductor.config.freezing)  # restored after
    bi, ce = BiEncoder(str(exported / "bi")).eval(), CrossEncoder(str(exported / "ce")).eval()
    queries = ["what is a query"] * len(texts)
    eager = inference.encode(bi, texts, 4, "32"), inference.score(ce, queries, texts, 4, precision="32")
    inference.compile_model(bi)
    inference.compile_model(ce)
    compiled = inference.encode(bi, texts, 4, "32"), inference.score(ce, queries, texts, 4, precision="32")
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(b, a, atol=1e-5)

    changed = BiEncoder(str(exported / "bi")).eval()
    with torch.no_grad():
        for model in (bi, changed):
            for p in model.st[0].model.encoder.parameters():
                p.mul_(1.5)
    now = inference.encode(changed, texts, 4, "32")  # eager, with the changed weights
    assert np.abs(now - eager[0]).max() > 1e-2
    assert np.abs(inference.encode(bi, texts, 4, "32") - now).max() > 1e-3  # without freezing: ~1e-7
