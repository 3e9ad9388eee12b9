"""task=report: one markdown table and one figure comparing finished runs (single runs, multirun grids, Optuna).

    python run.py task=report task.runs=multirun/2026-11-22/14-03-07-512345
    python run.py task=report 'task.runs=[outputs/2026-11-22,outputs/2026-11-23]' task.metric=mrr@10
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from marco_lightning.config import ConfigError


def find_runs(folders) -> list[Path]:
    """Every run folder (one holding metrics.json) at or below `folders`, in natural order (job 2 before job 10)."""
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]
    runs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"task.runs: no such folder: {folder}")
        found = sorted({p.parent for p in folder.rglob("metrics.json") if _stands_for_itself(p.parent)}, key=natural)
        if not found:
            raise ConfigError(f"task.runs: no run folders (with metrics.json) at or below {folder}: point it at a "
                              "run folder (outputs/DATE/TIME) or a sweep folder (multirun/DATE/TIME)")
        runs += found
    return list(dict.fromkeys(runs))


def _stands_for_itself(run: Path) -> bool:
    """A task.candidates run repeats its chosen candidate's metrics (its candidates/<name>/ runs stand for it), and
    their folds/<f>/ (task.folds) were validated on other queries: neither is a row of its own."""
    fold = len(run.parents) > 2 and run.parent.name == "folds" and run.parents[2].name == "candidates"
    return not (run / "candidates").is_dir() and not fold


def read_metrics(run: Path) -> dict:
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); delete it or rerun the run") from e
    if not isinstance(metrics.get("after"), dict) and isinstance(metrics.get("refit"), dict):
        raise ConfigError(f"{path}: a task.refit=true run, whose final model has no held-out val number (\"selection\" "
                          "holds the val-chosen run's); compare refit runs on a test split (task=evaluate), or leave "
                          "this run out of task.runs")
    if not isinstance(metrics.get("after"), dict):
        raise ConfigError(f"{path}: has no \"after\" metrics; was it written by task=train?")
    return metrics


def read_overrides(run: Path) -> dict[str, str]:
    """The command-line overrides that made this run, as Hydra wrote them (`+key=v` and `++key=v` count as key)."""
    path = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else None
    return dict(o.lstrip("+").split("=", 1) if "=" in o else (o.lstrip("~"), "(deleted)") for o in items or [])


def config_value(run: Path, key: str) -> str:
    """What `key` (a group such as `loss`, or a value such as `optimizer.lr`) was in a run it was not overridden in."""
    hydra_yaml, config_yaml = run / ".hydra" / "hydra.yaml", run / "config.yaml"
    if hydra_yaml.exists():
        choices = OmegaConf.load(hydra_yaml).hydra.runtime.choices
        if key in choices:
            return str(choices[key])
    if config_yaml.exists():
        value = OmegaConf.select(OmegaConf.load(config_yaml), key, default="?", throw_on_resolution_failure=False)
        return OmegaConf.to_yaml(value).strip() if OmegaConf.is_config(value) else str(value)
    return "?"


def flat_config(run: Path) -> dict[str, str]:
    """config.yaml as `key.path -> value`: labels the runs that have no .hydra/overrides.yaml."""
    path = run / "config.yaml"
    if not path.exists():
        return {}
    def flatten(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from flatten(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], str(node)
    return {k: v for k, v in flatten(yaml.safe_load(path.read_text()) or {}) if not k.startswith("paths.")}


def compact(value: str) -> str:
    """1.9906996673933362e-05 -> 1.991e-05: sampled numbers as a person would write them."""
    try:
        return f"{float(value):.4g}" if len(value) > 8 and "." in value else value
    except ValueError:
        return value


def label_runs(runs: list[Path]) -> tuple[list[str], list[dict[str, str]]]:
    """The keys whose values differ between the runs, and each run's value of them."""
    settings = [read_overrides(r) for r in runs]
    if any(settings):  # missing overrides take the run's own value of the key (its default then)
        keys = list(dict.fromkeys(k for s in settings for k in s))
        settings = [{k: s[k] if k in s else config_value(r, k) for k in keys} for r, s in zip(runs, settings)]
    else:
        settings = [flat_config(r) for r in runs]
        keys = list(dict.fromkeys(k for s in settings for k in s))
    differing = [k for k in keys if len({s.get(k, "?") for s in settings}) > 1]
    return differing, [{k: compact(s.get(k, "?")) for k in differing} for s in settings]


def read_curve(run: Path, column: str) -> tuple[list[int], list[float]]:
    """(step, value) of `column` in the run's Lightning metrics.csv, rows where it was logged."""
    path = run / "metrics.csv"
    if not path.exists():
        return [], []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get(column) not in (None, "")]
    return [int(float(r["step"])) for r in rows], [float(r[column]) for r in rows]


