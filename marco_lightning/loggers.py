"""Callbacks and loggers, each built from its config node's `_target_` (`callbacks.*`, `logger.*`), as models, losses
and optimizers are. W&B runs offline when there is no login (never a prompt); a local metrics.csv is always written."""
from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from marco_lightning.errors import ConfigError


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


def config_nodes(cfg: DictConfig, group: str) -> dict[str, DictConfig]:
    """The switched-on nodes of `callbacks` or `logger`: each one a `_target_` with its arguments; a null one is off."""
    nodes = {name: node for name, node in (cfg.get(group) or {}).items() if node is not None}
    for name, node in nodes.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            example = {"callbacks": "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar",
                       "logger": "logger.wandb._target_=pytorch_lightning.loggers.WandbLogger"}.get(group, "")
            raise ConfigError(f"{group}.{name}={node}: each {group} entry is a node with a _target_ (e.g. "
                              f"{example}), or null")
    return nodes


def build_callbacks(cfg: DictConfig) -> list:
    from hydra.utils import instantiate

    nodes = config_nodes(cfg, "callbacks")
    # without an interval the mid-epoch writer would only repeat the monitored checkpoint's last.ckpt
    if "resume_checkpoint" in nodes and nodes["resume_checkpoint"].get("every_n_train_steps") is None:
        del nodes["resume_checkpoint"]
    return [instantiate(node) for node in nodes.values()]


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import CSVLogger

    # run_dir/metrics.csv. Lightning warns that the (non-empty, Hydra-made) run folder "will be deleted": it only
    # ever rewrites metrics.csv itself, and every run gets a fresh folder.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    for name, node in config_nodes(cfg, "logger").items():
        if name != "wandb":
            loggers.append(instantiate(node))
            continue
        # `offline: auto` is ours, not WandbLogger's: resolved here, as are the name and tags from the config choices
        os.environ.setdefault("WANDB_SILENT", "true")
        tags = [f"{k}={v}" for k, v in run_choices(cfg).items()] + list(cfg.get("tags") or [])
        logger = instantiate(node, offline=wandb_offline(node.get("offline", "auto")),
                             name=node.get("name") or run_name(cfg), tags=tags, _convert_="all")
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def print_run_summary(cfg: DictConfig, run_dir: Path) -> None:
    print(f"Run folder: {run_dir}  (config.yaml, metrics.json, metrics.csv, checkpoints/, final_model/)")
    wb = cfg.logger.get("wandb")
    if wb and wandb_offline(wb.get("offline", "auto")):
        print(f"W&B ran offline. To upload later: wandb sync {run_dir}/wandb/offline-run-*")
