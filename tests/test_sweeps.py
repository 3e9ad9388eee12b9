"""Sweeps: W&B sweep specs, the Optuna search space, the SLURM launcher config, and real multiruns (slow)."""
import itertools
import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, run_cli
from omegaconf import OmegaConf
from test_report import parse_table

from marco_lightning.config import check_training_config


def compose_with_hydra(overrides):
    """The composed config with its `hydra` node (sweeper, launcher, runtime.choices)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import marco_lightning.config  # noqa: F401  (resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


SWEEP_SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def agent_command(spec: dict, values: dict) -> list[str]:
    """The argv a `wandb agent` runs for one set of parameter values (wandb's own macro expansion)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = {**create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}}),
              "env": ["/usr/bin/env"], "interpreter": ["python"], "program": [spec["program"]]}
    argv = []
    for chunk in create_sweep_command(list(spec["command"])):
        argv += macros[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


def parameter_samples(spec: dict) -> list[dict]:
    """Every grid point; for other methods every listed value and both ends of every range."""
    choices = {k: p["values"] if "values" in p else [p["value"]] if "value" in p else [p["min"], p["max"]]
               for k, p in spec["parameters"].items()}
    if spec["method"] == "grid":
        return [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
    return [{**{k: v[0] for k, v in choices.items()}, key: value} for key, vs in choices.items() for value in vs]


@pytest.mark.parametrize("spec_path", SWEEP_SPECS, ids=lambda p: p.name)
def test_wandb_sweep_runs_compose_as_hydra_overrides(spec_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # `wandb agent` sets it before expanding ${envvar:...}
    spec = yaml.safe_load(spec_path.read_text())
    assert (ROOT / spec["program"]).exists() and spec["metric"] == {"name": "val/ndcg@10", "goal": "maximize"}
    samples = parameter_samples(spec)
    assert len(samples) == {"grid": 4, "bayes": 5}[spec["method"]]  # 2x2 grid; bayes: 2 lr ends + 3 batch sizes
    for values in samples:
        argv = agent_command(spec, values)
        assert argv[:3] == ["/usr/bin/env", "python", "run.py"]
        cfg = compose_with_hydra(argv[3:])  # every argument is a valid Hydra override of the real config
        check_training_config(cfg)
        assert cfg.logger.wandb.group == "sweep-abc123"
        for key, value in values.items():  # a group's option, or a value
            chosen = cfg.hydra.runtime.choices.get(key, OmegaConf.select(cfg, key))
            assert chosen == pytest.approx(value) if isinstance(value, float) else chosen == value


def test_optuna_search_space_parses_and_names_real_keys(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution, UniformDistribution

    cfg = compose_with_hydra(["hparams_search=optuna_mnrl"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize" and sweeper.storage is None
    parser = OverridesParser.create()
    space = {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
             for k, v in sweeper.params.items()}
    assert space["optimizer.lr"] == LogUniformDistribution(5e-6, 2e-4)
    assert space["batch_size"] == CategoricalDistribution([16, 32, 64])
    assert space["num_negatives"] == CategoricalDistribution([1, 2, 4])
    assert space["loss.scale"] == UniformDistribution(5.0, 50.0)
    for key in space:  # each is a key of the composed config, so a sampled override applies without `+`
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.loss._target_.endswith("MultipleNegativesRankingLoss") and cfg.model.similarity == "cos"
    check_training_config(cfg)
    # The metric the sweeper maximises is a path into metrics.json as task=train writes (and returns) it.
    head, tail = cfg.optimized_metric.split("/")
    assert (head, tail) == ("after", "ndcg@10")


def test_slurm_launcher_writes_the_multi_node_sbatch_script(tmp_path):
    # A fake `sbatch` keeps the script submitit writes and refuses the job, so nothing waits on a cluster;
    # submitit only looks for `srun` on the PATH.
    bin_dir, captured = tmp_path / "bin", tmp_path / "job.sbatch"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {captured}\necho "sbatch: error: no cluster" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    result = run_cli(["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                      "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu", "logger=none",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120,
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0 and captured.exists(), result.stderr
    script = captured.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB"):
        assert line in script
    assert "srun" in script


# ----------------------------------------------------------------------------------------- real sweeps (slow)
# Two training steps and two validations (before, after) a run; metrics.csv gets val/* at steps 0 and 2.
SWEEP_FAST = [*FAST, "trainer.max_steps=2", "data.val_top_k=10", "logger=none"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data store for the module's sweeps, outside the repository."""
    return f"paths.cache_dir={tmp_path_factory.mktemp('cache')}"


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((p.parent for p in sweep_dir.rglob("metrics.json")), key=lambda p: int(p.name))


@pytest.mark.slow
def test_multirun_grid_then_report(tmp_path, cache):
    sweep = tmp_path / "multirun"
    result = run_cli(["-m", *SWEEP_FAST, cache, "loss=margin_mse_cos,mnrl", "negatives=bm25,tas_b",
                      f"hydra.sweep.dir={sweep}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_folders(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combos = [tuple(o for o in yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text())
                    if o.startswith(("loss=", "negatives="))) for j in jobs]
    assert set(combos) == {(f"loss={loss}", f"negatives={neg}") for loss in ("margin_mse_cos", "mnrl") for neg in ("bm25", "tas_b")}
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert all(0 <= m["after"]["ndcg@10"] <= 1 for m in metrics)

    report = run_cli(["task=report", f"task.runs={sweep}", f"hydra.run.dir={tmp_path / 'report_run'}"], timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = parse_table((sweep / "report.md").read_text())
    assert list(rows[0])[2:4] == ["loss", "negatives"] and len(rows) == 4
    after = [float(r["ndcg@10 after"]) for r in rows]
    assert after == sorted(after, reverse=True)
    by_job = {r["run"]: (r["loss"], r["negatives"], float(r["ndcg@10 after"])) for r in rows}
    assert by_job == {j.name: (*(o.split("=")[1] for o in combo), pytest.approx(m["after"]["ndcg@10"], abs=5e-5))
                      for j, m, combo in zip(jobs, metrics, combos)}
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_optuna_three_trials(tmp_path, cache):
    sweep = tmp_path / "optuna"
    fixed = [o for o in SWEEP_FAST if not o.startswith("batch_size=")]  # a plain value would pin the searched key
    result = run_cli(["hparams_search=optuna", *fixed, cache, "hydra.sweeper.n_trials=3",
                      "hydra.sweeper.sampler.n_startup_trials=2", "batch_size=choice(8,16)",
                      "num_negatives=choice(1,2)", f"hydra.sweep.dir={sweep}"], timeout=600)
    if "Return value must be float-castable" in result.stderr + result.stdout:
        pytest.fail("the Optuna sweeper needs a float: run.py must return the float at "
                    "cfg.optimized_metric (after/ndcg@10) of the dict task=train returns")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_folders(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((j / "metrics.json").read_text())["after"]["ndcg@10"] for j in jobs]
    assert best["best_value"] == pytest.approx(max(values))
    assert set(best["best_params"]) == {"optimizer.lr", "batch_size", "num_negatives"}


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path, cache):
    sweep = tmp_path / "submitit"
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *SWEEP_FAST, cache,
                      f"hydra.sweep.dir={sweep}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [j.name for j in job_folders(sweep)] == ["0"]
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # it ran as a submitit job, with its own logs
