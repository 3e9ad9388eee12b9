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


# ---------------------------------------------------------------- MNRL's false-negative guard and same-query rows


def _unit(degrees):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_guard_masks_the_candidates_above_the_positive_minus_the_margin_by_hand():
    """3 queries on the unit circle, one hard negative each; absolute margin 0.1 on the cosines.

    candidates (column-major): p0 10°, p1 95°, p2 200°, n0 92°, n1 130°, n2 185°; queries at 0°, 90°, 180°.
    Thresholds: cos 10° - 0.1 = 0.8848, cos 5° - 0.1 = 0.8962, cos 20° - 0.1 = 0.8397. Above them: query 1's
    in-batch candidate n0 (cos 2° = 0.9994, another query's hard negative) and query 2's own hard negative n2
    (cos 5° = 0.9962); nothing of query 0's row.
    """
    q, d = _unit([0, 90, 180]), torch.stack([_unit([10, 95, 200]), _unit([92, 130, 185])], 1)
    angles_q, angles_c = [0, 90, 180], [10, 95, 200, 92, 130, 185]
    cos = [[math.cos(math.radians(c - a)) for c in angles_c] for a in angles_q]
    masked = [[], [3], [5]]  # by hand, above
    for i, row in enumerate(cos):
        threshold = row[i] - 0.1
        assert [j for j, s in enumerate(row) if j != i and s > threshold] == masked[i]
    expected = sum(math.log(sum(math.exp(20 * s) for j, s in enumerate(row) if j not in masked[i])) - 20 * row[i]
                   for i, row in enumerate(cos)) / 3
    guarded = L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=0.1)
    torch.testing.assert_close(guarded(q, d), torch.tensor(expected), atol=1e-5, rtol=0)
    plain = sum(math.log(sum(math.exp(20 * s) for s in row)) - 20 * row[i] for i, row in enumerate(cos)) / 3
    torch.testing.assert_close(L.MultipleNegativesRankingLoss(scale=20.0)(q, d), torch.tensor(plain), atol=1e-5,
                               rtol=0)
    # the guard took the two false negatives out: 0.7137 -> 0.0042 (what remains is far below each positive)
    assert (round(plain, 4), round(expected, 4)) == (0.7137, 0.0042)
    # a threshold above every score leaves nothing out; one below every score leaves all out but the positive
    torch.testing.assert_close(L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=-3.0)(q, d),
                               torch.tensor(plain), atol=1e-5, rtol=0)
    assert L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=3.0)(q, d) == 0  # only the positive is left


def test_relative_guard_takes_the_margin_from_the_positives_magnitude():
    """GISTEmbedLoss's relative rule, positive - |positive| x margin, also for a negative positive score (where
    positive x (1 - margin) would be a threshold above the positive)."""
    q, d = _unit([0]), torch.stack([_unit([120]), _unit([121.5])], 1)  # cos 120° = -0.5, cos 121.5° = -0.5225
    # margin 0.1: threshold -0.55, the negative is above it (left out; -0.5 x 0.9 = -0.45 would keep it);
    # margin 0.01: threshold -0.505, the negative is below it (kept)
    for margin, left_out in ((0.1, True), (0.01, False)):
        guarded = L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=margin, guard_strategy="relative")
        assert (guarded(q, d) == 0) == left_out  # with the negative left out, only the positive remains


class GuideLookup(EmbeddingLookup):
    """EmbeddingLookup with what GISTEmbedLoss asks of its model and guide: a transformers tokenizer and a
    max_seq_length (equal for both, so it embeds the same features with the guide: no re-tokenising)."""

    def __init__(self, table):
        super().__init__(table)
        from transformers import AutoTokenizer

        from marco_lightning.models import resolve_backbone

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("sentence-transformers/all-MiniLM-L6-v2"))
        self.max_seq_length = 128


def st_gist_loss(q, d, **kwargs):
    """sentence-transformers' GISTEmbedLoss with the trained model as its own guide, on columns (q, d[:, 0], ...)."""
    model = GuideLookup(torch.cat([q, d.transpose(0, 1).reshape(-1, q.shape[1])]))
    columns = torch.arange(len(model.table)).view(-1, 1).split(q.shape[0])
    features = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in columns]
    return st_bi.GISTEmbedLoss(model, model, contrast_anchors=False, contrast_positives=False, **kwargs)(features,
                                                                                                         None)


