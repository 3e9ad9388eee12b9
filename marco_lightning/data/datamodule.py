"""The LightningDataModule: prepares the memory-mapped store once, then serves training and re-ranking batches."""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from marco_lightning.data.sampling import (
    EpochShardSampler,
    RerankPairs,
    StridedShardSampler,
    TrainDataset,
    worker_init,
)
from marco_lightning.data.store import Store, prepare
from marco_lightning.errors import ConfigError, MissingFileError
from marco_lightning.refresh import RefreshSettings
from marco_lightning.refresh import load as refresh_lists
from marco_lightning.refresh import refresh as refresh_negatives


def negatives_inputs(negatives) -> dict:
    """The negatives settings with the systems' short names resolved: what a store's content depends on.
    negatives.aliases (conf/negatives/bm25.yaml) are short names of the hard-negatives file's systems; the store is
    keyed by the full names they stand for, not by the map: a new alias changes no store."""
    neg = OmegaConf.to_container(negatives, resolve=True) if OmegaConf.is_config(negatives) else dict(negatives)
    aliases = neg.pop("aliases", None) or {}
    neg.pop("refresh", None)  # what happens to the lists during training, not what the store holds
    if neg["systems"] != "all":
        neg["systems"] = [aliases.get(s, s) for s in neg["systems"]]
    return neg


def store_path(cache_dir: str, source, negatives: DictConfig) -> Path:
    """One store per (source settings and files, negative selection): changing either never reuses a stale store."""
    # size and mtime of each input too: a file replaced in place (same path) gets a new store
    stamps = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in source.store_files()]
    key = [source.store_key(), negatives_inputs(negatives), stamps]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "stores" / f"{source.name}-{digest}"