def collect(folders, metric: str) -> list[dict]:
    """One row per run, best first by metrics.json's after[metric]."""
    runs = find_runs(folders)
    keys, labels = label_runs(runs)
    root = Path(os.path.commonpath(runs) if len(runs) > 1 else runs[0].parent)
    rows = [{"run": run, "name": str(run.relative_to(root)), "keys": keys, "label": label, **read_metrics(run)}
            for run, label in zip(runs, labels)]
    if not any(metric in r["after"] for r in rows):
        available = sorted({m for r in rows for m in r["after"]})
        raise ConfigError(f"task.metric={metric} is in no run's metrics.json; available: {', '.join(available)}")
    return sorted(rows, key=lambda r: -r["after"].get(metric, float("-inf")))


def markdown_table(rows: list[dict], metric: str) -> str:
    metrics = list(dict.fromkeys([metric, *(m for r in rows for m in r["after"])]))
    keys = rows[0]["keys"]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    header = ["#", "run", *keys, *(f"{m} {when}" for m in metrics for when in ("before", "after", "Δ"))]
    lines = [header, ["---:", "---", *["---"] * len(keys), *["---:"] * (3 * len(metrics))]]
    for rank, r in enumerate(rows, 1):
        cells = [str(rank), r["name"], *(r["label"][k] for k in keys)]
        for m in metrics:
            before, after = r.get("before", {}).get(m), r["after"].get(m)
            delta = None if before is None or after is None else after - before
            cells += [fmt(before), fmt(after), "–" if delta is None else f"{delta:+.4f}"]
        lines.append(cells)
    table = "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines)
    teacher = next((r["teacher"] for r in rows if r.get("teacher")), None)
    if teacher:  # the same validation run for every training run: one line, not a column
        table += "\n\nTeacher (data.val_teacher_run): " + ", ".join(f"{m} {v:.4f}" for m, v in teacher.items())
    return table


def short_label(row: dict, rank: int) -> str:
    return f"#{rank} " + (" ".join(f"{k}={v}" for k, v in row["label"].items()) or row["name"])


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    curves = [read_curve(r["run"], f"val/{metric}") for r in rows]
    with_curves = any(steps for steps, _ in curves)
    n = len(rows)
    fig, axes = plt.subplots(1, 2 if with_curves else 1, figsize=(14 if with_curves else 8, max(3.5, 1.5 + 0.4 * n)),
                             squeeze=False, width_ratios=[3, 2] if with_curves else None, layout="constrained")
    # Up to 10 runs: distinct colours; more: a gradient from best (dark) to worst (light), so colour reads as rank.
    colors = [plt.cm.tab10(i) if n <= 10 else plt.cm.viridis(0.9 * i / (n - 1)) for i in range(n)]
    bars = axes[0][0]
    y = range(n)[::-1]  # best on top
    before = [r.get("before", {}).get(metric, float("nan")) for r in rows]
    after = [r["after"].get(metric, float("nan")) for r in rows]
    bars.barh([i + 0.2 for i in y], before, height=0.4, color="lightgray", label="before training")
    bars.barh([i - 0.2 for i in y], after, height=0.4, color=colors, label="after training")
    for i, v in zip(y, after):
        bars.text(v, i - 0.2, f" {v:.3f}", va="center", fontsize=8)
    teacher = next((r["teacher"][metric] for r in rows if metric in r.get("teacher", {})), None)
    if teacher is not None:
        bars.axvline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher:.3f}")
    bars.set_yticks(list(y), [short_label(r, k) for k, r in enumerate(rows, 1)], fontsize=8)
    bars.set_xlabel(f"validation {metric}")
    bars.set_xlim(0, 1.12 * max([v for v in [*before, *after, teacher or 0] if not math.isnan(v)] + [1e-9]))
    bars.legend(loc="best", fontsize=8)
    bars.set_title(f"{metric} before / after training ({n} runs, best on top)")
    if with_curves:
        ax = axes[0][1]
        for rank, ((steps, values), color) in enumerate(zip(curves, colors), 1):
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, color=color, label=f"#{rank}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"val/{metric}")
        ax.set_title("validation curves (metrics.csv)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=max(1, n // 12 + 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: DictConfig) -> dict:
    task = cfg.task
    if OmegaConf.is_missing(task, "runs"):
        raise ConfigError("task.runs is not set: python run.py task=report task.runs=multirun/DATE/TIME "
                          "(or task.runs=[DIR1,DIR2]) names the run or sweep folders to compare")
    folders = [task.runs] if isinstance(task.runs, str) else list(task.runs)
    rows = collect(folders, task.metric)
    # Next to the runs when one folder was given (a sweep's report lives in the sweep), else in this run's folder.
    out = Path(task.out or (folders[0] if len(folders) == 1 else cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, task.metric)
    md, png = out / "report.md", out / "report.png"
    md.write_text(f"# {len(rows)} runs below {', '.join(folders)}, best {task.metric} first\n\n{table}\n\n"
                  f"![{task.metric} before/after and validation curves]({png.name})\n")
    plot(rows, task.metric, png)
    print(table)
    print(f"\nReport: {md}\nFigure: {png}")
    return {"report": str(md), "figure": str(png), "runs": [str(r["run"]) for r in rows]}
