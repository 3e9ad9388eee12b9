"""The benchmarks (`make bench`): each suite runs end to end at a tiny size, and BENCHMARKS.md keeps the
sections other suites own."""
import pytest
from conftest import needs_shared

from benchmarks.run_all import main, merge, sections

SUITES = {"training": "Training throughput", "whole_run": "Whole run", "evaluation": "Evaluation throughput",
          "hotpath": "Hot-path effects", "profiles": "Profiles", "compile": "torch.compile", "mining": "Mining"}


def test_merge_replaces_measured_sections_and_keeps_the_others():
    old = "# Benchmarks\n\n## Training throughput\n\nold\n\n## Data pipeline\n\ndata helper's numbers\n"
    merged = sections(merge(old, {"Training throughput": "## Training throughput\n\nnew\n"}))
    assert merged["Training throughput"].strip().endswith("new")
    assert "data helper's numbers" in merged["Data pipeline"]
    assert "Not measured yet" in merged["torch.compile"]  # a placeholder until someone runs it


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a real MiniLM on a shared 2-core machine
@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_runs_at_a_tiny_size(suite, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("## Data pipeline\n\nkept\n")
    main(["--quick", "--only", suite, "--out", str(out)])
    written = sections(out.read_text())
    assert SUITES[suite] in written and "nan" not in written[SUITES[suite]]
    assert "kept" in written["Data pipeline"]


@needs_shared  # its passages and queries, like every benchmark's (benchmarks/common.py)
def test_gpu_benchmark_script_runs_here(tmp_path):
    """benchmarks/gpu.sh is for a GPU machine; on this CPU it must still run end to end (so it does not rot)."""
    import json
    import os
    import subprocess

    from benchmarks.common import ROOT

    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(tmp_path / "gpu.json")],
                       check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert {"project (sdpa, padded)", "sentence-transformers MarginMSELoss"} <= set(res["train"])
    assert all(row["samples_per_s"] > 0 for row in res["train"].values())
    assert set(res["encode"]) == {"project", "sentence-transformers"} and "| training |" in r.stdout
