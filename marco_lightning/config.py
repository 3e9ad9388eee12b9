"""Config resolvers and the checks that must fail before any data loads."""
from __future__ import annotations

import inspect
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("marco_root", lambda: str(ROOT), replace=True)


class ConfigError(ValueError):
    pass


def loss_similarity(loss_cfg: DictConfig) -> str | None:
    cls = get_class(loss_cfg._target_)
    if "similarity" in loss_cfg:
        return loss_cfg.similarity
    param = inspect.signature(cls).parameters.get("similarity")
    return param.default if param is not None else getattr(cls, "similarity", None)


def check_training_config(cfg: DictConfig) -> None:
    """Incompatible choices fail here, naming both config choices, before anything heavy happens."""
    model_cls, loss_cls = get_class(cfg.model._target_), get_class(cfg.loss._target_)
    model_choice, loss_choice = _choice(cfg, "model"), _choice(cfg, "loss")
    if loss_cls.model_kind != model_cls.kind:
        raise ConfigError(f"loss={loss_choice} ({loss_cls.__name__}) trains a {loss_cls.model_kind}-encoder but "
                          f"model={model_choice} is a {model_cls.kind}-encoder: pick a "
                          f"{model_cls.kind}-encoder loss or a {loss_cls.model_kind}-encoder model")
    if loss_cls.needs_teacher and not cfg.data.get("teacher_scores"):
        raise ConfigError(f"loss={loss_choice} distils teacher scores, but data={_choice(cfg, 'data')} sets no "
                          "data.teacher_scores: point data.teacher_scores at a score file or choose a supervised loss")
    sim = loss_similarity(cfg.loss) if model_cls.kind == "bi" else None
    if sim is not None and sim != cfg.model.similarity:
        raise ConfigError(f"loss={loss_choice} trains with {sim} similarity but model.similarity="
                          f"{cfg.model.similarity} (used to score and export): set model.similarity={sim}")
    if cfg.get("mini_batch_size"):
        if model_cls.kind != "bi":
            raise ConfigError(f"mini_batch_size (GradCache) caches embeddings of a bi-encoder; model={model_choice} "
                              "is a cross-encoder: set mini_batch_size=null")
        if cfg.trainer.accumulate_grad_batches != 1:
            raise ConfigError("mini_batch_size (GradCache) already gives a large batch in small memory; set "
                              "trainer.accumulate_grad_batches=1 or mini_batch_size=null")
    for key in ("batch_size", "num_negatives"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")


def check_files(cfg: DictConfig, keys) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        for path in value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]:
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{key}: file not found: {path}\n  Fix the path (override {key}=...) or set "
                                  f"data.root=DIR to the folder holding the files.")


def _choice(cfg: DictConfig, group: str) -> str:
    """The option picked for a config group (`minilm`), or its _target_ when composed without Hydra's runtime."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices[group]
    except Exception:
        node = cfg.get(group)
        return node.get("_target_", group) if isinstance(node, DictConfig) else group
