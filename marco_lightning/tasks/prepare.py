"""task=prepare: convert the configured data files once into the memory-mapped store training reads."""
from __future__ import annotations

import json

from omegaconf import DictConfig

from marco_lightning.data.datamodule import negatives_inputs, store_path
from marco_lightning.data.sources import build_source
from marco_lightning.data.store import prepare


def main(cfg: DictConfig):
    source = build_source(cfg.data)
    source.fetch_store_files()  # the official files, when data.downloads lists them and they are missing
    out = prepare(source, negatives_inputs(cfg.negatives), store_path(cfg.paths.cache_dir, source, cfg.negatives),
                  force=cfg.task.force)
    print(f"Store: {out}")
    print(json.dumps(json.loads((out / "manifest.json").read_text()), indent=2))
    return out
