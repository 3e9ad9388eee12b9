"""task=report on hand-made run folders: rows, order and numbers of the table, and the figure."""
import json

import pytest
import yaml
from conftest import ROOT, compose, run_cli

from marco_lightning.config import ConfigError
from marco_lightning.tasks import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(folder, after, before=None, overrides=None, choices=None, config=None, curve=None, teacher=None):
    """A run folder as task=train and Hydra leave it (only the files the report reads)."""
    folder.mkdir(parents=True)
    metrics = {"after": after, "best_checkpoint": "checkpoints/x.ckpt"}
    if before is not None:
        metrics["before"] = before
    if teacher is not None:
        metrics["teacher"] = teacher
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices or {}}}}))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if curve is not None:  # Lightning's CSVLogger: train rows and val rows interleaved, blanks where not logged
        lines = ["epoch,step,train/loss,val/ndcg@10,val/mrr@10"]
        for step, value in curve:
            lines += [f"0,{step},0.5,,", f"0,{step},,{value},{value / 2}"]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def parse_table(text):
    """The markdown table's rows as dicts, header -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture
def sweep(tmp_path):
    """A 3-job multirun: loss and negatives differ, model.similarity is the same everywhere."""
    root = tmp_path / "multirun" / "2026-11-22" / "14-03-07-512345"
    m = lambda ndcg, mrr, rec: {"ndcg@10": ndcg, "mrr@10": mrr, "recall@100": rec}
    make_run(root / "0", m(0.30, 0.50, 0.60), m(0.25, 0.40, 0.55),
             ["loss=margin_mse", "negatives=bm25", "model.similarity=dot"], curve=[(0, 0.25), (5, 0.30)],
             teacher=m(0.70, 0.90, 0.65))
    make_run(root / "1", m(0.45, 0.60, 0.70), m(0.25, 0.40, 0.55),
             ["loss=mnrl", "negatives=bm25", "model.similarity=dot"], curve=[(0, 0.25), (5, 0.38), (10, 0.45)],
             teacher=m(0.70, 0.90, 0.65))
    make_run(root / "10", m(0.40, 0.55, 0.58), m(0.25, 0.40, 0.55),
             ["loss=mnrl", "negatives=tas_b", "model.similarity=dot"], curve=[(0, 0.25), (5, 0.40)],
             teacher=m(0.70, 0.90, 0.65))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_sweep_report_rows_order_numbers_and_figure(sweep, tmp_path):
    cfg = compose(["task=report", f"task.runs={sweep}"], tmp_path / "report_run")
    report.main(cfg)
    rows = parse_table((sweep / "report.md").read_text())
    # Best ndcg@10 after training first; only the overrides that differ are columns.
    assert [(r["#"], r["run"], r["loss"], r["negatives"]) for r in rows] == [
        ("1", "1", "mnrl", "bm25"), ("2", "10", "mnrl", "tas_b"), ("3", "0", "margin_mse", "bm25")]
    assert "model.similarity" not in rows[0]
    assert [(r["ndcg@10 before"], r["ndcg@10 after"], r["ndcg@10 Δ"]) for r in rows] == [
        ("0.2500", "0.4500", "+0.2000"), ("0.2500", "0.4000", "+0.1500"), ("0.2500", "0.3000", "+0.0500")]
    assert [r["recall@100 Δ"] for r in rows] == ["+0.1500", "+0.0300", "+0.0500"]
    assert "Teacher (data.val_teacher_run): ndcg@10 0.7000" in (sweep / "report.md").read_text()

    from PIL import Image

    png = (sweep / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000  # two panels with text, not an empty canvas
    width, height = Image.open(sweep / "report.png").size
    assert width >= 1200 and height >= 400


def test_sort_by_another_metric_and_missing_before(tmp_path):
    make_run(tmp_path / "a", {"ndcg@10": 0.5, "mrr@10": 0.2}, overrides=["optimizer.lr=1e-5"])
    make_run(tmp_path / "b", {"ndcg@10": 0.4, "mrr@10": 0.3}, {"ndcg@10": 0.1, "mrr@10": 0.1},
             overrides=["optimizer.lr=3.0012345678e-05"])  # as Optuna samples it
    rows = report.collect([tmp_path], "mrr@10")
    table = parse_table(report.markdown_table(rows, "mrr@10"))
    assert [(r["optimizer.lr"], r["mrr@10 after"], r["mrr@10 Δ"], r["ndcg@10 before"]) for r in table] == [
        ("3.001e-05", "0.3000", "+0.2000", "0.1000"), ("1e-5", "0.2000", "–", "–")]


def test_key_overridden_in_one_run_takes_the_others_default(tmp_path):
    # Two separate `python run.py` runs: one overrode loss, the other ran with the default (its hydra.yaml choice)
    # and overrode a batch size, which the first run took from its config.yaml.
    make_run(tmp_path / "x", {"ndcg@10": 0.4}, overrides=["loss=mnrl"], choices={"loss": "mnrl"},
             config={"batch_size": 16, "loss": {"scale": 20.0}})
    make_run(tmp_path / "y", {"ndcg@10": 0.3}, overrides=["batch_size=32"], choices={"loss": "margin_mse"},
             config={"batch_size": 32})
    table = parse_table(report.markdown_table(report.collect([tmp_path / "x", tmp_path / "y"], "ndcg@10"), "ndcg@10"))
    assert [(r["run"], r["loss"], r["batch_size"]) for r in table] == [("x", "mnrl", "16"), ("y", "margin_mse", "32")]


def test_runs_without_hydra_folder_are_labelled_by_their_config(tmp_path):
    make_run(tmp_path / "p", {"ndcg@10": 0.2}, config={"seed": 1, "optimizer": {"lr": 1e-5}, "paths": {"o": "p"}})
    make_run(tmp_path / "q", {"ndcg@10": 0.3}, config={"seed": 1, "optimizer": {"lr": 2e-5}, "paths": {"o": "q"}})
    table = parse_table(report.markdown_table(report.collect([tmp_path], "ndcg@10"), "ndcg@10"))
    assert [(r["run"], r["optimizer.lr"]) for r in table] == [("q", "2e-05"), ("p", "1e-05")]
    assert "seed" not in table[0] and "paths.o" not in table[0]


def test_bad_input_names_the_key_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"task.runs: no run folders .* below .*empty"):
        report.collect([tmp_path / "empty"], "ndcg@10")
    with pytest.raises(ConfigError, match="task.runs: no such folder: .*nowhere"):
        report.collect([tmp_path / "nowhere"], "ndcg@10")
    make_run(tmp_path / "r", {"ndcg@10": 0.2, "mrr@10": 0.1})
    with pytest.raises(ConfigError, match=r"task.metric=map@10 is in no run's metrics.json; available: mrr@10, ndcg@10"):
        report.collect([tmp_path / "r"], "map@10")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken/metrics.json: not valid JSON"):
        report.collect([tmp_path / "broken"], "ndcg@10")
    with pytest.raises(ConfigError, match="task.runs is not set"):
        report.main(compose(["task=report"], tmp_path))


def test_cli_prints_the_table_and_where_it_wrote(sweep, tmp_path):
    out = tmp_path / "elsewhere"
    result = run_cli(["task=report", f"task.runs=[{sweep / '0'},{sweep / '1'}]", f"task.out={out}",
                      f"hydra.run.dir={tmp_path / 'report_run'}"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| 1 | 1 | mnrl |" in result.stdout and "| 2 | 0 | margin_mse |" in result.stdout
    assert f"Report: {out / 'report.md'}" in result.stdout and (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (ROOT / "outputs" / "report.md").exists()


def test_a_refit_run_is_refused_naming_why(tmp_path):
    """task.refit's final model has no val number: the report says so instead of "not written by task=train"."""
    run = tmp_path / "refit"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"selection": {"after": {"ndcg@10": 0.5}}, "refit": {"epochs": 2}}))
    with pytest.raises(ConfigError, match="task.refit=true run, whose final model has no held-out val number"):
        report.read_metrics(run)
