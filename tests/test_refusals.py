"""A refusal is a sentence, not a stack: `python run.py` prints a UserError's message alone and exits with status 2;
HYDRA_FULL_ERROR=1 shows its stack; a bug (any other exception) keeps its traceback."""
from conftest import run_cli

from marco_lightning.config import ConfigError
from marco_lightning.data.download import DownloadError
from marco_lightning.data.formats import DataFormatError
from marco_lightning.errors import UserError
from marco_lightning.module import NonFiniteLossError

BAD_MODE = "Error: task.mode='nope': use one of score, rerank, retrieve"


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_errors_that_tell_the_user_what_to_change_are_user_errors():
    for kind in (ConfigError, DataFormatError, DownloadError, NonFiniteLossError):
        assert issubclass(kind, UserError)
    assert issubclass(UserError, ValueError)  # `except ValueError` around a reader or a check still catches them
    assert issubclass(DownloadError, RuntimeError) and issubclass(NonFiniteLossError, FloatingPointError)


def test_a_config_refusal_prints_one_sentence_and_exits_2(tmp_path):
    r = run_cli(["task=evaluate", "data=sample", "task.mode=nope", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert (r.returncode, lines(r.stderr)) == (2, [BAD_MODE]), r.stderr[-3000:]


def test_a_malformed_file_prints_one_sentence_naming_file_and_line(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("19335 Q0 1017759 1 2.0 t\n19335 Q0 1082489 2 two t\n")
    r = run_cli(["task=evaluate", "data=sample", f"task.run={run}", f"hydra.run.dir={tmp_path / 'out'}"], timeout=300)
    assert r.returncode == 2 and len(lines(r.stderr)) == 1, r.stderr[-3000:]
    assert lines(r.stderr)[0].startswith(f"Error: {run}:2: expected a TREC run line 'qid Q0 pid rank score tag'")


def test_hydra_full_error_shows_the_refusals_stack(tmp_path):
    r = run_cli(["task=evaluate", "data=sample", "task.mode=nope", f"hydra.run.dir={tmp_path}"], timeout=300,
                env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
    assert "ConfigError: task.mode='nope'" in r.stderr and "tasks/evaluate.py" in r.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    # a task function that fails as a bug does: json.loads(cfg) raises a TypeError, no UserError
    r = run_cli(["task._target_=json.loads", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
    assert "TypeError: the JSON object must be str" in r.stderr
    assert not any(line.startswith("Error: ") for line in r.stderr.splitlines())  # no refusal's sentence


def test_a_multirun_runs_every_job_and_ends_with_the_sentence_and_2(tmp_path):
    r = run_cli(["-m", "task=evaluate", "data=sample", "task.mode=nope,other", f"hydra.sweep.dir={tmp_path}"],
                timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = lines(r.stderr)
    # each job says why it was refused; Hydra then ends the sweep with its first failed job, without a stack
    assert said[:2] == [BAD_MODE, BAD_MODE.replace("nope", "other")], said
    assert said[2].startswith("Error executing job with overrides") and said[3] == BAD_MODE, said
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
