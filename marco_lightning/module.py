"""The LightningModule: one training step for every model and loss, validation by re-ranking."""
from __future__ import annotations

import contextlib
import functools
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from transformers import get_linear_schedule_with_warmup

from marco_lightning.errors import UserError
from marco_lightning.evaluation import DEFAULT_MEASURES, compute_metrics
from marco_lightning.grad_cache import cached_loss_backward
from marco_lightning.losses import Loss
from marco_lightning.models import pair_similarity


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged; the message says which settings to change."""


class RetrieverModule(pl.LightningModule):
    def __init__(self, model, loss, optimizer, warmup_steps: float, val_qrels: dict | None = None,
                 val_rel_level: int = 2, val_measures=DEFAULT_MEASURES, val_ids=None,
                 mini_batch_size: int | None = None, gradient_clip_val: float | None = None,
                 config: dict | None = None, schedule_epochs: int | None = None):
        super().__init__()
        # the resolved run config travels in every checkpoint (checkpoint["hyper_parameters"]["config"]), so a .ckpt
        # alone says how it was made; the modules themselves are rebuilt from it, not pickled
        self.save_hyperparameters({"config": config} if config else {}, logger=False)  # loggers log cfg already
        if not isinstance(loss, Loss):
            raise TypeError(f"{type(loss).__name__} is not a marco_lightning.losses.Loss, which declares what a loss "
                            "takes (inputs, needs_teacher, min_candidates, model_kind): derive it from Loss or ScoreLoss")
        self.model, self.loss, self.optimizer_factory, self.warmup_steps = model, loss, optimizer, warmup_steps
        # the LR schedule's length in epochs when it is not the run's (task.refit: the selection run's schedule,
        # stopped after the epochs val chose); None: the run's own
        self.schedule_epochs = schedule_epochs
        self.loss_on_embeddings = loss.inputs == "embeddings"  # the loss's declared contract (MNRL); others: scores
        # GradCache needs a backward per mini-batch, which only manual optimisation allows.
        self.mini_batch_size, self.gradient_clip_val = mini_batch_size, gradient_clip_val
        self.automatic_optimization = mini_batch_size is None
        # Validation is scored by the one metric function of task=evaluate and the report, on the data's own ids
        # (val_ids maps a BEIR store's rows back to the folder's ids, which decide trec_eval's tie order).
        self.val_named = val_ids.to_names if val_ids is not None else (lambda run: run)
        self.val_judged, self.val_rel_level = self.val_named(val_qrels or {}), val_rel_level
        self.val_measures = tuple(val_measures)
        self.val_rows: list[torch.Tensor] = []
        self.last_val_run: dict[str, dict[str, float]] = {}
        self.last_val_step = -1  # global step of the weights last_val_run was computed with
        # where this process's time went (metrics.json "seconds"): each validation pass, each epoch trained
        self.val_seconds: list[float] = []
        self.trained_epochs: list[int] = []
        self._val_start = 0.0

    def on_train_start(self):
        # A resumed fit: Lightning made the training iterator while configure_optimizers asked for the run's steps,
        # before it restored the progress, and DataLoader workers fetch batches the moment an iterator exists.
        # Make it again, now that the sampler can ask where the checkpoint stopped (else this epoch replays
        # epoch 0's order, and a refresh's lists restored since are unseen by those workers).
        fetcher = self.trainer.fit_loop._data_fetcher
        if self.trainer.ckpt_path is not None and fetcher is not None:
            iter(fetcher)

    def on_train_batch_start(self, batch, batch_idx):
        # per batch, not on_train_epoch_start: a run resumed mid-epoch does not start that epoch again
        if not self.trained_epochs or self.trained_epochs[-1] != self.current_epoch:
            self.trained_epochs.append(self.current_epoch)

    def on_validation_epoch_start(self):
        self._val_start = time.perf_counter()

    def on_fit_start(self):
        # from_pretrained returns the backbone in eval mode and Lightning keeps each module's mode, so without this
        # the model would train without dropout, unlike the published recipes (sentence-transformers calls train()).
        self.model.train()

    def training_step(self, batch, batch_idx):
        if not self.automatic_optimization:
            return self._grad_cache_step(batch)
        # The model turns its batch into what the loss takes (scores, or the vectors for in-batch negatives), so
        # nothing here depends on the model kind or the loss.
        if self.loss_on_embeddings:
            loss = self.loss(*self.model.embed_group(batch), batch.get("teacher"), **_query_ids(batch))
        else:
            loss = self.loss(self.model.candidate_scores(batch), batch.get("teacher"))
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=_num_queries(batch))
        return loss

    def _grad_cache_step(self, batch):
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        wrapped = self.trainer.strategy.model  # DDP's wrapper under DDP: one all-reduce per step, not per mini-batch
        no_sync = getattr(wrapped, "no_sync", None) or contextlib.nullcontext
        loss = cached_loss_backward(self.model.embed, batch["query"], batch["docs"],
                                    functools.partial(self._cached_loss, **_query_ids(batch)), self.mini_batch_size,
                                    self.manual_backward, batch.get("teacher"), no_sync=no_sync)
        self._check_finite(loss)  # before the step: the weights stay the last finite ones
        self.configure_gradient_clipping(optimizer, self.gradient_clip_val, "norm")
        optimizer.step()
        scheduler.step()
        self.log("train/loss", loss, prog_bar=True, batch_size=_num_queries(batch))
        return loss

    def _cached_loss(self, query_emb, doc_emb, teacher, **query_ids):
        """The loss of GradCache's cached embeddings, as the plain step computes it: compared by the model's
        similarity (its vectors for an embedding loss, its scores for a score loss)."""
        if self.loss_on_embeddings:
            return self.loss(self.model.similarity_vectors(query_emb), self.model.similarity_vectors(doc_emb), teacher,
                             **query_ids)
        return self.loss(pair_similarity(query_emb, doc_emb, self.model.similarity), teacher)

    def _check_finite(self, loss):
        """Stop at the first non-finite loss, on every rank at once (one would otherwise wait for the others);
        nothing is saved after it, so the last checkpoint holds the last finite weights."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item():
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}): lower "
                f"optimizer.lr (now {self.optimizer_factory.keywords.get('lr')}), keep trainer.gradient_clip_val "
                "set, or use trainer.precision=bf16-mixed / 32-true instead of 16-mixed. No final_model/ was "
                "exported; checkpoints/ hold the last weights saved before this step.")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not gradient_clip_val:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps it in manual optimisation
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)  # optimizer.fused=true
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed
        if not fused and (scaler is None or self.automatic_optimization):
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # Lightning cannot clip these right: it refuses a fused optimizer under mixed precision, and in manual
        # optimisation (GradCache) it unscales fp16 gradients only inside optimizer.step(), after clipping.
        limit = gradient_clip_val
        if scaler is not None and fused:
            scaler.unscale_(optimizer)  # the fused step then skips its own unscaling
        elif scaler is not None:
            limit *= scaler.get_scale()  # gradients still scaled: the same clip at the scaled threshold
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, limit)
        else:
            torch.nn.utils.clip_grad_norm_(params, limit)

    def validation_step(self, batch, batch_idx):
        scores = self.model.score_pairs(batch).float()
        self.val_rows.append(torch.stack([batch["qid"].double(), batch["pid"].double(), scores.double()], 1).cpu())

    def on_validation_epoch_end(self):
        if self._trainer is not None and self.trainer.sanity_checking:  # 2 batches: not a ranking to keep
            self.val_rows = []
            return
        self.last_val_run, self.last_val_step = gather_run(self.val_rows), self.global_step
        self.val_rows = []
        self.val_seconds.append(time.perf_counter() - self._val_start)
        # every rank holds the whole run, so each logs (and checkpoints on) the same values: no sync needed
        self.log_dict({f"val/{k}": v for k, v in self.measure(self.last_val_run).items()}, prog_bar=True)

    def measure(self, run: dict[str, dict[str, float]]) -> dict[str, float]:
        """The validation measures of a run in the store's ids (validation's own, or any other of these queries)."""
        return compute_metrics(self.val_judged, self.val_named(run), self.val_rel_level, self.val_measures)

    # RNG states travel with the checkpoint, so dropout after a resume draws what an unbroken run would have.
    def on_save_checkpoint(self, checkpoint):
        if not all(p.isfinite().all() for p in self.model.parameters()):  # never overwrite good weights with these
            raise NonFiniteLossError(f"the weights are not finite at step {self.global_step}: not checkpointed. "
                                     "Lower optimizer.lr or keep trainer.gradient_clip_val set.")
        checkpoint["rng_states"] = _collect_rng_states()
        # a .ckpt is scored as it was trained (Normalize, max_seq_length and prompts have no weights to tell)
        checkpoint["similarity"] = getattr(self.model, "similarity", None)
        checkpoint["max_seq_length"] = getattr(self.model, "max_doc_length", None)
        checkpoint["prompts"] = getattr(self.model, "prompts", None)

    def on_load_checkpoint(self, checkpoint):
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self):
        # No weight decay on biases and LayerNorm weights, as in BERT and sentence-transformers.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        wd = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        optimizer = self.optimizer_factory([{"params": decay, "weight_decay": wd},
                                            {"params": no_decay, "weight_decay": 0.0}])
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.schedule_epochs:
            total = max(int(total * self.schedule_epochs / self.trainer.max_epochs), 1)
        # warmup_steps < 1 is a fraction of the run (handy for short runs), otherwise a step count.
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        scheduler = get_linear_schedule_with_warmup(optimizer, int(min(warmup, total)), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def gather_run(rows: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """(qid, pid, score) rows of this rank -> the run of all ranks, on every rank. A pair seen twice (the padding
    DistributedSampler adds) keeps one score."""
    rows = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        rows = torch.cat(parts)
    run: dict[str, dict[str, float]] = {}
    for qid, pid, score in rows.tolist():
        run.setdefault(str(int(qid)), {})[str(int(pid))] = score
    return run


def _query_ids(batch) -> dict:
    """An embedding loss's row ids, those the batch carries: `query_ids` (train_rows=positive: one query has several
    rows), `doc_ids` and `judged_ids` (MNRL's leave_out_judged); nothing for batches without them, so a loss that
    never sees them need not take them."""
    return {key: batch[key] for key in ("query_ids", "doc_ids", "judged_ids") if key in batch}


def _num_queries(batch) -> int:
    if "query" in batch:
        return len(batch["query"]["input_ids"])
    return len(batch["pairs"]["input_ids"]) // batch["group_size"]


def _collect_rng_states() -> dict:
    import random

    import numpy as np

    # plain tensors and tuples only: Lightning loads checkpoints with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
