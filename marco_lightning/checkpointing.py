"""Checkpoints that survive a kill: written to a temporary file, then renamed over the old one; a resumed run keeps
the killed run's best."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from marco_lightning.errors import MissingFileError


class AtomicCheckpointIO(TorchCheckpointIO):
    """os.replace is atomic on POSIX: a reader (or a resume) sees the old complete file or the new complete one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """`ckpt_path=RUN_FOLDER` resumes from that run's last checkpoint; a file path is used as given."""
    if ckpt_path is None or not Path(ckpt_path).is_dir():
        return ckpt_path
    last = Path(ckpt_path) / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise MissingFileError(f"ckpt_path={ckpt_path}: no checkpoints/last.ckpt in that run folder; give a .ckpt file "
                               "or ckpt_path=null to train from the start")
    return str(last)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps a resumed run's best. `ckpt_path=RUN` resumes into a new run folder, and Lightning's
    own ModelCheckpoint trusts a best score only from its own folder: it forgot it, the first validation after the
    resume became the best, and final_model/ could be an epoch worse than one the killed run had validated. Here
    the killed run's best checkpoint is copied into this run's folder (the killed run's folder is left as it was)
    and its score kept."""

    def load_state_dict(self, state_dict):
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.realpath(old) != os.path.realpath(self.dirpath):
            state_dict = self._adopt(state_dict)
        super().load_state_dict(state_dict)

    def _adopt(self, state: dict) -> dict:
        paths = {p for p in (state.get("best_model_path"), state.get("kth_best_model_path"),
                             *state.get("best_k_models", {})) if p}
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:  # Lightning's own behaviour: the best score is forgotten
            warnings.warn(f"resumed run: the killed run's best checkpoint {missing[0]} is gone, so its best score "
                          "is forgotten and final_model/ will be the best epoch validated from here on")
            return state
        new = Path(self.dirpath)
        new.mkdir(parents=True, exist_ok=True)
        copies = {}
        for path in paths:  # every DDP rank copies: each to its own temporary file, renamed over the same name
            copies[path] = str(new / Path(path).name)
            tmp = new / f".{Path(path).name}.tmp-{os.getpid()}"
            try:
                shutil.copy2(path, tmp)
                os.replace(tmp, copies[path])
            finally:
                tmp.unlink(missing_ok=True)
        return {**state, "dirpath": self.dirpath, "last_model_path": "",
                "best_model_path": copies.get(state.get("best_model_path"), state.get("best_model_path", "")),
                "kth_best_model_path": copies.get(state.get("kth_best_model_path"), state.get("kth_best_model_path", "")),
                "best_k_models": {copies[p]: v for p, v in state.get("best_k_models", {}).items()}}
