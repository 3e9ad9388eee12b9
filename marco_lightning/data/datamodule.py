"""The LightningDataModule: prepares the memory-mapped store once, then serves training and re-ranking batches."""
from __future__ import annotations

import hashlib
import json
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

# The data keys that decide a store's content (validation files are read directly, not stored).
STORE_KEYS = ("collection", "queries", "train_queries", "train_qrels", "hard_negatives", "teacher_scores")
BEIR_STORE_KEYS = ("kind", "root", "train_split", "val_split", "test_split", "val_fraction", "hard_negatives",
                   "teacher_scores")


# Short names for the mining systems of msmarco-hard-negatives.jsonl.gz (and of the committed sample).
SYSTEM_ALIASES = {
    "tas_b": "msmarco-distilbert-base-tas-b", "distilbert_v3": "msmarco-distilbert-base-v3",
    "minilm_v3": "msmarco-MiniLM-L-6-v3", "margin_mse_cls_dot_v1": "distilbert-margin_mse-cls-dot-v1",
    "margin_mse_cls_dot_v2": "distilbert-margin_mse-cls-dot-v2",
    "margin_mse_mean_dot_v1": "distilbert-margin_mse-mean-dot-v1", "mpnet_margin_mse": "mpnet-margin_mse-mean-v1",
    "co_condenser": "co-condenser-margin_mse-cls-v1", "mnrl_mean_v1": "distilbert-margin_mse-mnrl-mean-v1",
    "sym_mnrl_mean_v1": "distilbert-margin_mse-sym_mnrl-mean-v1",
    "sym_mnrl_mean_v2": "distilbert-margin_mse-sym_mnrl-mean-v2",
    "co_condenser_sym_mnrl": "co-condenser-margin_mse-sym_mnrl-mean-v1",
    "bm25_rm3": "bm25-rm3", "ada2": "openai-ada2", "splade_pp": "splade-pp-ed",  # systems of data=sample
}


def store_inputs(data: DictConfig, negatives: DictConfig) -> tuple[dict, dict]:
    plain = OmegaConf.to_container(data, resolve=True)
    data_in = {k: plain.get(k) for k in (BEIR_STORE_KEYS if plain.get("kind") == "beir" else STORE_KEYS)}
    neg = OmegaConf.to_container(negatives, resolve=True)
    if neg["systems"] != "all":
        neg["systems"] = [SYSTEM_ALIASES.get(s, s) for s in neg["systems"]]
    return data_in, neg


def store_path(cache_dir: str, data: DictConfig, negatives: DictConfig) -> Path:
    """One store per (input files, negative selection): changing either never reuses a stale store."""
    data_in, neg_in = store_inputs(data, negatives)
    # size and mtime of each input too: a file replaced in place (same path) gets a new store
    paths = [p for k, v in data_in.items() if k != "root" for p in (v if isinstance(v, list) else [v])
             if isinstance(p, str) and p and Path(p).exists()]
    if data_in.get("kind") == "beir":
        from marco_lightning.data.beir import BeirFolder

        paths += [str(p) for p in BeirFolder.from_config(data_in).files()]
    stamps = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]
    digest = hashlib.sha1(json.dumps([data_in, neg_in, stamps], sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "stores" / f"{data.name}-{digest}"


def validation_set(data: DictConfig):
    """(qrels, run, ids) of the validation queries, keyed as the store keys them: MS MARCO ids, or for a BEIR
    folder its rows (`ids`, an IdRows, maps them back to the folder's ids; None for MS MARCO)."""
    from marco_lightning.data.trec import read_qrels, read_run

    ids = None
    if data.get("kind") == "beir":
        from marco_lightning.data.beir import BeirFolder, IdRows

        folder = BeirFolder.from_config(data)
        ids = IdRows(folder)
        qrels, run = ids.to_rows(folder.qrels("val")), ids.to_rows(read_run(data.val_run))
    else:
        qrels, run = read_qrels(data.val_qrels), read_run(data.val_run)
    # a run may hold unjudged queries (DL19 top-1000: 200, 43 judged)
    return qrels, {qid: docs for qid, docs in run.items() if qid in qrels}, ids


class ResumableDataLoader(DataLoader):
    """Tells Lightning this loader resumes mid-epoch; the position itself comes from Lightning's progress counters
    (MarcoDataModule._resume_position), so there is no state of its own to save."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class MarcoDataModule(pl.LightningDataModule):
    def __init__(self, data: DictConfig, negatives: DictConfig, collator, store_dir: Path, batch_size: int,
                 num_negatives: int, with_teacher: bool, seed: int, num_workers: int = 2,
                 val_batch_size: int | None = None, pin_memory: bool = False, group_by_length: bool = False):
        super().__init__()
        self.data, self.negatives, self.collator, self.store_dir = data, negatives, collator, Path(store_dir)
        self.batch_size, self.num_negatives, self.with_teacher = batch_size, num_negatives, with_teacher
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.group_by_length = group_by_length
        self.val_batch_size = val_batch_size or 4 * batch_size
        self.store = None

    def prepare_data(self):  # Lightning runs this on one process per node, before setup
        from marco_lightning.data.store import prepare

        if not (self.store_dir / "manifest.json").exists():
            print(f"Preparing the data store (once): {self.store_dir}")
            prepare(*store_inputs(self.data, self.negatives), self.store_dir)

    def setup(self, stage=None):
        if self.store is not None:
            return
        from marco_lightning.data.store import Store

        self.store = Store(self.store_dir)
        self.train_set = TrainDataset(self.store, self.num_negatives, self.seed, self.with_teacher)
        _, run, _ = validation_set(self.data)
        self.val_set = RerankPairs(self.store, run, self.data.val_top_k)

    def _rank(self):
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, dataset, sampler, batch_size, collate, loader_cls=DataLoader):
        # Its own generator: a DataLoader iterator otherwise draws from the global RNG, and a resumed run (which
        # creates one more iterator after restoring the RNG) would get other dropout masks than an unbroken one.
        return loader_cls(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.seed),
                          num_workers=self.num_workers, pin_memory=self.pin_memory, worker_init_fn=worker_init,
                          persistent_workers=False)

    def train_dataloader(self):
        rank, world = self._rank()
        sampler = EpochShardSampler(len(self.train_set), shuffle=True, seed=self.seed, rank=rank, world_size=world,
                                    resume_at=self._resume_position, batch_size=self.batch_size,
                                    lengths=self.train_set.doc_bytes if self.group_by_length else None)
        return self._loader(self.train_set, sampler, self.batch_size, self.collator.train, ResumableDataLoader)

    def _resume_position(self) -> tuple[int, int]:
        """On a resumed fit: (epoch, examples already trained on in it), from Lightning's restored progress.

        Draws are a pure function of (seed, epoch, index), so skipping those examples continues the very same
        order: a run killed mid-epoch and resumed ends with the same steps and data as one that never stopped.
        """
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None or not loop.restarting:
            return 0, 0
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed * self.batch_size

    def val_dataloader(self):
        rank, world = self._rank()
        sampler = StridedShardSampler(len(self.val_set), rank, world)
        # the tokenisation of the model being validated (the starting model's may cut at another max_seq_length)
        module = self.trainer.lightning_module if self.trainer is not None else None
        collate = module.model.collator().pairs if module is not None else self.collator.pairs
        return self._loader(self.val_set, sampler, self.val_batch_size, collate)
