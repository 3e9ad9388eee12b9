"""Callbacks and loggers are config nodes built from their `_target_`, as models and losses are: what a user gets from
the YAML or the command line, and the run config every checkpoint carries."""
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf
from pytorch_lightning import callbacks as cb

EARLY_STOP = ["+callbacks.early_stop._target_=pytorch_lightning.callbacks.EarlyStopping",
              "+callbacks.early_stop.monitor=val/ndcg@10", "+callbacks.early_stop.mode=max"]
TQDM = "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar"


def callbacks(overrides, tmp_path):
    from marco_lightning.loggers import build_callbacks

    return build_callbacks(compose(overrides, tmp_path))


def test_default_callbacks_are_the_documented_nodes(tmp_path):
    from marco_lightning.checkpointing import RunCheckpoint

    checkpoint, bar, lr = callbacks([], tmp_path)
    assert [type(c) for c in (checkpoint, bar, lr)] == [RunCheckpoint, cb.RichProgressBar, cb.LearningRateMonitor]
    assert (checkpoint.dirpath, checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k, checkpoint.save_last,
            checkpoint.filename, checkpoint.auto_insert_metric_name) == (
        os.path.realpath(tmp_path / "checkpoints"), "val/ndcg@10", "max", 1, True, "epoch{epoch}-step{step}", False)
    assert lr.logging_interval == "step"


def test_the_mid_epoch_checkpoint_exists_only_with_an_interval(tmp_path):
    assert [c.monitor for c in callbacks([], tmp_path) if isinstance(c, cb.ModelCheckpoint)] == ["val/ndcg@10"]
    monitored, resume = [c for c in callbacks(["callbacks.resume_checkpoint.every_n_train_steps=3"], tmp_path)
                         if isinstance(c, cb.ModelCheckpoint)]
    assert monitored.monitor == "val/ndcg@10" and monitored._every_n_train_steps == 0  # untouched
    assert (resume.monitor, resume.save_top_k, resume.save_last, resume._every_n_train_steps) == (None, 0, True, 3)
    # the old spelling would have put the interval on the monitored checkpoint: refused, not silently applied
    with pytest.raises(ConfigCompositionException, match="every_n_train_steps"):
        compose(["callbacks.checkpoint.every_n_train_steps=3"], tmp_path)


@pytest.mark.parametrize("overrides,bar", [([], cb.RichProgressBar), ([TQDM], cb.TQDMProgressBar),
                                           (["callbacks.progress_bar=null"], None)])
def test_the_progress_bar_is_chosen_by_its_target(overrides, bar, tmp_path):
    bars = [type(c) for c in callbacks(overrides, tmp_path) if isinstance(c, cb.ProgressBar)]
    assert bars == ([bar] if bar else [])


def test_a_callback_added_on_the_command_line_is_built(tmp_path):
    stop = callbacks(EARLY_STOP + ["+callbacks.early_stop.patience=5"], tmp_path)[-1]
    assert (type(stop), stop.monitor, stop.mode, stop.patience) == (cb.EarlyStopping, "val/ndcg@10", "max", 5)


@pytest.mark.parametrize("override", ["callbacks.progress_bar=tqdm", "+callbacks.early_stop.monitor=val/ndcg@10"])
def test_an_entry_without_a_target_names_the_spelling(override, tmp_path):
    from marco_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"callbacks\.\w+=.*_target_=pytorch_lightning\.callbacks\.TQDMProgressBar"):
        callbacks([override], tmp_path)


@pytest.mark.parametrize("override,message", [("callbacks.progress_bar=tqdm", "callbacks.progress_bar=tqdm"),
                                              ("callbacks.checkpoint=null", "no callbacks.* ModelCheckpoint monitors")])
def test_a_wrong_callbacks_entry_fails_before_data_loads(override, message, tmp_path):
    from marco_lightning.config import ConfigError
    from marco_lightning.tasks.train import main

    with pytest.raises(ConfigError, match=re.escape(message)):
        main(compose([*FAST, "logger=none", override, f"paths.cache_dir={tmp_path}/never"], tmp_path))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("group,option", [("callbacks", p.stem) for p in (ROOT / "conf" / "callbacks").glob("*.yaml")]
                         + [("logger", p.stem) for p in (ROOT / "conf" / "logger").glob("*.yaml")])
def test_every_node_binds_to_its_target(group, option, tmp_path):
    cfg = compose([f"{group}={option}"], tmp_path)
    for name, node in (OmegaConf.to_container(cfg[group], resolve=True) or {}).items():
        target = get_class(node.pop("_target_"))
        if name == "wandb":
            node["offline"] = True  # `auto` is ours: a bool by the time the logger is built
        inspect.signature(target.__init__).bind(None, **node)


