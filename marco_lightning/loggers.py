"""Loggers: W&B (offline when there is no login, never a prompt) plus a local metrics.csv in every run folder."""
from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def run_choices(cfg: DictConfig) -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except ValueError:  # composed outside @hydra.main (tests)
        return {}
    return {g: str(choices[g]) for g in ("model", "loss", "negatives", "data", "experiment") if choices.get(g)}


def run_name(cfg: DictConfig) -> str:
    return "-".join(run_choices(cfg).values()) or "run"


def wandb_has_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_offline(setting) -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    return (not wandb_has_login()) if setting == "auto" else bool(setting)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    # run_dir/metrics.csv. Lightning warns that the (non-empty, Hydra-made) run folder "will be deleted": it only
    # ever rewrites metrics.csv itself, and every run gets a fresh folder.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wb = cfg.logger.get("wandb")
    if wb:
        offline = wandb_offline(wb.offline)
        os.environ.setdefault("WANDB_SILENT", "true")
        tags = [f"{k}={v}" for k, v in run_choices(cfg).items()] + list(cfg.get("tags") or [])
        logger = WandbLogger(project=wb.project, entity=wb.entity, group=wb.group, name=run_name(cfg), tags=tags,
                             save_dir=str(run_dir), offline=offline)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def print_run_summary(cfg: DictConfig, run_dir: Path) -> None:
    print(f"Run folder: {run_dir}  (config.yaml, metrics.json, metrics.csv, checkpoints/, final_model/)")
    wb = cfg.logger.get("wandb")
    if wb and wandb_offline(wb.offline):
        print(f"W&B ran offline. To upload later: wandb sync {run_dir}/wandb/offline-run-*")
