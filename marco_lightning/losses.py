"""Training losses, one nn.Module each, built by Hydra from `_target_`. Formulas: MarginMSE, Hofstaetter et al. 2020
(arXiv 2010.02666); MNRL, sentence-transformers' losses/MultipleNegativesRankingLoss.py (InfoNCE, van den Oord et al.
2018); listwise KL and pointwise MSE, sentence-transformers' examples/training/ms_marco (cross-encoder distillation).

Two call shapes, so neither the LightningModule nor a loss branches on the model kind or its similarity:
  score losses (`inputs = "scores"`, any model):  loss(scores [B, 1+k], teacher [B, 1+k] | None)
      a cross-encoder's scores are its logits, a bi-encoder's its similarity (BiEncoder.candidate_scores);
  MultipleNegativesRankingLoss (`inputs = "embeddings"`, bi-encoders): loss(query_emb [B, d], doc_emb [B, 1+k, d],
      teacher, query_ids=None, doc_ids=None, judged_ids=None): in-batch negatives need the vectors themselves (and
      their gathering across devices): the model hands over vectors whose inner product is its similarity
      (BiEncoder.embed_group: unit length for cos); query_ids [B] (train_rows=positive: one query has several rows) tell rows of one query apart, and
      doc_ids [B, 1+k] with judged_ids [B, P] (each row's query's judged positives) which candidates are relevant.
Column 0 is the positive, the rest are that query's hard negatives. Every loss is a `Loss`, whose class attributes
are its contract, read without building it (config.check_training_config, RetrieverModule, tasks/train).
No loss knows the similarity, which is the model's (model.similarity). A loss multiplies what it gets by `scale`;
the config's `loss.scale: null` is its recipe's scale for the model's similarity, `default_scale`, resolved where
the training task builds the loss for the model (tasks/train.build_loss).
"""

import math
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from marco_lightning.errors import ConfigError

INPUTS = ("scores", "embeddings")
# Student score = scale * similarity. Cosine lives in [-1, 1]: x20 gives InfoNCE its recipe's temperature (0.05)
# and MarginMSE margins on the scale of cross-encoder logits; dot products (and logits) are unit-free already.
RECIPE_SCALES = {"cos": 20.0, "dot": 1.0}


def default_scale(loss_cls: type["Loss"], similarity: str | None) -> float:
    """What `loss.scale: null` stands for: the loss's recipe scale for the model's similarity ("cos" or "dot"; None
    for a cross-encoder, whose logits are not scaled). A loss whose recipe scales nothing (DistillKL, MSE) gets 1."""
    return loss_cls.recipe_scales.get(similarity, 1.0) if similarity is not None else 1.0


def _check_teacher(loss: nn.Module, teacher, shape) -> None:
    if teacher is None:
        raise ValueError(
            f"{type(loss).__name__} distils from teacher scores, but the batch has none: "
            "train on data with teacher scores (e.g. a hard-negatives file with scores) or pick a supervised loss"
        )
    if teacher.shape != shape:
        raise ValueError(f"{type(loss).__name__}: teacher scores have shape {tuple(teacher.shape)}, "
                         f"expected {tuple(shape)} (one per query and candidate)")


def _check_bi(loss: nn.Module, query_emb, doc_emb) -> None:
    if query_emb.ndim != 2 or doc_emb.ndim != 3 or doc_emb.shape[0] != query_emb.shape[0] \
            or doc_emb.shape[2] != query_emb.shape[1]:
        raise ValueError(f"{type(loss).__name__}: expected query_emb [B, d] and doc_emb [B, 1+k, d], "
                         f"got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")


