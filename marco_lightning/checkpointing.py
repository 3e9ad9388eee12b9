"""Checkpoints that survive a kill: written to a temporary file, then renamed over the old one."""
from __future__ import annotations

import os
from pathlib import Path

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

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
