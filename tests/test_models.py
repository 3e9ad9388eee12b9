"""The collator's fast path gives exactly what the Hugging Face tokenizer call gives, on real MS MARCO text."""
import numpy as np
import pytest
import torch
from conftest import ROOT
from transformers import AutoTokenizer

from marco_lightning.models import Collator, resolve_backbone

SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def texts():
    def texts_of(path, n=40):
        with open(path, encoding="utf-8") as f:
            return [line.split("\t", 1)[1].rstrip("\n") for _, line in zip(range(n), f)]

    return (texts_of(SAMPLE / "queries.dev.tsv") + ["", "naïve café ☕ 東京"],
            texts_of(SAMPLE / "collection.tsv") + ["", "short"])


@pytest.mark.parametrize("max_query,max_doc,side", [(32, 256, "right"), (8, 16, "right"), (8, 16, "left")])
def test_collator_equals_the_tokenizer_call(texts, max_query, max_doc, side):  # (8, 16): nearly all truncated
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("sentence-transformers/all-MiniLM-L6-v2"))
    tokenizer.truncation_side = tokenizer.padding_side = side
    queries, passages = texts
    n = min(len(queries), len(passages))
    examples = [(q, [p, passages[-1 - i]], None) for i, (q, p) in enumerate(zip(queries[:n], passages[:n]))]
    rows = [(i, i, q, p) for i, (q, p) in enumerate(zip(queries[:n], passages[:n]))]

    def reference(a, b=None, max_length=None):
        return tokenizer(a, b, padding=True, truncation="longest_first" if b else True, max_length=max_length,
                         return_tensors="pt")

    bi = Collator(tokenizer, "bi", max_query, max_doc)
    batch = bi.train(examples)
    expect_q = reference([q for q, _, _ in examples], max_length=max_query)
    expect_d = reference([d for _, ds, _ in examples for d in ds], max_length=max_doc)
    for got, expect in ((batch["query"], expect_q), (batch["docs"], expect_d)):
        assert got.keys() == expect.keys()
        for key in expect:
            assert torch.equal(got[key], expect[key]), key
    cross = Collator(tokenizer, "cross", max_query, max_doc).pairs(rows)
    expect_pairs = reference([r[2] for r in rows], [r[3] for r in rows], max_length=max_query + max_doc)
    for key in expect_pairs:
        assert torch.equal(cross["pairs"][key], expect_pairs[key]), key


# ------------------------------------------- length chunks: the same scores and gradients as one padded batch

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _batch(model, texts, group=3):
    queries, passages = texts
    examples = [(queries[i], passages[group * i:group * i + group], [1.0] * group) for i in range(12)]
    return model.collator().train(examples)


@pytest.mark.parametrize("kind", ["bi", "cross"])
def test_length_chunks_give_the_padded_batch_scores_and_gradients(texts, kind):
    """Sorting a batch's passages (pairs) by length and cutting each chunk to its own longest changes no score and
    no gradient (dropout off): the padding it drops is masked out of attention and pooling."""
    from marco_lightning.models import BiEncoder, CrossEncoder

    results = []
    for chunks in (1, 4):
        torch.manual_seed(0)
        model = (BiEncoder("sentence-transformers/all-MiniLM-L6-v2", pooling="mean", random_init=TINY,
                           max_doc_length=256, length_chunks=chunks) if kind == "bi" else
                 CrossEncoder("sentence-transformers/all-MiniLM-L6-v2", random_init=TINY, length_chunks=chunks))
        model.eval()  # no dropout: both runs compute the same function
        batch = _batch(model, texts)
        scores = model.candidate_scores(batch)
        scores.square().sum().backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (s1, g1), (s4, g4) = results
    assert s1.shape == (12, 3)
    torch.testing.assert_close(s4, s1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g4.keys()
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], atol=1e-4, rtol=1e-3, msg=name)
    mask = _batch(model, texts)["docs" if kind == "bi" else "pairs"]["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1] / 2  # the batch did carry padding for the chunks to drop


def test_bf16_inference_stays_close_to_fp32(texts):
    """task.precision=bf16 on CPU: the packaged all-MiniLM-L6-v2's embeddings within cosine 0.999 of fp32."""
    from marco_lightning.inference import encode
    from marco_lightning.models import BiEncoder

    model = BiEncoder("sentence-transformers/all-MiniLM-L6-v2").eval()
    passages = texts[1][:32]
    fp32, bf16 = encode(model, passages, 16, "32"), encode(model, passages, 16, "bf16")
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.999 and abs(fp32 - bf16).max() > 0  # close, and bf16 really ran
    with pytest.raises(ValueError, match="task.precision"):
        encode(model, passages, 16, "fp16")


def test_precision_32_from_the_command_line_is_an_int():
    """Hydra reads task.precision=32 as the int 32: it must mean fp32, not an error."""
    from marco_lightning.inference import uses_bf16

    model = torch.nn.Linear(2, 2)
    assert uses_bf16(model, 32) is False and uses_bf16(model, "32") is False and uses_bf16(model, "bf16") is True


def test_a_cross_encoder_without_max_query_length_gives_the_query_what_the_passage_leaves():
    """model.max_query_length=null (the BEIR experiments) on a cross-encoder: the positions left after the passage."""
    from marco_lightning.models import CrossEncoder

    ce = CrossEncoder("sentence-transformers/all-MiniLM-L6-v2", max_query_length=None, max_doc_length=48, random_init=TINY)
    assert ce.max_query_length == 512 - 48 and ce.collator().max_cross_length == 512
