"""Config resolvers and the checks that must fail before any data loads."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from marco_lightning.data.download import beir_repo, fetch_beir
from marco_lightning.errors import ConfigError, MissingFileError  # ConfigError: re-exported here

ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("marco_root", lambda: str(ROOT), replace=True)


def beir_root(name, cache_dir) -> str:
    """data=beir's `data.root` when only `data.name` is given (`${beir_root:${.name},${paths.cache_dir}}`): the
    public BEIR dataset of that name fetched once into cache_dir/beir/<hub id> (data/download.fetch_beir). A
    `data.root=DIR` on the command line replaces the interpolation: nothing is fetched."""
    if name is None or not str(name).strip():
        raise ConfigError("data=beir needs data.root=DIR (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/) or "
                          "data.name=NAME (a public BEIR dataset, e.g. scifact or a hub id such as BeIR/scifact, "
                          "fetched into paths.cache_dir/beir)")
    return str(fetch_beir(name, Path(cache_dir) / "beir" / beir_repo(name)))


OmegaConf.register_new_resolver("beir_root", beir_root, replace=True)


def system_name(model) -> str:
    """The name task=mine gives a bi-encoder's runs and negatives (`${system_name:${model.backbone}}`): its folder or
    hub name, as a file name can carry it."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model).rstrip("/")).name) or "model"


OmegaConf.register_new_resolver("system_name", system_name, replace=True)


def _check_arguments(cfg: DictConfig, group: str) -> None:
    """A key the class does not take would be dropped or fail later: refuse it now, naming it."""
    params = inspect.signature(get_class(cfg[group]._target_)).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unread = [k for k in cfg[group] if not k.startswith("_") and k not in params]
    if unread:
        hint = (f"; the similarity is the model's: set model.similarity={cfg[group].similarity} instead"
                if group == "loss" and "similarity" in unread else "")
        raise ConfigError(f"{group}={_choice(cfg, group)} ({cfg[group]._target_}) has no option "
                          f"{', '.join(f'{group}.{k}' for k in unread)}; it takes: {', '.join(params)}{hint}")


