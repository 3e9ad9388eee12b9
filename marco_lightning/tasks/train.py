"""task=train: validate, fit, validate the best checkpoint, export `final_model/`, write `metrics.json`.

With task.refit (a BEIR folder): after that run, a fresh model trains on the training plus the val queries for the
epochs val chose, without validation, and is exported instead; metrics.json keeps the run's numbers under
"selection" and says the exported model has no held-out val number.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from marco_lightning.config import ConfigError, check_training_config
from marco_lightning.data.sources import build_source
from marco_lightning.data.trec import read_run, write_run
from marco_lightning.evaluation import compute_metrics, format_table
from marco_lightning.loggers import build_callbacks, build_loggers, print_run_summary
from marco_lightning.losses import default_scale
from marco_lightning.model_card import card_data, training_section
from marco_lightning.tasks.choose import choose


def main(cfg: DictConfig) -> dict:
    if cfg.task.get("candidates"):  # several variants, one after the other: final_model/ the best by val
        return choose(cfg, train=main, push=push_to_hub)
    check_training_config(cfg)  # before anything heavy: a wrong combination fails in a second
    # Lightning and the modules built on it only now: an 8 s import the config check above does not wait for
    import pytorch_lightning as pl

    from marco_lightning.checkpointing import AtomicCheckpointIO  # (Lightning)
    from marco_lightning.data.datamodule import RefreshNegatives, store_path  # (Lightning)
    from marco_lightning.module import RetrieverModule  # (Lightning)

    callbacks = build_callbacks(cfg)  # one per callbacks.* node (conf/callbacks/default.yaml), before any data loads
    if (cfg.negatives.get("refresh") or {}).get("every_n_epochs"):  # the model re-mines its negatives (refresh.py)
        callbacks.append(RefreshNegatives())
    # final_model/ and metrics["after"] come from the checkpoint that follows ${monitor}
    checkpoint = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)
                       and c.monitor == cfg.monitor), None)
    if checkpoint is None:
        raise ConfigError(f"no callbacks.* ModelCheckpoint monitors {cfg.monitor}: final_model/ is its best "
                          "checkpoint (conf/callbacks/default.yaml, callbacks.checkpoint)")
    run_dir = Path(cfg.paths.output_dir)
    print(f"Run folder: {run_dir}")
    source = build_source(cfg.data)
    refit_source = source.for_refit() if cfg.task.get("refit") else None  # refused now (MS MARCO), not after fit
    source.check(needs_teacher=get_class(cfg.loss._target_).needs_teacher)
    if not (store_path(cfg.paths.cache_dir, source, cfg.negatives) / "manifest.json").exists():
        source.fetch_store_files()  # the raw files are needed only to build the store: missing ones fail now
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    model = instantiate(cfg.model)
    loss = build_loss(cfg.loss, model)
    start = starting_model(cfg, model) if cfg.task.validate_before else None
    # partial, then called: instantiate would turn the collator (a dataclass) into a config node
    datamodule = instantiate(cfg.datamodule, _partial_=True)(
        source=source, negatives=cfg.negatives, collator=model.collator(), with_teacher=loss.needs_teacher,
        pin_memory=cfg.trainer.accelerator in ("gpu", "cuda"))
    val_qrels, _, ids = source.validation_set()
    grad_cache = cfg.get("mini_batch_size")
    # both modules validate alike; the resolved config goes into every checkpoint (a .ckpt says how it was made)
    shared = {"val_qrels": val_qrels, "val_rel_level": source.val_rel_level, "val_ids": ids,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    module = RetrieverModule(model, loss, instantiate(cfg.optimizer), cfg.scheduler.warmup_steps, **shared,
                             mini_batch_size=grad_cache,
                             gradient_clip_val=cfg.trainer.gradient_clip_val if grad_cache else None)
    start_module = None if start is None else module if start is model else RetrieverModule(
        start, loss, instantiate(cfg.optimizer), 0, **shared)
    trainer: pl.Trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir),
                                      gradient_clip_val=None if grad_cache else cfg.trainer.gradient_clip_val,
                                      plugins=[AtomicCheckpointIO()], callbacks=callbacks)
    batch_info = {"global_batch_size": cfg.batch_size * trainer.world_size * trainer.accumulate_grad_batches,
                  "negatives_per_query": loss.negatives_per_query(cfg.batch_size, 1 + cfg.num_negatives,
                                                                  trainer.world_size)}
    for logger in trainer.loggers:
        logger.log_hyperparams(batch_info)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(f"Batch: {cfg.batch_size} queries per device x {trainer.world_size} device(s) x "
              f"{trainer.accumulate_grad_batches} accumulation = {batch_info['global_batch_size']} per step; "
              f"each query is scored against {batch_info['negatives_per_query']} negatives")

    try:
        metrics = fit_and_export(cfg, trainer, module, start_module, datamodule, checkpoint, run_dir,
                                 refit_source=refit_source)
    except BaseException:
        finish_wandb(trainer, exit_code=1)  # marked failed, its files flushed, whatever went wrong
        raise
    finish_wandb(trainer, exit_code=0)  # its offline file is complete when main() returns
    return metrics


def build_loss(loss_cfg: DictConfig, model):
    """The loss, for the model built: `loss.scale: null` is the loss's recipe scale for the model's similarity
    (cos 20, dot 1, a cross-encoder's logits 1: losses.default_scale). The one place where model and loss meet;
    the similarity itself is the model's alone."""
    scale = loss_cfg.get("scale")
    if scale is None:
        scale = default_scale(get_class(loss_cfg._target_), model.similarity)
    return instantiate(loss_cfg, scale=scale)


def fit_and_export(cfg, trainer, module, start_module, datamodule, checkpoint, run_dir, refit_source=None) -> dict:
    from marco_lightning.checkpointing import resolve_ckpt_path  # Lightning: see main

    # what is reported and written carries the data's own ids (a BEIR store keys queries and passages by row), and
    # is measured by the very function validation logs with
    named, judged, measure = module.val_named, module.val_judged, module.measure

    def evaluate(ckpt_path=None, target=module) -> dict:
        trainer.validate(target, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        return measure(target.last_val_run)

    metrics = {}
    if start_module is not None:
        metrics["before"] = evaluate(target=start_module)
    fit_start, passes_before = time.perf_counter(), len(module.val_seconds)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path")))
    # read now: validating the best checkpoint below restores the callbacks' state saved with it
    stop = trainer.early_stopping_callback
    ran = {"trained": trainer.current_epoch, "max": cfg.trainer.max_epochs, "stopped_early": bool(stop and stop.stopped_epoch)}
    seconds = time_split(time.perf_counter() - fit_start, module.val_seconds[passes_before:],
                         datamodule.refresh_seconds, len(module.trained_epochs))
    best_step, best_epoch = checkpoint_position(checkpoint.best_model_path)
    steps = best_step if best_step is not None else trainer.global_step  # what final_model/ trained (unless a refit)
    if best_step is not None and best_step == module.last_val_step == trainer.global_step:
        # the best checkpoint holds the weights validated last: reuse that ranking instead of recomputing it
        metrics["after"] = measure(module.last_val_run)
    else:
        metrics["after"] = evaluate("best" if checkpoint.best_model_path else None)
    key = cfg.monitor.removeprefix("val/")
    if "before" in metrics and key in metrics["after"]:
        # a tie is no evidence that training helped (CACM's 3 val queries did not move; the start was better on test)
        metrics["improved"] = metrics["after"][key] > metrics["before"][key]
        if not metrics["improved"] and trainer.is_global_zero:
            print(f"WARNING: training did not improve the model on {key}: {metrics['before'][key]:.4f} before, "
                  f"{metrics['after'][key]:.4f} after. Try a lower optimizer.lr, fewer steps, or a loss on the "
                  "model's own similarity (README \"Results\").")
    # task.keep_start: val says training did not improve the model, so final_model/ is the model it started from (the
    # trained one goes to trained_model/); a refit of what val rejected would be no better
    keep_start = bool(cfg.task.get("keep_start")) and metrics.get("improved") is False
    if keep_start:
        metrics["final_model"] = "start"
    exported, source = module, datamodule.source  # what final_model/ is, and the data it trained on
    if refit_source is not None and keep_start and trainer.is_global_zero:
        print("task.refit skipped: val chose the starting model")
    if refit_source is not None and not keep_start:  # every rank: the refit is one more fit
        best_checkpoint = os.path.relpath(checkpoint.best_model_path, run_dir) if checkpoint.best_model_path else None
        # the run's epochs up to its best checkpoint (validation at epoch ends: config.check_training_config)
        epochs = best_epoch if best_epoch is not None else trainer.current_epoch
        metrics = {"selection": {**{k: metrics[k] for k in ("before", "after", "improved") if k in metrics},
                                 "best_checkpoint": best_checkpoint, "epochs": epochs,
                                 "steps": steps}}
        exported, refit_trainer, metrics["refit"] = refit(cfg, refit_source, epochs, run_dir)
        source, steps = refit_source, refit_trainer.global_step
    elif best_epoch is not None:  # final_model/ holds the best checkpoint's weights: its epoch, not the run's last
        metrics["epochs"] = {"best": best_epoch, **ran}
    if trainer.is_global_zero:
        write_run(named(module.last_val_run), run_dir / "val_run.trec", tag=f"marco-lightning-{run_dir.name}")
        metrics.update(source.run_record())
        metrics.get("selection", metrics)["seconds"] = seconds  # task.refit: the selection run's (the refit: untimed)
        if datamodule.refresh:
            metrics["refresh"] = {"every_n_epochs": datamodule.refresh.every_n_epochs,
                                  "history": datamodule.refreshed["history"]}
        if "selection" not in metrics:
            metrics["best_checkpoint"] = os.path.relpath(checkpoint.best_model_path, run_dir) \
                if checkpoint.best_model_path else None
        if source.val_teacher_run:
            metrics["teacher"] = compute_metrics(judged, read_run(source.val_teacher_run),
                                                 rel_level=source.val_rel_level, measures=module.val_measures)
        if keep_start:
            export(cfg, source, module.model, module.loss, metrics, steps, run_dir / "trained_model")
            # built again, not the validated copy: a *-true precision converted that one in place
            export(cfg, source, built_again(cfg), module.loss, metrics, steps, run_dir / "final_model", trained=False)
        else:
            export(cfg, source, exported.model, exported.loss, metrics, steps, run_dir / "final_model")
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shown = metrics.get("selection", metrics)
        print(format_table({k: shown[k] for k in ("before", "after", "teacher") if k in shown}))
        if keep_start:
            print(f"final_model/ is the starting model (task.keep_start): val {key} {metrics['before'][key]:.4f} "
                  f"before training, {metrics['after'][key]:.4f} after; the trained model is in trained_model/")
        if "refit" in metrics:
            print(f"final_model/ is the refit: {metrics['refit']['epochs']} epoch(s) on the training + val queries "
                  "(the table is the selection run's; the refit has no held-out val number)")
        print_time_split(seconds)
        print_run_summary(cfg, run_dir)
        if cfg.task.get("push_to_hub"):  # last: a failed upload loses none of the run's files
            push_to_hub(cfg.task.push_to_hub, run_dir / "final_model")
    return metrics


def time_split(fit: float, validations: list[float], refreshes: list[float], epochs: int) -> dict:
    """Where the fit's wall time went, in this process (a resumed run: since its resume). Training is the rest:
    steps, data loading, checkpoints."""
    training = fit - sum(validations) - sum(refreshes)
    return {"fit": round(fit, 1), "training": round(training, 1), "epochs": epochs,
            "validation": [round(v, 1) for v in validations], "refresh": [round(r, 1) for r in refreshes],
            "validation_share": round(sum(validations) / training, 3) if validations and training > 0 else None}


def print_time_split(seconds: dict) -> None:
    share, passes = seconds["validation_share"], seconds["validation"]
    print(f"Time: training {seconds['training']:.0f} s ({seconds['epochs']} epoch(s)), validation "
          f"{sum(passes):.0f} s ({len(passes)} pass(es))" + (f", refresh {sum(seconds['refresh']):.0f} s"
                                                           if seconds["refresh"] else ""))
    if share is not None and share > 0.1:  # validation should not slow training down by more than a tenth
        print(f"Validation cost {share:.0%} of the training time: data.val_top_k (pairs per val query) or "
              "trainer.check_val_every_n_epoch lowers it")


def refit(cfg, source, epochs: int, run_dir: Path):
    """task.refit: a fresh model from the same start (seed, model config) trained on `source` (the training plus
    the val queries, a store of its own) for `epochs`, on the selection run's LR schedule (warmup and decay over
    trainer.max_epochs of this data) stopped there; no validation (its queries are training data now), no
    checkpoints. Returns (its module, its trainer, what metrics.json records of it)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from marco_lightning.checkpointing import AtomicCheckpointIO  # (Lightning)
    from marco_lightning.module import RetrieverModule  # (Lightning)

    out = run_dir / "refit"
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the selection run's start: the same weights
    model = instantiate(cfg.model)
    loss = build_loss(cfg.loss, model)
    datamodule = instantiate(cfg.datamodule, _partial_=True)(
        source=source, negatives=cfg.negatives, collator=model.collator(), with_teacher=loss.needs_teacher,
        pin_memory=cfg.trainer.accelerator in ("gpu", "cuda"))
    grad_cache = cfg.get("mini_batch_size")
    module = RetrieverModule(model, loss, instantiate(cfg.optimizer), cfg.scheduler.warmup_steps,
                             mini_batch_size=grad_cache, config=OmegaConf.to_container(cfg, resolve=True),
                             gradient_clip_val=cfg.trainer.gradient_clip_val if grad_cache else None,
                             schedule_epochs=int(cfg.trainer.max_epochs))
    # the callbacks that need no validation (progress bar, LR monitor): checkpoints and early stopping watch val
    callbacks = [c for c in build_callbacks(cfg)
                 if not isinstance(c, (pl.callbacks.ModelCheckpoint, pl.callbacks.EarlyStopping))]
    trainer = instantiate(cfg.trainer, default_root_dir=str(out), max_epochs=epochs, max_steps=-1,
                          logger=CSVLogger(save_dir=str(out), name="", version=""), limit_val_batches=0,
                          num_sanity_val_steps=0, enable_checkpointing=False, callbacks=callbacks,
                          gradient_clip_val=None if grad_cache else cfg.trainer.gradient_clip_val,
                          plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:
        print(f"Refit: a fresh model on the training + val queries for {epochs} epoch(s) (the epochs val chose), "
              f"logs in {out}")
    trainer.fit(module, datamodule=datamodule)
    store = datamodule.store
    return module, trainer, {
        "epochs": epochs, "steps": trainer.global_step, "schedule_epochs": int(cfg.trainer.max_epochs),
        "train_queries": store.manifest["num_train_queries"], "store": str(store.path), "val": None,
        "note": "final_model/ is this refit: trained on the training and the val queries, so it has no held-out "
                "val number; 'selection' is the run that chose its epochs by val (its numbers are that run's "
                "model's). Measure final_model/ on the test split (task=evaluate)."}


def export(cfg, source, model, loss, metrics: dict, steps: int, path, trained: bool = True) -> None:
    """A model folder with a model card that says how it was made (trained=False: the starting model, kept because
    val said training did not improve it); never from non-finite weights."""
    if not all(p.isfinite().all() for p in model.parameters()):
        raise FloatingPointError(f"the trained weights are not finite: {path.name}/ not exported")
    card_data(model, cfg, trained)
    model.save(path)
    with open(path / "README.md", "a", encoding="utf-8") as card:
        card.write(training_section(cfg, source, metrics, steps, model, loss, trained=trained))


def push_to_hub(repo_id: str, path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    url = api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                            commit_message="marco-lightning: trained model with its card")
    print(f"Pushed final_model/ to {url}")


def finish_wandb(trainer, exit_code: int) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)


def starting_model(cfg: DictConfig, model):
    """The model as its users have it before training: its own similarity, max_seq_length and prompts (those its
    folder's encode_query / encode_document apply). The model being trained is that model unless the training
    similarity, length or prompts differ (then it is built again, from the same seed, so even a random_init model
    starts from the same weights)."""
    if model.kind != "bi" or (model.similarity == model.own_similarity and cfg.model.get("max_doc_length") is None
                              and (model.query_prompt, model.document_prompt) == model.own_prompts):
        return model
    return built_again(cfg)


def built_again(cfg: DictConfig):
    """The starting model as its users have it, built again from the seed the run's model was built from (the same
    weights, random_init included); the training run's RNG stream stays as if it were never built. CPU only: no
    CUDA context before the Trainer picks devices."""
    overrides = {"similarity": None, "max_doc_length": None, "query_prompt": None, "document_prompt": None} \
        if get_class(cfg.model._target_).kind == "bi" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return instantiate(cfg.model, **overrides)


def checkpoint_position(path: str) -> tuple[int | None, int | None]:
    """The global step a checkpoint was saved at and its epoch, counted from 1; (None, None) without one."""
    if not path:
        return None, None
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return saved["global_step"], int(saved["epoch"]) + 1
