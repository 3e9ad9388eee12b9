"""Losses and GradCache against sentence-transformers' own loss classes (v6.2) and hand-computed values.

The ST losses embed feature dicts with a model; stand-in models here return the very tensors our losses get, so
both sides see identical float32 inputs and the gradients w.r.t. those inputs can be compared. Our losses know no
similarity: they get what the bi-encoder hands over (models.pair_similarity's scores, or similarity_vectors: unit
vectors for cos), where ST's losses take a similarity function.
"""

import math
import warnings

import pytest
import torch
from sentence_transformers import util as st_util
from sentence_transformers.cross_encoder import CrossEncoder
from sentence_transformers.cross_encoder import losses as st_ce
from sentence_transformers.sentence_transformer import losses as st_bi
from torch import nn

from marco_lightning import losses as L
from marco_lightning.grad_cache import cached_loss_backward
from marco_lightning.models import pair_similarity, similarity_vectors

ATOL = 1e-6
B, K, D = 6, 3, 8  # queries, hard negatives per query, embedding size


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(B, D, generator=g), torch.randn(B, 1 + K, D, generator=g)
    teacher = 3 * torch.randn(B, 1 + K, generator=g)
    return q, d, teacher


class EmbeddingLookup(nn.Module):
    """Stand-in SentenceTransformer: each row's input_ids[0] is its row number in a table of given embeddings."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, features):
        return {"sentence_embedding": self.table[features["input_ids"][:, 0]]}


def st_bi_loss(make_loss, q, d, labels):
    """Loss of an ST bi-encoder loss on columns (query, positive, negative_1, ...) = (q, d[:, 0], d[:, 1], ...)."""
    model = EmbeddingLookup(torch.cat([q, d.transpose(0, 1).reshape(-1, q.shape[1])]))
    ids = torch.arange(len(model.table)).view(-1, 1)
    columns = ids.split(q.shape[0])
    features = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MultipleNegativesSymmetricRankingLoss is deprecated, still the reference
        return make_loss(model)(features, labels)


def loss_and_grads(fn, *leaves):
    leaves = [x.clone().requires_grad_() for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_parity(ours, reference, *inputs):
    (a, grads_a), (b, grads_b) = loss_and_grads(ours, *inputs), loss_and_grads(reference, *inputs)
    assert torch.isfinite(a) and a.abs() > 1e-3  # a non-trivial value, not 0 == 0
    close(a, b)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().sum() > 0
        close(ga, gb)


# ---------------------------------------------------------------- bi-encoder losses vs sentence-transformers


def test_margin_mse_matches_st(batch):
    q, d, t = batch
    assert_parity(lambda q, d: L.MarginMSELoss()(pair_similarity(q, d, "dot"), t),
                  lambda q, d: st_bi_loss(st_bi.MarginMSELoss, q, d, t), q, d)


@pytest.mark.parametrize("similarity,scale,st_sim", [("cos", 20.0, st_util.cos_sim), ("dot", 1.0, st_util.dot_score)])
@pytest.mark.parametrize("num_hard_negatives", [None, 1, 0])
def test_mnrl_matches_st(batch, similarity, scale, st_sim, num_hard_negatives):
    q, d, _ = batch
    n = K if num_hard_negatives is None else num_hard_negatives
    ours = L.MultipleNegativesRankingLoss(scale=scale, num_hard_negatives=num_hard_negatives)
    reference = st_bi.MultipleNegativesRankingLoss  # ST takes the columns it is given: drop the unused negatives
    assert_parity(lambda q, d: ours(similarity_vectors(q, similarity), similarity_vectors(d, similarity)),
                  lambda q, d: st_bi_loss(lambda m: reference(m, scale=scale, similarity_fct=st_sim), q, d[:, : 1 + n],
                                          None), q, d)


def test_mnrl_grads_zero_for_unused_negatives(batch):
    q, d, _ = batch
    d = d.clone().requires_grad_()
    L.MultipleNegativesRankingLoss(scale=20.0, num_hard_negatives=1)(similarity_vectors(q, "cos"),
                                                                     similarity_vectors(d, "cos")).backward()
    assert d.grad[:, 2:].abs().max() == 0 and d.grad[:, :2].abs().min() > 0


def test_symmetric_mnrl_matches_st(batch):
    q, d, _ = batch
    assert_parity(lambda q, d: L.MultipleNegativesRankingLoss(scale=20.0, symmetric=True)(  # ST's: cos, 20
        similarity_vectors(q, "cos"), similarity_vectors(d, "cos")),
                  lambda q, d: st_bi_loss(st_bi.MultipleNegativesSymmetricRankingLoss, q, d, None), q, d)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("similarity,st_sim", [("dot", st_util.pairwise_dot_score), ("cos", st_util.pairwise_cos_sim)])
def test_distill_kl_matches_st(batch, temperature, similarity, st_sim):
    q, d, t = batch
    ours = L.DistillKLDivLoss(temperature=temperature)
    assert_parity(lambda q, d: ours(pair_similarity(q, d, similarity), t),
                  lambda q, d: st_bi_loss(lambda m: st_bi.DistillKLDivLoss(m, similarity_fct=st_sim,
                                                                          temperature=temperature), q, d, t), q, d)


def test_margin_mse_scale_hand_computed():
    """A cosine student's margins are scaled by 20 (the recipe's), so they live on the teacher logits' scale."""
    s, t = torch.tensor([[0.9, 0.5, -0.2]]), torch.tensor([[8.0, 2.0, -1.0]])
    expected = ((20 * 0.4 - 6.0) ** 2 + (20 * 1.1 - 9.0) ** 2) / 2
    close(L.MarginMSELoss(scale=L.default_scale(L.MarginMSELoss, "cos"))(s, t), torch.tensor(expected))
    close(L.MarginMSELoss(scale=1.0)(s, t), torch.tensor(((0.4 - 6) ** 2 + (1.1 - 9) ** 2) / 2))


