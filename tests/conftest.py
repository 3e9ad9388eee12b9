import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The workplace's real data and tools sit beside the repository; a user's clone has none (CI has them).
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"needs the shared real data at {SHARED_DATA} (not part of the repository)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path, monkeypatch):
    # Never reach for the network or a real account from a test; keep W&B's files inside the test's folder.
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def compose(overrides=(), tmp_path=None):
    """The real conf/ tree, composed as `python run.py <overrides>` would, with outputs under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import marco_lightning.config  # noqa: F401  (resolvers)

    extra = [f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"] if tmp_path else []
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*extra, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as under @hydra.main: group choices name runs and errors
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# Small and fast: tiny random model, CPU, one short epoch, no W&B network.
FAST = ["model=tiny", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=1", "batch_size=8",
        "trainer.check_val_every_n_epoch=1", "num_workers=0", "scheduler.warmup_steps=0.1", "data.val_top_k=20",
        "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar"]


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """`python run.py args...` in a subprocess, as a user would type it."""
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})


def killed_and_resumed(args, tmp_path, kill_after_step: int, timeout: int = 600):
    """`python run.py args` three times, as a user would: unbroken; killed (SIGKILL) once last.ckpt is past
    `kill_after_step`; resumed from the killed run's folder. -> (unbroken, killed, resumed) run folders."""
    import signal
    import time

    import torch

    unbroken, killed, resumed = tmp_path / "unbroken", tmp_path / "killed", tmp_path / "resumed"
    assert run_cli([*args, f"hydra.run.dir={unbroken}"], timeout=timeout).returncode == 0
    proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    last, deadline = killed / "checkpoints" / "last.ckpt", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= kill_after_step:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_cli([*args, f"ckpt_path={killed}", f"hydra.run.dir={resumed}"], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return unbroken, killed, resumed


@pytest.fixture
def training_makes_it_worse(monkeypatch):
    """Validation scripted to say training made the model worse: nDCG@10 0.9 before training (a module not yet
    attached to a trainer, or at step 0), 0.1 after; the other measures are the real ones."""
    from marco_lightning.module import RetrieverModule

    measure = RetrieverModule.measure

    def scripted_measure(self, run):
        before = self._trainer is None or self.trainer.global_step == 0
        return {**measure(self, run), "ndcg@10": 0.9 if before else 0.1}

    monkeypatch.setattr(RetrieverModule, "measure", scripted_measure)


@pytest.fixture
def scripted_val(monkeypatch):
    """script(before, after): val nDCG@10 scripted per run: before(run_dir) for the model not yet trained (a module
    not attached to a trainer, or at step 0), after(run_dir) once it trains; the other measures are the real ones.
    run_dir is the output folder of the task=train run being measured (each candidate's, each fold's)."""
    from marco_lightning.module import RetrieverModule
    from marco_lightning.tasks import train

    measure, check, running = RetrieverModule.measure, train.check_training_config, {}

    def checked(cfg):  # every run (a candidate, a fold) begins here; the start is measured before any trainer
        running["dir"] = str(cfg.paths.output_dir)
        check(cfg)

    def script(before, after):
        def scripted_measure(self, run):
            untrained = self._trainer is None or self.trainer.global_step == 0
            return {**measure(self, run), "ndcg@10": (before if untrained else after)(running["dir"])}

        monkeypatch.setattr(RetrieverModule, "measure", scripted_measure)
        monkeypatch.setattr(train, "check_training_config", checked)

    return script