@pytest.mark.parametrize("strategy,margin", [("absolute", 0.1), ("absolute", 0.0), ("relative", 0.3)])
@pytest.mark.parametrize("num_negatives", [1, 0])
def test_guard_equals_st_gist_embed_loss_with_the_model_as_its_own_guide(strategy, margin, num_negatives):
    """GISTEmbedLoss (sentence_transformers/sentence_transformer/losses/gist_embed.py, v6.2: forward, lines
    190-247) masks with the guide's cosines what it scores with the model's; with the model as its own guide (no
    dropout: the same vectors) and without its anchor-anchor / positive-positive terms it is MNRL with our guard.
    temperature = 1 / scale. GIST takes one hard-negative column at most."""
    g = torch.Generator().manual_seed(4)
    q, d = torch.randn(B, D, generator=g), torch.randn(B, 1 + num_negatives, D, generator=g)
    ours = L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=margin, guard_strategy=strategy)
    # the mask is exercised, and no similarity sits on a threshold (where rounding could flip it)
    cos = similarity_vectors(q, "cos") @ similarity_vectors(d, "cos").transpose(0, 1).reshape(-1, D).T
    positive = cos.diagonal()[:, None]
    threshold = positive - (margin if strategy == "absolute" else positive.abs() * margin)
    off_diagonal = ~torch.eye(B, len(cos[0]), dtype=torch.bool)
    assert 0 < int(((cos > threshold) & off_diagonal).sum()) < int(off_diagonal.sum())
    assert ((cos - threshold).abs()[off_diagonal] > 1e-4).all()
    assert_parity(lambda q, d: ours(similarity_vectors(q, "cos"), similarity_vectors(d, "cos")),
                  lambda q, d: st_gist_loss(q, d, temperature=1 / 20.0, margin_strategy=strategy, margin=margin),
                  q, d)


def test_rows_of_one_query_do_not_count_each_others_positive_as_a_negative(batch):
    """train_rows=positive: rows 0 and 3 are one query, so neither scores the other's positive as a negative
    (their hard negatives still count); its loss is MNRL over the candidates without those two columns."""
    q, d, _ = batch
    q, d = similarity_vectors(q, "cos"), similarity_vectors(d, "cos")
    d[3, 0] = q[0]  # row 3's positive is a positive of row 0's query too (the same query): its best candidate
    ids = torch.tensor([7, 8, 9, 7, 10, 11])
    mnrl = L.MultipleNegativesRankingLoss(scale=20.0)
    cands = d.transpose(0, 1).reshape(-1, D)
    scores = 20.0 * q @ cands.T
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[0, 3] = keep[3, 0] = False  # column j < B is query j's positive
    expected = torch.stack([-(scores[i, i] - torch.logsumexp(scores[i][keep[i]], 0)) for i in range(B)]).mean()
    close(mnrl(q, d, query_ids=ids), expected)
    assert (mnrl(q, d, query_ids=ids) - mnrl(q, d)).abs() > 1e-3
    close(mnrl(q, d, query_ids=torch.arange(B)), mnrl(q, d))  # distinct queries: plain MNRL
    # the symmetric term leaves out the other row of the query alike
    sym = L.MultipleNegativesRankingLoss(scale=20.0, symmetric=True)
    back = 20.0 * d[:, 0] @ q.T
    keep_back = torch.ones_like(back, dtype=torch.bool)
    keep_back[0, 3] = keep_back[3, 0] = False
    expected_back = torch.stack([-(back[i, i] - torch.logsumexp(back[i][keep_back[i]], 0)) for i in range(B)]).mean()
    close(sym(q, d, query_ids=ids), (expected + expected_back) / 2)