# ---------------------------------------------------------------- cross-encoder losses


class ScoreLookup(CrossEncoder):
    """Stand-in CrossEncoder: the pair (str(b), str(j)) scores scores[b, j]. Skips CrossEncoder.__init__ (no model)."""

    num_labels = 1
    device = torch.device("cpu")

    def __init__(self, scores):
        nn.Module.__init__(self)
        self.table = scores

    def preprocess(self, pairs, prompt=None, task=None, **kwargs):
        return {"pairs": torch.tensor([[int(a), int(b)] for a, b in pairs])}

    def forward(self, features, **kwargs):
        return {"scores": self.table[features["pairs"][:, 0], features["pairs"][:, 1]]}


def test_cross_encoder_mse_matches_st(batch):
    _, _, t = batch
    s = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(1))
    anchors, docs = zip(*[(str(b), str(j)) for b in range(B) for j in range(1 + K)])

    def reference(s):  # pointwise: one row per (query, candidate) pair
        return st_ce.MSELoss(ScoreLookup(s))([list(anchors), list(docs)], t.reshape(-1))

    assert_parity(lambda s: L.MSELoss()(s, t), reference, s)


def test_cross_encoder_margin_mse_matches_st(batch):
    _, _, t = batch
    s = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(1))
    columns = [[str(b) for b in range(B)]] + [[str(j)] * B for j in range(1 + K)]
    assert_parity(lambda s: L.MarginMSELoss()(s, t),
                  lambda s: st_ce.MarginMSELoss(ScoreLookup(s))(columns, t), s)


def test_cross_encoder_kl_hand_computed():
    s, t, tau = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]), torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, -2.0]]), 2.0

    def softmax(xs):
        z = sum(math.exp(x / tau) for x in xs)
        return [math.exp(x / tau) / z for x in xs]

    kls = [sum(p * math.log(p / r) for p, r in zip(softmax(ti), softmax(si))) for si, ti in zip(s.tolist(), t.tolist())]
    expected = tau**2 * sum(kls) / len(kls)  # KL(teacher || student) * tau^2, mean over queries
    close(L.DistillKLDivLoss(temperature=tau)(s, t), torch.tensor(expected))
    assert L.DistillKLDivLoss()(t, t).abs() < 1e-7  # student == teacher: no divergence


def test_cross_encoder_bce_hand_computed():
    s = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.2, -2.0]])
    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    # label 1 for column 0: -log sigmoid(s); label 0: -log(1 - sigmoid(s)) = -log sigmoid(-s)
    terms = [-log_sigmoid(row[0]) - sum(log_sigmoid(-x) for x in row[1:]) for row in s.tolist()]
    close(L.BinaryCrossEntropyLoss()(s), torch.tensor(sum(terms) / s.numel()))


# ---------------------------------------------------------------- GradCache vs CachedMultipleNegativesRankingLoss


