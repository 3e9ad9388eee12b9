"""A refusal is a sentence, not a stack: `python run.py` prints a UserError's message alone and exits with status 2;
HYDRA_FULL_ERROR=1 shows its stack; a bug (any other exception) keeps its traceback."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli

from marco_lightning.checkpointing import resolve_ckpt_path
from marco_lightning.config import ConfigError, check_ckpt_path
from marco_lightning.data.beir import BeirFolder, _find
from marco_lightning.data.download import DownloadError, _source, ensure_files, fetch, missing_downloads
from marco_lightning.data.formats import DataFormatError, open_binary
from marco_lightning.data.parquet import iter_parquet
from marco_lightning.data.sampling import check_teacher_coverage
from marco_lightning.data.sources import BeirSource, MarcoSource
from marco_lightning.data.store import Store, TextTable, _negatives_config, _pair_keys, prepare
from marco_lightning.data.trec import read_run
from marco_lightning.errors import ExistingFileError, MissingFileError, UserError
from marco_lightning.evaluation import compute_metrics, parse_measure
from marco_lightning.grad_cache import cached_loss_backward
from marco_lightning.inference import check_precision
from marco_lightning.losses import DistillKLDivLoss, MultipleNegativesRankingLoss
from marco_lightning.models import BiEncoder, _chunks, load_model
from marco_lightning.module import NonFiniteLossError
from marco_lightning.retrieval import retrieve

BAD_MODE = "Error: task.mode='nope': use one of score, rerank, retrieve"


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_errors_that_tell_the_user_what_to_change_are_user_errors():
    for kind in (ConfigError, DataFormatError, DownloadError, NonFiniteLossError, MissingFileError, ExistingFileError):
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


# ------------------------------------------------------------------ refusals from the command line, one line each

@pytest.mark.parametrize("args, said", [
    # a missing input folder (data.BeirFolder), before anything is read
    (["task=mine", "data=beir", "data.root={tmp}/nowhere"],
     ("Error: data.root={tmp}/nowhere: no such folder; point data.root at a BEIR folder (corpus.jsonl, "
      "queries.jsonl, qrels/<split>.tsv)")),
    # a bad task.precision, before any model loads
    (["task=evaluate", "data=sample", "task.mode=rerank", "task.precision=fp8"],
     "Error: task.precision='fp8': use one of auto, bf16, 32"),
    # a store build refused (data.store._negatives_config)
    (["task=prepare", "data=sample", "negatives.num_per_system=0"],
     "Error: negatives.num_per_system must be a positive integer, got 0"),
    # a refusal of a constructor inside Hydra's instantiate (InstantiationException from a ConfigError)
    (["task=evaluate", "data=sample", "task.mode=rerank", "model=tiny", "model.similarity=foo"],
     "Error: model.similarity='foo': use 'cos', 'dot' or null (the model's own)"),
])
def test_cli_refusals_print_one_line_and_exit_2(tmp_path, args, said):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = run_cli([*args, f"hydra.run.dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"], timeout=300)
    assert (r.returncode, lines(r.stderr)) == (2, [said.replace("{tmp}", str(tmp_path))]), r.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # refused before any store was started


def test_resuming_from_a_missing_checkpoint_is_refused_before_anything_loads(tmp_path):
    r = run_cli([f"ckpt_path={tmp_path / 'nope.ckpt'}", "model=tiny", f"hydra.run.dir={tmp_path / 'out'}",
                 f"paths.cache_dir={tmp_path / 'cache'}"], timeout=300)
    assert r.returncode == 2 and len(lines(r.stderr)) == 1, r.stderr[-3000:]
    assert lines(r.stderr)[0].startswith(f"Error: ckpt_path={tmp_path / 'nope.ckpt'}: no such checkpoint file")
    assert "Run folder" not in r.stdout and not (tmp_path / "cache").exists()  # check_training_config refused it


# ------------------------------------------------------------- every converted raise site refuses as a UserError

def _beir_folder(tmp_path):
    root = tmp_path / "beir"
    root.mkdir()
    (root / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "a passage"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    return root


def _text_table(tmp_path):
    np.save(tmp_path / "passages.ids.npy", np.array([1], np.int64))
    np.save(tmp_path / "passages.offsets.npy", np.array([0], np.int64))  # one offset short
    (tmp_path / "passages.text.bin").write_bytes(b"")
    return TextTable(tmp_path, "passages")


def _old_store(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 0}')
    return Store(tmp_path)


def _taken_store_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    source = SimpleNamespace(store_inputs=lambda: {"teacher_scores": None})
    return prepare(source, {"systems": "all", "num_per_system": 1}, tmp_path / "s")


def _beir_source(tmp_path):
    return BeirSource(name="b", root=str(_beir_folder(tmp_path)), mined_dir=str(tmp_path / "mined"),
                      hard_negatives=str(tmp_path / "mined" / "hn.jsonl.gz"), teacher_scores=None, collection="",
                      queries="", val_run="", val_top_k=10).store_inputs()


def _unscored_pairs(tmp_path):
    train = SimpleNamespace(qids=np.array([1]), positives=lambda i: (np.array([5]), np.array([np.nan])),
                            negatives=lambda i: (np.array([6]), np.array([1.0], np.float32)))
    return check_teacher_coverage(SimpleNamespace(train=train))


def _nan_run(tmp_path):
    (tmp_path / "run.trec").write_text("1 Q0 a 1 nan t\n")
    return read_run(tmp_path / "run.trec")


def _run_folder_without_last(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return check_ckpt_path(tmp_path / "run")


def _mnrl_short_batch(tmp_path):
    return MultipleNegativesRankingLoss(num_hard_negatives=3)(torch.zeros(2, 4), torch.zeros(2, 2, 4))


def _grad_cache(tmp_path):
    rows = {"input_ids": torch.zeros(2, 3)}
    return cached_loss_backward(lambda x: x["input_ids"], rows, rows, None, 0, None)


SITES = [  # (what is refused, the call, the kind, words of the message)
    ("formats.open_binary", lambda t: open_binary(t / "none.tsv"), MissingFileError, "data file not found"),
    ("parquet.iter_parquet", lambda t: next(iter_parquet(t)), MissingFileError, "no parquet files"),
    ("beir._find", lambda t: _find(t, "corpus.jsonl"), MissingFileError, "no corpus.jsonl"),
    ("BeirFolder: data.root", lambda t: BeirFolder(t / "none"), MissingFileError, "data.root=.*no such folder"),
    ("BeirFolder: data.val_fraction", lambda t: BeirFolder(_beir_folder(t), val_fraction=1.5), ConfigError,
     "data.val_fraction=1.5"),
    ("BeirFolder.from_config", lambda t: BeirFolder.from_config({}), ConfigError, "data.root is required"),
    ("BeirFolder: a split file", lambda t: BeirFolder(_beir_folder(t)).qrels("test"), MissingFileError,
     "no such split file"),
    ("download: an entry without url", lambda t: _source("x", {"sha256": "0"}), ConfigError,
     "data.downloads.x needs a url"),
    ("download: no data.root", lambda t: missing_downloads({"downloads": {"a": "http://h/a"}}), ConfigError,
     "data.downloads needs data.root"),
    ("download: two sha256 for one URL", lambda t: ensure_files(
        {"root": str(t), "a": str(t / "a"), "downloads": {"a": {"url": "http://h/x.tar.gz", "sha256": "1"},
                                                            "b": {"url": "http://h/x.tar.gz", "sha256": "2"}}},
        ["a"]), ConfigError, "different sha256 for one URL"),
    ("download: one URL for two plain files", lambda t: fetch("http://h/a.txt", t, ["a", "b"]), ConfigError,
     "share the URL"),
    ("MarcoSource: data.queries", lambda t: MarcoSource(collection="c", queries=[]).store_inputs(), ConfigError,
     "data.queries is required"),
    ("MarcoSource: a missing file", lambda t: MarcoSource(collection="c", queries=[str(t / "q.tsv")]).store_inputs(),
     MissingFileError, "data.queries: .*q.tsv does not exist"),
    ("BeirSource: no mined negatives", _beir_source, MissingFileError, "data.hard_negatives=.*task=mine"),
    ("Store: no store", lambda t: Store(t / "none"), MissingFileError, "no data store"),
    ("Store: no manifest", lambda t: Store(t), MissingFileError, "no manifest.json"),
    ("Store: an old format", _old_store, DataFormatError, "store format 0.*task.force=true"),
    ("TextTable: damaged", _text_table, DataFormatError, "passages files are inconsistent"),
    ("store: ids past 2^32", lambda t: _pair_keys([1 << 32], [0]), DataFormatError, r"\[0, 2\^32\)"),
    ("negatives.systems", lambda t: _negatives_config({"systems": "bm25", "num_per_system": 1}, {}), ConfigError,
     "negatives.systems must be a list"),
    ("negatives.num_per_system", lambda t: _negatives_config({"systems": "all", "num_per_system": 0}, {}),
     ConfigError, "negatives.num_per_system"),
    ("negatives.ce_score_margin", lambda t: _negatives_config(
        {"systems": "all", "num_per_system": 1, "ce_score_margin": 3.0}, {"teacher_scores": None}), ConfigError,
     "negatives.ce_score_margin needs teacher scores"),
    ("prepare: a folder in the way", _taken_store_folder, ExistingFileError, "not a data store.*task.force=true"),
    ("sampling: unscored pairs", _unscored_pairs, ConfigError, "have no teacher score"),
    ("read_run: a NaN score", _nan_run, DataFormatError, r"run\.trec:1: score is NaN"),
    ("evaluation: a measure", lambda t: parse_measure("P@10"), ConfigError, "unknown measure 'P@10'"),
    ("evaluation: empty qrels", lambda t: compute_metrics({}, {}), ConfigError, "non-empty qrels"),
    ("inference: task.precision", lambda t: check_precision("fp8"), ConfigError, "task.precision='fp8'"),
    ("models: model.length_chunks", lambda t: _chunks(0, None), ConfigError, "model.length_chunks=0"),
    ("models: model.similarity", lambda t: BiEncoder("none", similarity="euclid"), ConfigError,
     "model.similarity='euclid'"),
    ("models: task.model_path", lambda t: load_model(None, str(t / "none")), MissingFileError, "task.model_path="),
    ("losses: loss.scale", lambda t: MultipleNegativesRankingLoss(scale=0), ConfigError, "loss.scale"),
    ("losses: loss.temperature", lambda t: DistillKLDivLoss(temperature=0), ConfigError, "loss.temperature=0"),
    ("losses: loss.num_hard_negatives", lambda t: MultipleNegativesRankingLoss(num_hard_negatives=-1), ConfigError,
     "loss.num_hard_negatives=-1"),
    ("losses: more hard negatives than the batch", _mnrl_short_batch, ConfigError, "set num_negatives >= 3"),
    ("grad_cache: mini_batch_size", _grad_cache, ConfigError, "mini_batch_size=0"),
    ("retrieval: retrieve with a cross-encoder", lambda t: retrieve(SimpleNamespace(kind="cross"), "", {}, 10, t),
     ConfigError, "task.mode=retrieve needs a bi-encoder"),
    ("config: ckpt_path", lambda t: check_ckpt_path(t / "none.ckpt"), MissingFileError, "ckpt_path=.*none.ckpt"),
    ("config: ckpt_path folder", _run_folder_without_last, MissingFileError, "no checkpoints/last.ckpt"),
    ("checkpointing: ckpt_path folder", lambda t: resolve_ckpt_path(str(t)), MissingFileError,
     "no checkpoints/last.ckpt"),
]


@pytest.mark.parametrize("site, call, kind, words", SITES, ids=[s[0] for s in SITES])
def test_each_user_facing_raise_site_is_a_user_error(tmp_path, site, call, kind, words):
    with pytest.raises(kind, match=words) as e:
        call(tmp_path)
    assert isinstance(e.value, UserError)
    # the new kinds are still what callers caught before
    assert isinstance(e.value, FileNotFoundError) == (kind is MissingFileError)
    assert isinstance(e.value, FileExistsError) == (kind is ExistingFileError)


def test_the_file_kinds_are_user_errors_and_os_errors():
    for kind, base in ((MissingFileError, FileNotFoundError), (ExistingFileError, FileExistsError)):
        error = kind("data.root=/x: no such folder")
        assert isinstance(error, UserError) and isinstance(error, ValueError) and isinstance(error, base)
        assert str(error) == "data.root=/x: no such folder"  # one argument: no "[Errno ...]" prefix
