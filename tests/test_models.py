"""The collator's fast path gives exactly what the Hugging Face tokenizer call gives, on real MS MARCO text."""
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