class ResumableDataLoader(DataLoader):
    """Tells Lightning this loader resumes mid-epoch; the position itself comes from Lightning's progress counters
    (MarcoDataModule._resume_position), so there is no state of its own to save."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class MarcoDataModule(pl.LightningDataModule):
    """Training batches from the store prepared from `source` (data.sources), validation batches re-ranking its
    validation run. Built by Hydra from the `datamodule` config node; the task passes what it built (the source,
    the model's collator, whether the loss needs teacher scores)."""

    def __init__(self, source, negatives: DictConfig, collator, cache_dir: str | Path, batch_size: int,
                 num_negatives: int, with_teacher: bool, seed: int, num_workers: int = 2,
                 val_batch_size: int | None = None, pin_memory: bool = False, group_by_length: bool = False,
                 refresh: dict | None = None, refresh_dir: str | Path | None = None, train_rows: str = "query",
                 worker_start: str | None = "forkserver"):
        super().__init__()
        self.source, self.negatives, self.collator, self.cache_dir = source, negatives, collator, cache_dir
        self.batch_size, self.num_negatives, self.with_teacher = batch_size, num_negatives, with_teacher
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.worker_start = worker_start if num_workers > 0 else None  # multiprocessing start method of the workers
        self.group_by_length, self.train_rows = group_by_length, train_rows  # sampling.TrainDataset's rows
        self.val_batch_size = val_batch_size or 4 * batch_size
        self.store = None
        # negatives.refresh: the model re-mines its own negatives every few epochs (refresh.py); which refreshed
        # lists are in use is this module's state, so it travels in every checkpoint
        self.refresh = RefreshSettings(**refresh) if refresh and refresh.get("every_n_epochs") else None
        self.refresh_dir = Path(refresh_dir) if refresh_dir else None
        self.refreshed: dict = {"epoch": None, "dir": None, "history": []}
        self.refresh_seconds: list[float] = []  # the refreshes this process ran (a resume restores the history)

    @property
    def store_dir(self) -> Path:
        return store_path(self.cache_dir, self.source, self.negatives)

    def prepare_data(self):  # Lightning runs this on one process per node, before setup
        if not (self.store_dir / "manifest.json").exists():
            self.source.fetch_store_files()  # downloads (MS MARCO) change the store's name: ask store_dir again
            print(f"Preparing the data store (once): {self.store_dir}")
            prepare(self.source, negatives_inputs(self.negatives), self.store_dir)

    def setup(self, stage=None):
        if self.store is not None:
            return
        self.store = Store(self.store_dir)
        self.train_set = TrainDataset(self.store, self.num_negatives, self.seed, self.with_teacher, self.train_rows)
        _, run, _ = self.source.validation_set()
        self.val_set = RerankPairs(self.store, run, self.source.val_top_k)

    def _rank(self):
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, dataset, sampler, batch_size, collate, loader_cls=DataLoader):
        # Its own generator: a DataLoader iterator otherwise draws from the global RNG, and a resumed run (which
        # creates one more iterator after restoring the RNG) would get other dropout masks than an unbroken one.
        return loader_cls(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.seed),
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          worker_init_fn=partial(worker_init, training_pid=os.getpid()),
                          multiprocessing_context=self.worker_start,
                          # workers live for the whole fit (no fork and warm-up each epoch), unless refreshing:
                          # a refresh swaps the training lists, which workers forked earlier would never see
                          persistent_workers=self.num_workers > 0 and self.refresh is None)

    def state_dict(self) -> dict:
        return {"refreshed": self.refreshed} if self.refresh else {}

    def load_state_dict(self, state: dict) -> None:
        fitting = self.trainer is None or self.trainer.state.fn == "fit"  # validate(ckpt_path=...) keeps the lists
        if self.refresh and state.get("refreshed") and fitting:
            self.refreshed = state["refreshed"]
            if self.refreshed["dir"] and self.store is not None:
                lists = refresh_lists(Path(self.refreshed["dir"]))
                if lists is None:
                    raise MissingFileError(f"the checkpoint trains on the refreshed negatives in {self.refreshed['dir']}, "
                                           "which is gone or incomplete: resume from the run folder that made them")
                self.train_set.lists = lists

    def negatives_for_epoch(self, epoch: int, model) -> dict | None:
        """Point the training set at the lists `epoch` samples from (negatives.refresh), refreshing them with
        `model` when this epoch starts a new period; returns the new refresh's stats, else None."""
        due = self.refresh.due(epoch) if self.refresh else None
        if due is None or due == self.refreshed["epoch"]:
            return None
        if self.refresh_dir is None:
            raise ConfigError("negatives.refresh needs the datamodule's refresh_dir (the run folder's refresh/)")
        strategy = self.trainer.strategy if self.trainer is not None and self.trainer.world_size > 1 else None
        val_qrels = self.source.validation_set()[0]
        stats = refresh_negatives(model, self.store, self.refresh_dir, self.refresh, due, val_qrels,
                                  self.source.val_rel_level, strategy, current=self.train_set.lists)
        folder = self.refresh_dir / f"epoch-{due}"
        self.train_set.lists = refresh_lists(folder)
        self.refreshed = {"epoch": due, "dir": str(folder), "history": [*self.refreshed["history"], stats]}
        self.refresh_seconds.append(stats["seconds"])
        return stats

    def train_dataloader(self):
        if self.refresh and self.trainer is not None:  # also a resumed run: the lists of the epoch it resumes in
            self.negatives_for_epoch(self.trainer.fit_loop.epoch_progress.current.processed,
                                     self.trainer.lightning_module.model)
        rank, world = self._rank()
        sampler = EpochShardSampler(len(self.train_set), shuffle=True, seed=self.seed, rank=rank, world_size=world,
                                    position=self._position, batch_size=self.batch_size,
                                    lengths=self.train_set.doc_bytes if self.group_by_length else None)
        return self._loader(self.train_set, sampler, self.batch_size, self.collator.train, ResumableDataLoader)

    def _position(self) -> tuple[int, int] | None:
        """(epoch, examples this rank already trained on in it) from Lightning's progress when the sampler is
        iterated; None outside a fit.

        Draws are a pure function of (seed, epoch, index), so skipping those examples continues the very same
        order: a run killed mid-epoch and resumed ends with the same steps and data as one that never stopped.
        """
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None:
            return None
        epoch = loop.epoch_progress.current
        # a checkpoint from an epoch's last batch restores that epoch as processed: the next one starts whole
        unfinished = loop.restarting and epoch.processed < epoch.started
        return epoch.processed, loop.epoch_loop.batch_progress.current.processed * self.batch_size if unfinished else 0

    def val_dataloader(self):
        rank, world = self._rank()
        sampler = StridedShardSampler(len(self.val_set), rank, world)
        # the tokenisation of the model being validated (the starting model's may cut at another max_seq_length)
        module = self.trainer.lightning_module if self.trainer is not None else None
        collator = module.model.collator() if module is not None else self.collator
        return self._loader(self.val_set, sampler, self.val_batch_size, partial(collator.pairs, unique=True))


class RefreshNegatives(pl.Callback):
    """negatives.refresh.every_n_epochs: at the start of each period's first epoch (before its DataLoader workers
    start), the model re-mines its training queries' negatives; the refresh is logged (refresh/*)."""

    def on_train_start(self, trainer, pl_module):
        # a run resumed from an epoch's last batch goes on to the next epoch without its on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        stats = trainer.datamodule.negatives_for_epoch(trainer.current_epoch, pl_module.model)
        if stats and trainer.is_global_zero:
            numbers = {f"refresh/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(numbers, step=trainer.global_step)
            print(f"Refreshed the hard negatives before epoch {stats['epoch']}: {stats['seconds']} s, "
                  f"{stats['changed_share']:.0%} of them new, val nDCG@10 of the model's own ranking "
                  f"{stats.get('val_ndcg@10')}")