def test_candidates_judged_relevant_to_a_rows_query_are_left_out(batch):
    """leave_out_judged: row 0's query is judged relevant to row 2's positive and row 4's first hard negative, row 1's
    to its own positive only; those two candidates leave row 0's softmax (the label never leaves), and in the
    symmetric term row 2's positive does not count query 0 as a negative. Off (the default), the ids change nothing."""
    q, d, _ = batch
    q, d = similarity_vectors(q, "cos"), similarity_vectors(d, "cos")
    doc_ids = 100 + torch.arange(B * (1 + K)).view(B, 1 + K)
    judged = torch.full((B, 3), -1)
    judged[:, 0] = doc_ids[:, 0]  # every row's own positive
    judged[0, 1:] = torch.tensor([doc_ids[2, 0], doc_ids[4, 1]])
    ids = {"doc_ids": doc_ids, "judged_ids": judged}
    cands = d.transpose(0, 1).reshape(-1, D)  # column c * B + r: row r's candidate c
    scores = 20.0 * q @ cands.T
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[0, 2] = keep[0, 1 * B + 4] = False
    expected = torch.stack([-(scores[i, i] - torch.logsumexp(scores[i][keep[i]], 0)) for i in range(B)]).mean()
    mnrl = L.MultipleNegativesRankingLoss(scale=20.0, leave_out_judged=True)
    close(mnrl(q, d, **ids), expected)
    assert (mnrl(q, d, **ids) - mnrl(q, d)).abs() > 1e-3
    assert torch.equal(L.MultipleNegativesRankingLoss(scale=20.0)(q, d, **ids), L.MultipleNegativesRankingLoss(
        scale=20.0)(q, d))
    back = 20.0 * d[:, 0] @ q.T
    keep_back = torch.ones_like(back, dtype=torch.bool)
    keep_back[2, 0] = False
    expected_back = torch.stack([-(back[i, i] - torch.logsumexp(back[i][keep_back[i]], 0)) for i in range(B)]).mean()
    sym = L.MultipleNegativesRankingLoss(scale=20.0, symmetric=True, leave_out_judged=True)
    close(sym(q, d, **ids), (expected + expected_back) / 2)
    # with one hard-negative column used of K, row 4's first hard negative is still a candidate; the rest are not
    one = L.MultipleNegativesRankingLoss(scale=20.0, num_hard_negatives=1, leave_out_judged=True)
    s1 = scores[:, : 2 * B]
    k1 = keep[:, : 2 * B]
    close(one(q, d, **ids), torch.stack([-(s1[i, i] - torch.logsumexp(s1[i][k1[i]], 0)) for i in range(B)]).mean())


def test_defaults_leave_mnrl_unchanged(batch):
    """No guard and no query ids: the very same computation as before the levers (bit for bit)."""
    q, d, _ = batch
    q, d = similarity_vectors(q, "cos"), similarity_vectors(d, "cos")
    cands = d.transpose(0, 1).reshape(-1, D)
    expected = torch.nn.functional.cross_entropy(20.0 * q @ cands.T, torch.arange(B))
    assert torch.equal(L.MultipleNegativesRankingLoss(scale=20.0)(q, d), expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_grad_cache_with_guard_and_query_ids_equals_plain_backward(symmetric):
    """The mask is computed inside the loss from the vectors it is given: GradCache's cached vectors mask exactly
    as the plain step's, so loss and gradients agree (no dropout: the two paths then embed the same vectors)."""
    g = torch.Generator().manual_seed(5)
    queries, docs = random_inputs(6, 4, True, g), random_inputs(6 * 3, 6, True, g)
    ids = torch.tensor([1, 2, 1, 3, 2, 4])
    encoder = TinyEncoder(0.0)
    mnrl = L.MultipleNegativesRankingLoss(scale=20.0, guard_margin=0.05, symmetric=symmetric)

    def loss(q, d, teacher=None):
        return mnrl(similarity_vectors(q, "cos"), similarity_vectors(d, "cos"), teacher, query_ids=ids)

    expected = loss(encoder(queries), encoder(docs).view(6, 3, -1))
    expected.backward()
    expected_grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    value = cached_loss_backward(encoder, queries, docs, loss, 2, torch.Tensor.backward)
    close(value, expected.detach())
    for p, e in zip(encoder.parameters(), expected_grads):
        close_scaled(p.grad, e, torch.float32)


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="guard_strategy"):
        L.MultipleNegativesRankingLoss(guard_margin=0.1, guard_strategy="percent")
    with pytest.raises(ValueError, match="guard_margin"):
        L.MultipleNegativesRankingLoss(guard_margin=float("nan"))
    q, d = torch.randn(3, 4), torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="query_ids"):
        L.MultipleNegativesRankingLoss()(q, d, query_ids=torch.arange(2))