def test_wandb_logger_is_built_from_its_node_offline_named_and_tagged(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from marco_lightning.loggers import build_loggers

    csv, wb = build_loggers(compose(["logger=wandb", "logger.wandb.group=g", "tags=[mine]"], tmp_path), tmp_path)
    try:
        assert isinstance(csv, CSVLogger) and csv.experiment.metrics_file_path == str(tmp_path / "metrics.csv")
        assert isinstance(wb, WandbLogger) and wb._offline is True  # `auto` resolved: no login in tests
        init = wb._wandb_init
        assert (init["project"], init["group"], init["name"], init["dir"]) == (
            "marco-lightning", "g", "minilm-margin_mse_cos-bm25-sample", str(tmp_path))
        assert init["tags"] == ["model=minilm", "loss=margin_mse_cos", "negatives=bm25", "data=sample", "mine"]
        assert wb.experiment.config["loss"]["_target_"].endswith("MarginMSELoss")  # the resolved config
    finally:
        wb.experiment.finish()
    assert [type(x) for x in build_loggers(compose(["logger=none"], tmp_path), tmp_path)] == [CSVLogger]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run with an EarlyStopping added on the command line; its Trainer is kept for inspection."""
    from marco_lightning.tasks import train

    out, seen, fit_and_export = tmp_path_factory.mktemp("run"), {}, train.fit_and_export

    def spy(cfg, trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return fit_and_export(cfg, trainer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "fit_and_export", spy)
        metrics = train.main(compose([*FAST, "logger=none", *EARLY_STOP], out))
    return out, seen["trainer"], metrics


def checkpoint_config(path):
    # weights_only=True, as Lightning loads a checkpoint to resume: the config is plain data
    return torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]


def test_the_run_gets_the_configured_callbacks(run):
    out, trainer, metrics = run
    assert isinstance(trainer.early_stopping_callback, cb.EarlyStopping)
    assert trainer.early_stopping_callback.monitor == "val/ndcg@10"
    assert torch.isfinite(trainer.early_stopping_callback.best_score)  # it watched the validation
    assert isinstance(trainer.progress_bar_callback, cb.TQDMProgressBar)
    assert len(trainer.checkpoint_callbacks) == 1  # every_n_train_steps null: no mid-epoch writer
    # the monitored checkpoint is the one final_model/ and metrics.json follow
    best = trainer.checkpoint_callback.best_model_path
    assert best and metrics["best_checkpoint"] == os.path.relpath(best, out)


def test_checkpoints_carry_the_run_config(run):
    out, _, metrics = run
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    for ckpt in (out / "checkpoints" / "last.ckpt", out / metrics["best_checkpoint"]):
        assert checkpoint_config(ckpt) == saved


def test_a_resumed_run_continues_and_records_its_own_config(run, tmp_path):
    from marco_lightning.tasks.train import main

    out, _, _ = run
    cfg = compose([*FAST, "logger=none", *EARLY_STOP, "trainer.max_epochs=2", "task.validate_before=false",
                   f"ckpt_path={out}", f"paths.cache_dir={out / 'cache'}"], tmp_path)
    main(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    config = checkpoint_config(tmp_path / "checkpoints" / "last.ckpt")
    assert config == OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    assert config["ckpt_path"] == str(out) and json.loads((tmp_path / "metrics.json").read_text())["after"]


def test_early_stop_ends_training_when_val_stops_improving_and_exports_the_best_epoch(tmp_path, monkeypatch):
    """callbacks=early_stop with patience 1: a val nDCG@10 of 0.5, 0.7, 0.6, ... stops training after the third
    epoch of six; final_model/ is the second epoch's checkpoint, the best by val."""
    import csv

    from safetensors.torch import load_file

    from marco_lightning.module import RetrieverModule
    from marco_lightning.tasks import train

    measure, scripted = RetrieverModule.measure, [0.5, 0.7, 0.6, 0.6, 0.6, 0.6]

    def scripted_measure(self, run):  # the validations during fit read the script; metrics.json the real ones
        metrics = measure(self, run)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            metrics["ndcg@10"] = scripted[self.current_epoch]
        return metrics

    monkeypatch.setattr(RetrieverModule, "measure", scripted_measure)
    seen, fit_and_export = {}, train.fit_and_export

    def spy(cfg, trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return fit_and_export(cfg, trainer, *args, **kwargs)

    monkeypatch.setattr(train, "fit_and_export", spy)
    cfg = compose([*FAST, "logger=none", "callbacks=early_stop", "callbacks.early_stop.patience=1",
                   "trainer.max_epochs=6", "task.validate_before=false"], tmp_path)
    assert cfg.callbacks.early_stop.monitor == "val/ndcg@10"
    metrics = train.main(cfg)
    assert isinstance(seen["trainer"].early_stopping_callback, cb.EarlyStopping)
    trained = {int(r["epoch"]) for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("train/loss")}
    assert trained == {0, 1, 2}  # 3 epochs of 6: stopped by the third validation without a better nDCG@10
    best = torch.load(tmp_path / metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 and metrics["best_checkpoint"].startswith(f"checkpoints/epoch1-step{best['global_step']}")
    # metrics.json and the card say which epoch final_model/ is, of how many, and why the run ended
    assert metrics["epochs"] == {"best": 2, "trained": 3, "max": 6, "stopped_early": True}
    card = (tmp_path / "final_model" / "README.md").read_text()
    assert (f"Steps: {best['global_step']} (epoch 2 of the 3 trained, up to 6: early stopping on val ended the run)"
            in card)
    exported = load_file(tmp_path / "final_model" / "model.safetensors")
    assert exported
    for name, tensor in exported.items():  # final_model/ holds the best epoch's weights
        torch.testing.assert_close(tensor, best["state_dict"]["model.st.0.model." + name], atol=0, rtol=0)


def test_a_run_resumed_into_a_new_folder_keeps_the_killed_runs_best(tmp_path, monkeypatch):
    """Val nDCG@10 0.5, 0.9, 0.6 over a first run's 3 epochs (best: the second), then a resume with one more epoch
    (0.7) into a new folder, as `ckpt_path=RUN` does: final_model/ is still the second epoch's weights, from a copy
    of its checkpoint in the new folder, and the first run's folder is left as it was."""
    from safetensors.torch import load_file

    from marco_lightning.module import RetrieverModule
    from marco_lightning.tasks import train

    measure, scripted = RetrieverModule.measure, [0.5, 0.9, 0.6, 0.7]

    def scripted_measure(self, run):
        metrics = measure(self, run)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            metrics["ndcg@10"] = scripted[min(self.current_epoch, 3)]
        return metrics

    monkeypatch.setattr(RetrieverModule, "measure", scripted_measure)
    common = [*FAST, "logger=none", "task.validate_before=false", "task.keep_start=false"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first_metrics = train.main(compose([*common, "trainer.max_epochs=3"], first))
    best = torch.load(first / first_metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert best["epoch"] == 1
    before = {p.name: p.stat().st_mtime_ns for p in (first / "checkpoints").iterdir()}

    metrics = train.main(compose([*common, "trainer.max_epochs=4", f"ckpt_path={first}"], resumed))
    assert metrics["best_checkpoint"] == f"checkpoints/{Path(first_metrics['best_checkpoint']).name}"
    assert (resumed / metrics["best_checkpoint"]).is_file()
    assert metrics["epochs"]["best"] == 2
    for name, tensor in load_file(resumed / "final_model" / "model.safetensors").items():
        torch.testing.assert_close(tensor, best["state_dict"]["model.st.0.model." + name], atol=0, rtol=0)
    assert {p.name: p.stat().st_mtime_ns for p in (first / "checkpoints").iterdir()} == before


def stoppers(overrides, tmp_path):
    return [(c.monitor, c.mode, c.patience) for c in callbacks(overrides, tmp_path) if isinstance(c, cb.EarlyStopping)]


def test_early_stop_is_off_by_default(tmp_path):
    assert compose([], tmp_path).callbacks.get("early_stop") is None
    assert stoppers([], tmp_path) == stoppers(["experiment=bi_mnrl"], tmp_path) == []


@pytest.mark.parametrize("experiment", ["beir_mnrl", "beir_margin_mse", "beir_choose"])
def test_the_beir_experiments_stop_after_two_validations_without_a_gain(experiment, tmp_path):
    """Own collections train up to 10 epochs and end by themselves (SciFact: best epoch 4, stopped after 6);
    callbacks=default trains them all."""
    assert stoppers([f"experiment={experiment}", "data.root=x"], tmp_path) == [("val/ndcg@10", "max", 2)]
    assert compose([f"experiment={experiment}", "data.root=x"], tmp_path).trainer.max_epochs == 10
    assert stoppers([f"experiment={experiment}", "data.root=x", "callbacks=default"], tmp_path) == []
