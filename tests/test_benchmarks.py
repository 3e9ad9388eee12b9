"""The benchmarks (`make bench`): each suite runs end to end at a tiny size, and BENCHMARKS.md keeps the
sections other suites own."""
import pytest

from benchmarks.run_all import main, merge, sections

SUITES = {"training": "Training throughput", "evaluation": "Evaluation throughput",
          "hotpath": "Hot-path effects", "profiles": "Profiles", "compile": "torch.compile"}


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