def check_training_config(cfg: DictConfig) -> None:
    """Incompatible choices fail here, naming both config choices, before anything heavy happens."""
    # here, not at the top: losses imports torch, and every run.py start (resolvers, --help) imports this module
    from marco_lightning.losses import Loss

    model_cls, loss_cls = get_class(cfg.model._target_), get_class(cfg.loss._target_)
    model_choice, loss_choice = _choice(cfg, "model"), _choice(cfg, "loss")
    if not issubclass(loss_cls, Loss):  # its class attributes are the contract every check below reads
        raise ConfigError(f"loss={loss_choice}: {cfg.loss._target_} is not a marco_lightning.losses.Loss, which "
                          "declares what a loss takes (inputs, needs_teacher, min_candidates, model_kind): derive "
                          "it from losses.Loss or losses.ScoreLoss")
    if loss_cls.model_kind not in (None, model_cls.kind):
        raise ConfigError(f"loss={loss_choice} ({loss_cls.__name__}) trains a {loss_cls.model_kind}-encoder but "
                          f"model={model_choice} is a {model_cls.kind}-encoder: pick a "
                          f"{model_cls.kind}-encoder loss or a {loss_cls.model_kind}-encoder model")
    if model_cls.kind == "cross" and cfg.model.get("similarity"):  # set by a bi-encoder recipe's loss config
        raise ConfigError(f"model={model_choice} is a cross-encoder, scoring with its own head, so it has no "
                          f"similarity to train, but model.similarity={cfg.model.similarity} is set (loss="
                          f"{loss_choice} is a bi-encoder recipe that sets it): pick a cross-encoder loss "
                          "(loss=ce_margin_mse, ce_kl, ce_mse, ce_bce) or a bi-encoder model")
    if not cfg.negatives.require_positive and not loss_cls.needs_teacher:
        raise ConfigError(f"negatives.require_positive=false trains queries without a positive, which only a "
                          f"distillation loss can (the teacher ranks their candidates); loss={loss_choice} needs a "
                          "positive per query: set negatives.require_positive=true or a distillation loss")
    refresh = (cfg.negatives.get("refresh") or {}).get("every_n_epochs")
    if refresh is not None:
        if not isinstance(refresh, int) or refresh < 1:
            raise ConfigError(f"negatives.refresh.every_n_epochs={refresh}: use a positive number of epochs, or null "
                              "(off)")
        if model_cls.kind != "bi":
            raise ConfigError(f"negatives.refresh.every_n_epochs re-mines negatives with the model's own dense "
                              f"ranking, but model={model_choice} is a cross-encoder: set it to null")
        if loss_cls.needs_teacher:
            raise ConfigError(f"negatives.refresh.every_n_epochs gives negatives no teacher has scored, but "
                              f"loss={loss_choice} distils teacher scores: set it to null or use loss=mnrl")
        if cfg.task.get("refit"):
            raise ConfigError("task.refit retrains on train + val without the refreshes the run made (the refit's "
                              "negatives would be the mined ones): set negatives.refresh.every_n_epochs=null or "
                              "task.refit=false")
    _check_arguments(cfg, "model")
    _check_arguments(cfg, "loss")
    if cfg.get("mini_batch_size"):
        if int(cfg.mini_batch_size) < 1:
            raise ConfigError(f"mini_batch_size={cfg.mini_batch_size} (GradCache) must be >= 1, or null for none")
        if model_cls.kind != "bi":
            raise ConfigError(f"mini_batch_size (GradCache) caches embeddings of a bi-encoder; model={model_choice} "
                              "is a cross-encoder: set mini_batch_size=null")
        if cfg.trainer.accumulate_grad_batches != 1:
            raise ConfigError("mini_batch_size (GradCache) already gives a large batch in small memory; set "
                              "trainer.accumulate_grad_batches=1 or mini_batch_size=null")
    if cfg.data.get("val_fold") and loss_cls.needs_teacher:
        raise ConfigError(f"data.val_fold={cfg.data.val_fold} (task.folds) trains on fold 0's val queries, which have "
                          f"no teacher scores (task=score scores the training queries' pairs), and loss={loss_choice} "
                          "distils them: use a supervised loss (loss=mnrl) or task.folds=null")
    task = cfg.get("task") or {}
    if task.get("folds") and not task.get("candidates"):
        raise ConfigError(f"task.folds={task.folds} cross-validates the choice among task.candidates: set "
                          "task.candidates too, or task.folds=null")
    if task.get("refit"):  # the data's side (a BEIR folder, its val negatives): BeirSource.for_refit
        if loss_cls.needs_teacher:
            raise ConfigError(f"task.refit=true trains on the val queries too, which have no teacher scores (task=score "
                              f"scores the training queries' pairs), and loss={loss_choice} distils them: use a "
                              "supervised loss (loss=mnrl) or task.refit=false")
        interval = cfg.trainer.get("val_check_interval", 1.0)  # a float is a share of the epoch, an int batches
        if cfg.trainer.get("max_steps", -1) not in (-1, None) or not cfg.trainer.get("max_epochs") or \
                not (isinstance(interval, float) and interval == 1.0):
            raise ConfigError("task.refit=true repeats the whole epochs val chose: keep trainer.max_steps=-1, "
                              "trainer.max_epochs set and trainer.val_check_interval=1.0 (validation at epoch ends)")
    if cfg.get("train_rows", "query") not in ("query", "positive"):
        raise ConfigError(f"train_rows={cfg.train_rows}: use query (one example per training query) or positive (one "
                          "per (training query, positive) pair, as sentence-transformers' datasets)")
    for key in ("batch_size", "num_negatives"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if 1 + int(cfg.num_negatives) < loss_cls.min_candidates:
        raise ConfigError(f"loss={loss_choice} needs {loss_cls.min_candidates} candidates per query (the positive "
                          f"and hard negatives): set num_negatives >= {loss_cls.min_candidates - 1}")
    check_ckpt_path(cfg.get("ckpt_path"))


def check_ckpt_path(ckpt_path) -> None:
    """ckpt_path (resume): a .ckpt file, or a run folder holding checkpoints/last.ckpt (checkpointing.resolve_ckpt_path
    reads it); Lightning's own names (last, hpc) pass. Checked before any data or model loads."""
    if ckpt_path is None or str(ckpt_path) in ("last", "hpc"):
        return
    path = Path(str(ckpt_path))
    if not path.exists() or (path.is_dir() and not (path / "checkpoints" / "last.ckpt").is_file()):
        what = "no checkpoints/last.ckpt in that run folder" if path.is_dir() else "no such checkpoint file or folder"
        raise MissingFileError(f"ckpt_path={ckpt_path}: {what}; give a .ckpt file or a run folder (outputs/DATE/TIME) "
                               "holding checkpoints/last.ckpt, or ckpt_path=null to train from the start")


def check_files(cfg: DictConfig, keys) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        for path in value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]:
            if path is not None:
                require_file(key, path)


def require_file(key: str, path) -> None:
    """A file the config key names must exist: say which key and how to fix it."""
    if not Path(path).exists():
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