class Loss(nn.Module):
    """What every training loss declares (class attributes, so a config is checked before anything is built):

    inputs          "scores": forward(scores [B, 1+k], teacher); "embeddings": forward(query_emb, doc_emb, teacher)
    needs_teacher   the batches must carry teacher scores [B, 1+k]
    min_candidates  candidates per query it needs, the positive included (2: at least one hard negative)
    model_kind      None: trains either model kind; "bi": bi-encoders only (it needs their vectors)
    recipe_scales   its recipe's scale per model similarity (`default_scale`); absent: 1

    and takes `scale`, the factor on every score (1/temperature for InfoNCE).
    """

    inputs: ClassVar[str] = "scores"
    needs_teacher: ClassVar[bool] = True
    min_candidates: ClassVar[int] = 1
    model_kind: ClassVar[str | None] = None
    recipe_scales: ClassVar[dict[str, float]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.inputs not in INPUTS or cls.model_kind not in (None, "bi", "cross") or cls.min_candidates < 1:
            raise TypeError(f"{cls.__name__}: inputs={cls.inputs!r} (one of {INPUTS}), model_kind={cls.model_kind!r} "
                            f"(None, 'bi' or 'cross'), min_candidates={cls.min_candidates} (>= 1)")
        if cls.inputs == "embeddings" and cls.model_kind != "bi":
            raise TypeError(f"{cls.__name__} takes embeddings, which only a bi-encoder has: set model_kind = 'bi'")

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if scale is None or not scale > 0:
            raise ConfigError(f"{type(self).__name__}: scale={scale}; it must be a number > 0 (config key loss.scale; "
                              "null there is the recipe's scale for the model's similarity, losses.default_scale)")
        self.scale = float(scale)

    def negatives_per_query(self, batch_size: int, group_size: int, world_size: int) -> int:
        """How many negatives each query is scored against in one step (logged, so batch semantics are explicit):
        its own hard negatives, unless the loss adds others (in-batch negatives)."""
        return group_size - 1


class ScoreLoss(Loss):
    """A loss over each query's candidate scores [B, 1+k], multiplied by `scale` first; subclasses write
    `compute(scores, teacher)` only."""

    def forward(self, scores, teacher=None):
        name = type(self).__name__
        if scores.ndim != 2:
            raise ValueError(f"{name}: expected scores [B, 1+k], got {tuple(scores.shape)}")
        if scores.shape[1] < self.min_candidates:
            raise ValueError(f"{name} needs at least {self.min_candidates - 1} hard negative(s) per query "
                             f"(num_negatives >= {self.min_candidates - 1})")
        if self.needs_teacher:
            _check_teacher(self, teacher, scores.shape)
            teacher = teacher.detach()
        return self.compute(self.scale * scores if self.scale != 1 else scores, teacher)

    def compute(self, scores, teacher):
        raise NotImplementedError


class MarginMSELoss(ScoreLoss):
    """Hofstaetter et al. 2020: match the student's margins s(q,p) - s(q,n) to the teacher's. The paper's s is the dot
    product; s = scale * cos trains a cosine model (msmarco-MiniLM-L6-cos-v5) without leaving its geometry."""

    recipe_scales, min_candidates = RECIPE_SCALES, 2

    def compute(self, scores, teacher):
        return F.mse_loss(scores[:, :1] - scores[:, 1:], teacher[:, :1] - teacher[:, 1:])


class DistillKLDivLoss(ScoreLoss):
    """Listwise distillation: KL(softmax(T / tau) || softmax(s / tau)) * tau^2 over each query's 1+k candidates."""

    def __init__(self, temperature: float = 1.0, scale: float = 1.0):
        super().__init__(scale)
        if not temperature > 0:
            raise ConfigError(f"DistillKLDivLoss: loss.temperature={temperature} must be > 0")
        self.temperature = temperature

    def compute(self, scores, teacher):
        tau = self.temperature
        student, target = F.log_softmax(scores / tau, dim=1), F.softmax(teacher / tau, dim=1)
        return F.kl_div(student, target, reduction="batchmean") * tau**2  # batchmean: mean over queries


class MSELoss(ScoreLoss):
    """Pointwise distillation: mean (s - T)^2 over every (query, candidate) pair."""

    def compute(self, scores, teacher):
        return F.mse_loss(scores, teacher)


class BinaryCrossEntropyLoss(ScoreLoss):
    """Supervised pointwise loss: BCE with logits, label 1 for the positive (column 0), 0 for the negatives."""

    needs_teacher = False

    def compute(self, scores, teacher):
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1
        return F.binary_cross_entropy_with_logits(scores, labels)


def _world():
    """(rank, world_size) of the default process group, (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. all_gather's gloo backward scatters into
    empty_like(grad), and gloo scatter scrambles non-contiguous tensors (pytorch/pytorch#192920)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _gather_with_grad(x):
    """Concatenate x from every rank along dim 0; gradients flow back to the rank that owns each slice."""
    import torch.distributed.nn.functional as dist_fn  # needs a process group; import only when used

    return torch.cat([_ContiguousGrad.apply(part) for part in dist_fn.all_gather(x.contiguous())], dim=0)


GUARD_STRATEGIES = ("absolute", "relative")


def _gather_ids(ids):
    """Ids [B, ...] (query or document ids) of every rank, concatenated along B (no gradient)."""
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


class MultipleNegativesRankingLoss(Loss):
    """InfoNCE with in-batch negatives: each query against every query's positive and hard negatives, scored by
    scale x inner product of the vectors the model hands over (unit vectors for a cosine model: scale x cos).

    Under torch.distributed the candidates of all ranks are gathered (with gradients), so the effective number of
    negatives grows with the number of devices; queries stay local and labels are offset by rank * B.

    Two kinds of candidates can be left out of the softmax (logit -inf, as GISTEmbedLoss does), both decided inside
    the loss from the vectors it is given, so the plain step, GradCache (its cached vectors) and DDP (the gathered
    candidates) mask alike:
    - with `query_ids` (train_rows=positive), the positive of another row of the same query: a true positive, not a
      negative (what sentence-transformers' BatchSamplers.NO_DUPLICATES avoids by never batching a text twice);
    - with `leave_out_judged` and the batch's `doc_ids` [B, 1+k] / `judged_ids` [B, P] (every judged positive of
      the row's query, -1 padded), any candidate judged relevant to the row's query: another query's positive or
      hard negative that the qrels call relevant here (the rule task=mine applies to a query's own list);
    - with `guard_margin` (a false-negative guard, GISTEmbedLoss's rule with the model being trained as its own
      guide), every candidate whose detached similarity exceeds the positive's minus `guard_margin`
      (`guard_strategy="absolute"`) or minus |positive's| x `guard_margin` ("relative"). Similarities are the
      model's own (cos for a cosine model), before `scale`; the query's own positive is never left out.
    The symmetric term (each positive against the queries) leaves out alike: another row of its query, and queries
    scoring above the guard's threshold from its own query's score.
    """

    model_kind, inputs, needs_teacher = "bi", "embeddings", False
    recipe_scales = RECIPE_SCALES  # sentence-transformers' MNRL: cos_sim x 20

    def __init__(self, scale: float = 1.0, num_hard_negatives: int | None = None, symmetric: bool = False,
                 gather_across_devices: bool = True, guard_margin: float | None = None,
                 guard_strategy: str = "absolute", leave_out_judged: bool = False):
        super().__init__(scale)  # 1/temperature
        if num_hard_negatives is not None and num_hard_negatives < 0:
            raise ConfigError(f"MultipleNegativesRankingLoss: loss.num_hard_negatives={num_hard_negatives} must be "
                              ">= 0 (null: all the batch carries)")
        if guard_strategy not in GUARD_STRATEGIES:
            raise ConfigError(f"MultipleNegativesRankingLoss: guard_strategy={guard_strategy!r}; use one of "
                              f"{GUARD_STRATEGIES} (loss.guard_strategy)")
        if guard_margin is not None and not math.isfinite(guard_margin):
            raise ConfigError(f"MultipleNegativesRankingLoss: guard_margin={guard_margin}; a finite number, or null "
                              "for no guard (loss.guard_margin)")
        self.num_hard_negatives, self.symmetric = num_hard_negatives, symmetric
        self.gather_across_devices = gather_across_devices
        self.guard_margin, self.guard_strategy = guard_margin, guard_strategy
        self.leave_out_judged = leave_out_judged

    def forward(self, query_emb, doc_emb, teacher=None, query_ids=None, doc_ids=None, judged_ids=None):
        _check_bi(self, query_emb, doc_emb)
        k = doc_emb.shape[1] - 1 if self.num_hard_negatives is None else self.num_hard_negatives
        if k > doc_emb.shape[1] - 1:
            raise ConfigError(f"MultipleNegativesRankingLoss: loss.num_hard_negatives={k} but the batch carries only "
                              f"{doc_emb.shape[1] - 1} per query; lower loss.num_hard_negatives or set num_negatives "
                              f">= {k}")
        if query_ids is not None and tuple(query_ids.shape) != (query_emb.shape[0],):
            raise ValueError(f"MultipleNegativesRankingLoss: query_ids have shape {tuple(query_ids.shape)}, "
                             f"expected ({query_emb.shape[0]},): one per query")
        queries, docs = query_emb, doc_emb[:, : 1 + k]
        rank, world = _world() if self.gather_across_devices else (0, 1)
        all_queries, all_docs, all_ids = queries, docs, query_ids
        if world > 1:  # candidates from every rank; queries stay local (all of them only for the symmetric term)
            all_docs = _gather_with_grad(docs)
            all_queries = _gather_with_grad(queries) if self.symmetric else queries
            all_ids = _gather_ids(query_ids) if query_ids is not None else None
        # Column-major candidates: all positives first, then each hard-negative column (sentence-transformers' order)
        cands = all_docs.transpose(0, 1).reshape(-1, docs.shape[-1])
        labels = rank * queries.shape[0] + torch.arange(queries.shape[0], device=queries.device)
        # [B, world * B]: column j (query j's positive; in the symmetric term query j) is another row of i's query
        same = None
        if query_ids is not None:
            same = query_ids[:, None] == all_ids[None, :]
            same[torch.arange(len(labels), device=labels.device), labels] = False
        scores = self.scale * queries @ cands.T  # [B, world * B * (1+k)]
        pad = None if same is None else torch.cat([same, same.new_zeros(same.shape[0], k * same.shape[1])], 1)
        judged = self._judged(doc_ids, judged_ids, k, world, labels)
        if judged is not None:
            pad = judged[0] if pad is None else pad | judged[0]
        loss = F.cross_entropy(self._leave_out(scores, queries, cands, labels, pad), labels)
        if self.symmetric:  # each local positive against all queries (sentence-transformers' "doc_to_query")
            # all_queries: gathered under DDP (labels offset by rank, as all_ids), else this rank's (rank 0)
            scores = self.scale * docs[:, 0] @ all_queries.T
            if judged is not None:
                same = judged[1] if same is None else same | judged[1]
            loss = (loss + F.cross_entropy(self._leave_out(scores, docs[:, 0], all_queries, labels, same),
                                           labels)) / 2
        return loss

    def _judged(self, doc_ids, judged_ids, k, world, labels):
        """With leave_out_judged and the batch's ids: (bool [B, world * B * (1+k)]: candidate judged relevant to the
        row's query; bool [B, world * B]: the row's positive judged relevant to that column's query, for the
        symmetric term), each row's own label False; else None."""
        if not self.leave_out_judged or doc_ids is None or judged_ids is None:
            return None
        doc_ids = doc_ids[:, : 1 + k]
        all_doc_ids, all_judged = doc_ids, judged_ids
        if world > 1:
            all_doc_ids = _gather_ids(doc_ids)
            if self.symmetric:  # every rank's judged lists, padded to the longest
                width = torch.tensor(judged_ids.shape[1], device=judged_ids.device)
                dist.all_reduce(width, op=dist.ReduceOp.MAX)
                all_judged = _gather_ids(F.pad(judged_ids, (0, int(width) - judged_ids.shape[1]), value=-1))
        rows = torch.arange(len(labels), device=labels.device)
        cand_ids = all_doc_ids.transpose(0, 1).reshape(-1)  # the candidates' column-major order
        forward = ((cand_ids[None, :, None] == judged_ids[:, None, :]) & (judged_ids[:, None, :] >= 0)).any(-1)
        forward[rows, labels] = False
        backward = None
        if self.symmetric:
            backward = ((doc_ids[:, :1, None] == all_judged[None, :, :]) & (all_judged[None] >= 0)).any(-1)
            backward[rows, labels] = False
        return forward, backward

    def _leave_out(self, scores, rows, columns, labels, same):
        """scores [B, N] (scale x rows @ columns.T) with the left-out candidates at -inf: `same` (bool [B, N] or
        None) and, with a guard, every column whose detached similarity is above row i's threshold from its
        positive, column labels[i] (never left out itself). Unchanged when nothing is to be left out."""
        leave_out = same
        if self.guard_margin is not None:
            with torch.no_grad():
                similarity = rows.detach() @ columns.detach().T  # the model's similarity, before scale
                positive = similarity.gather(1, labels[:, None])
                margin = self.guard_margin if self.guard_strategy == "absolute" else positive.abs() * self.guard_margin
                guard = similarity > positive - margin
                guard[torch.arange(len(labels), device=labels.device), labels] = False
            leave_out = guard if leave_out is None else leave_out | guard
        return scores if leave_out is None else scores.masked_fill(leave_out, float("-inf"))

    def negatives_per_query(self, batch_size: int, group_size: int, world_size: int) -> int:
        """Every candidate of the (gathered) batch but the query's own positive (before any is left out)."""
        k = group_size - 1 if self.num_hard_negatives is None else self.num_hard_negatives
        devices = world_size if self.gather_across_devices else 1
        return batch_size * devices * (1 + k) - 1
