"""task=prepare: convert the configured data files once into the memory-mapped store training reads."""
from __future__ import annotations

import json

from omegaconf import DictConfig

from marco_lightning.config import check_files


def main(cfg: DictConfig):
    from marco_lightning.data.datamodule import STORE_KEYS, store_inputs, store_path
    from marco_lightning.data.download import ensure_files
    from marco_lightning.data.store import prepare

    ensure_files(cfg.data, STORE_KEYS)  # the official files, when data.downloads lists them and they are missing
    check_files(cfg, [f"data.{k}" for k in STORE_KEYS])
    out = prepare(*store_inputs(cfg.data, cfg.negatives), store_path(cfg.paths.cache_dir, cfg.data, cfg.negatives),
                  force=cfg.task.force)
    print(f"Store: {out}")
    print(json.dumps(json.loads((out / "manifest.json").read_text()), indent=2))
    return out