class TinyEncoder(nn.Module):
    """Token embeddings -> dropout -> mean pooling over the attention mask -> linear."""

    def __init__(self, dropout):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.drop, self.proj = nn.Embedding(40, 16), nn.Dropout(dropout), nn.Linear(16, 8)

    def forward(self, features):
        mask = features["attention_mask"].unsqueeze(-1).float()
        x = self.drop(self.tok(features["input_ids"]))
        return self.proj((x * mask).sum(1) / mask.sum(1))


class SentenceEmbedding(nn.Module):
    def forward(self, x):
        return {"sentence_embedding": x}


def random_inputs(n, length, padded, g):
    ids = torch.randint(1, 40, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # random lengths >= 2
        for i, keep in enumerate(torch.randint(2, length + 1, (n,), generator=g).tolist()):
            mask[i, keep:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


# Parameter gradients reach |4.8| and are sums of many terms: in float32 even ST's own cached and plain MNRL differ
# by 1.4e-6 on them. So in float32 the 1e-6 is relative to the largest gradient; float64 shows the same math.
RELATIVE_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def close_scaled(a, b, dtype):
    torch.testing.assert_close(a, b, atol=RELATIVE_TOLERANCE[dtype] * max(1.0, b.abs().max().item()), rtol=0)


@pytest.mark.parametrize("dtype", RELATIVE_TOLERANCE)
@pytest.mark.parametrize("num_negatives,dropout,padded", [(0, 0.3, False), (2, 0.0, True)])
def test_grad_cache_matches_st_cached_mnrl(num_negatives, dropout, padded, dtype):
    """Same loss and parameter gradients as ST's CachedMultipleNegativesRankingLoss driven with the same encoder.

    With dropout, both must replay pass 1's dropout masks in pass 3; the masks agree between the two
    implementations only when they embed the same mini-batches in the same order, i.e. without hard negatives
    (ST embeds column by column, we embed the documents row-major).
    """
    n_queries, mini_batch_size = 7, 3
    g = torch.Generator().manual_seed(2)
    queries = random_inputs(n_queries, 5, padded, g)
    columns = [random_inputs(n_queries, 9, padded, g) for _ in range(1 + num_negatives)]
    docs = {key: torch.stack([c[key] for c in columns], 1).flatten(0, 1) for key in columns[0]}  # row-major
    encoder = TinyEncoder(dropout).to(dtype).train()

    torch.manual_seed(123)
    st_loss = st_bi.CachedMultipleNegativesRankingLoss(nn.Sequential(encoder, SentenceEmbedding()),
                                                       mini_batch_size=mini_batch_size)
    reference = st_loss([queries, *columns], None)
    reference.backward()
    reference_grads = [p.grad.clone() for p in encoder.parameters()]

    encoder.zero_grad()
    torch.manual_seed(123)
    mnrl = L.MultipleNegativesRankingLoss(scale=20.0)  # ST's default: cos_sim x 20

    def loss(q, d, teacher):  # on the cached vectors as RetrieverModule hands them over: the cosine model's unit vectors
        return mnrl(similarity_vectors(q, "cos"), similarity_vectors(d, "cos"), teacher)

    value = cached_loss_backward(encoder, queries, docs, loss, mini_batch_size, backward=torch.Tensor.backward)
    assert not value.requires_grad
    close_scaled(value, reference.detach(), dtype)
    for p, expected in zip(encoder.parameters(), reference_grads):
        assert expected.abs().sum() > 0
        close_scaled(p.grad, expected, dtype)


def test_grad_cache_equals_plain_backward_without_dropout():
    """With no randomness, GradCache must give the plain full-batch gradient (here with a teacher loss too)."""
    g = torch.Generator().manual_seed(3)
    queries, docs = random_inputs(5, 4, True, g), random_inputs(5 * 3, 6, True, g)
    teacher = torch.randn(5, 3, generator=g)
    encoder, margin_mse = TinyEncoder(0.0), L.MarginMSELoss()

    def loss(q, d, teacher):  # a score loss on a bi-encoder's vectors, as RetrieverModule hands it to GradCache
        return margin_mse(pair_similarity(q, d, "dot"), teacher)

    expected = loss(encoder(queries), encoder(docs).view(5, 3, -1), teacher)
    expected.backward()
    expected_grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    value = cached_loss_backward(encoder, queries, docs, loss, 2, torch.Tensor.backward, teacher=teacher)
    close(value, expected.detach())
    for p, e in zip(encoder.parameters(), expected_grads):
        close_scaled(p.grad, e, torch.float32)


def test_grad_cache_all_reduces_once_per_step():
    """Under DDP every backward outside `no_sync` all-reduces: GradCache must run all but its last one inside."""
    import contextlib

    g = torch.Generator().manual_seed(3)
    queries, docs = random_inputs(5, 4, True, g), random_inputs(5 * 3, 6, True, g)
    backwards = []  # True where a backward would all-reduce
    synced = [True]

    @contextlib.contextmanager
    def no_sync():
        synced[0] = False
        yield
        synced[0] = True

    def backward(x):
        backwards.append(synced[0])
        x.backward()

    cached_loss_backward(TinyEncoder(0.0), queries, docs, L.MultipleNegativesRankingLoss(), 2, backward,
                         no_sync=no_sync)
    assert len(backwards) == 3 + 8 and backwards == [False] * 10 + [True]  # ceil(5/2) + ceil(15/2) mini-batches


# ---------------------------------------------------------------- config contract and errors

ALL = [L.MarginMSELoss, L.MultipleNegativesRankingLoss, L.DistillKLDivLoss, L.MSELoss, L.BinaryCrossEntropyLoss]


def test_class_attributes_readable_without_instantiating():
    assert all(issubclass(cls, L.Loss) for cls in ALL)  # the base class declares the contract
    kinds = {cls.__name__: (cls.model_kind, cls.inputs, cls.needs_teacher, cls.min_candidates) for cls in ALL}
    assert kinds == {  # score losses train either model kind; in-batch negatives need a bi-encoder's vectors
        "MarginMSELoss": (None, "scores", True, 2), "MultipleNegativesRankingLoss": ("bi", "embeddings", False, 1),
        "DistillKLDivLoss": (None, "scores", True, 1), "MSELoss": (None, "scores", True, 1),
        "BinaryCrossEntropyLoss": (None, "scores", False, 1),
    }


def test_a_contract_that_cannot_hold_is_refused_when_the_class_is_written():
    with pytest.raises(TypeError, match="inputs"):
        type("Bad", (L.ScoreLoss,), {"inputs": "logits"})
    with pytest.raises(TypeError, match="model_kind = 'bi'"):  # embeddings exist only for bi-encoders
        type("Bad", (L.Loss,), {"inputs": "embeddings"})


@pytest.mark.parametrize("loss,batch_size,group_size,world_size,expected", [
    (L.MarginMSELoss(), 16, 2, 4, 1),                                   # its own hard negative, whatever the batch
    (L.BinaryCrossEntropyLoss(), 16, 5, 4, 4),                          # its own 4
    (L.MultipleNegativesRankingLoss(), 16, 2, 1, 31),                   # 16 x (1 + 1) candidates - its positive
    (L.MultipleNegativesRankingLoss(), 16, 3, 4, 191),                  # 4 devices gathered: 4 x 16 x 3 - 1
    (L.MultipleNegativesRankingLoss(num_hard_negatives=1), 8, 3, 2, 31),  # 1 of its 2: 2 x 8 x 2 - 1
    (L.MultipleNegativesRankingLoss(gather_across_devices=False), 16, 3, 4, 47),  # this device's: 16 x 3 - 1
])
def test_negatives_per_query(loss, batch_size, group_size, world_size, expected):
    assert loss.negatives_per_query(batch_size, group_size, world_size) == expected


def test_clear_errors(batch):
    q, d, t = batch
    with pytest.raises(ValueError, match="teacher scores"):
        L.MarginMSELoss()(pair_similarity(q, d, "dot"), None)
    with pytest.raises(ValueError, match="teacher scores have shape"):
        L.MSELoss()(t, t[:, :2])
    with pytest.raises(ValueError, match="num_hard_negatives"):
        L.MultipleNegativesRankingLoss(num_hard_negatives=K + 1)(q, d)
    with pytest.raises(ValueError, match="scale"):
        L.MultipleNegativesRankingLoss(scale=0)
    with pytest.raises(ValueError, match="losses.default_scale"):  # the config's null is resolved before building
        L.MarginMSELoss(scale=None)
    with pytest.raises(TypeError, match="similarity"):  # the similarity is the model's, never a loss's
        L.MultipleNegativesRankingLoss(similarity="cos")
    with pytest.raises(ValueError, match=r"doc_emb \[B, 1\+k, d\]"):
        L.MultipleNegativesRankingLoss()(q, d[:, 0])
