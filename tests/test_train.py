"""End to end on the committed real sample: train a tiny model, then check every artefact a user relies on."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, compose, run_cli

sys.path.insert(0, str(ROOT.parent / "shared" / "tools"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from marco_lightning.tasks.train import main

    out = tmp_path_factory.mktemp("run")
    cfg = compose(FAST + ["logger=wandb"], out)
    return cfg, out, main(cfg)


def test_run_folder_has_every_artefact(trained):
    cfg, out, metrics = trained
    saved = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(saved[when]) >= {"ndcg@10", "mrr@10", "recall@100"}
        assert all(0.0 <= v <= 1.0 for v in saved[when].values())
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "metrics.csv").read_text().count("val/ndcg@10") >= 1


def test_time_split_says_what_validation_costs(capsys):
    from marco_lightning.tasks.train import print_time_split, time_split

    # 100 s of fit: 2 validations of 10 s and a 5 s refresh leave 75 s of training; 20 / 75 = 0.267
    seconds = time_split(100.0, [10.0, 10.0], [5.0], 2)
    assert (seconds["training"], seconds["validation_share"]) == (75.0, 0.267)
    print_time_split(seconds)
    assert "Validation cost 27% of the training time: data.val_top_k" in capsys.readouterr().out
    print_time_split(time_split(100.0, [5.0], [], 1))  # 5 / 95: within a tenth, nothing to say
    assert "Validation cost" not in capsys.readouterr().out


def test_after_metrics_match_ir_measures_on_the_written_run(trained):
    import ir_measures
    from ir_measures import RR, R, nDCG

    cfg, out, metrics = trained
    qrels = list(ir_measures.read_trec_qrels(cfg.data.val_qrels))
    run = list(ir_measures.read_trec_run(str(out / "val_run.trec")))
    ref = ir_measures.calc_aggregate([nDCG @ 10, RR(rel=2) @ 10, R(rel=2) @ 100], qrels, run)
    assert metrics["after"]["ndcg@10"] == pytest.approx(ref[nDCG @ 10], abs=1e-9)
    assert metrics["after"]["mrr@10"] == pytest.approx(ref[RR(rel=2) @ 10], abs=1e-9)
    assert metrics["after"]["recall@100"] == pytest.approx(ref[R(rel=2) @ 100], abs=1e-9)


def test_logged_validation_equals_ir_measures_on_the_written_run(trained):
    """One evaluation path: the last val/* the run logged are ir-measures' numbers on val_run.trec."""
    import csv

    import ir_measures
    from ir_measures import RR, R, nDCG

    cfg, out, _ = trained
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("val/ndcg@10")]
    qrels = list(ir_measures.read_trec_qrels(cfg.data.val_qrels))
    ref = ir_measures.calc_aggregate([nDCG @ 10, RR(rel=2) @ 10, R(rel=2) @ 100], qrels,
                                     ir_measures.read_trec_run(str(out / "val_run.trec")))
    assert float(rows[-1]["val/ndcg@10"]) == pytest.approx(ref[nDCG @ 10], abs=1e-6)
    assert float(rows[-1]["val/mrr@10"]) == pytest.approx(ref[RR(rel=2) @ 10], abs=1e-6)
    assert float(rows[-1]["val/recall@100"]) == pytest.approx(ref[R(rel=2) @ 100], abs=1e-6)


def test_final_model_loads_in_sentence_transformers_with_the_trained_weights(trained):
    from hydra.utils import instantiate
    from sentence_transformers import SentenceTransformer

    from marco_lightning.models import load_checkpoint_weights

    cfg, out, metrics = trained
    best = out / json.loads((out / "metrics.json").read_text())["best_checkpoint"]
    model = instantiate(cfg.model)
    load_checkpoint_weights(model, best)
    model.eval()
    texts = ["what is the daily life of thai people", "a passage about rice farming in the north of Thailand " * 5]
    with torch.no_grad():
        ours = model.output_embedding(model.collator().pairs([(0, 0, t, t) for t in texts])["doc"]).numpy()
    theirs = SentenceTransformer(str(out / "final_model"), device="cpu").encode(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


@pytest.mark.skipif(not (ROOT.parent / "shared" / "tools" / "read_wandb.py").exists(),
                    reason="needs the workplace's W&B reader (../shared/tools/read_wandb.py)")
def test_wandb_ran_offline_and_recorded_the_validation_curve(trained):
    from read_wandb import load

    cfg, out, metrics = trained
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, _, config, _ = load(str(files[0]))
    assert any("val/ndcg@10" in row for row in history)
    # the resolved config travels with the run, and the batch semantics are logged next to it
    assert config["loss"]["_target_"] == "marco_lightning.losses.MarginMSELoss"
    assert config["model"]["random_init"]["hidden_size"] == 32
    assert config["global_batch_size"] == 8 and config["negatives_per_query"] == 1


@pytest.mark.parametrize("args,expect", [
    (["model=nope"], ["Available options", "minilm", "tiny"]),
    (["model=tiny_ce", "loss=margin_mse_cos"], ["loss=margin_mse_cos", "model=tiny_ce", "cross-encoder"]),
    (["model=tiny", "data.hard_negatives=/nowhere/hn.jsonl.gz", "paths.cache_dir=/tmp/marco-empty-cache"],
     ["data.hard_negatives", "/nowhere/hn.jsonl.gz"]),
])
def test_cli_errors_name_the_problem_and_fail_before_data_loads(args, expect, tmp_path):
    result = run_cli([*args, f"hydra.run.dir={tmp_path}"], timeout=120)
    assert result.returncode != 0
    for text in expect:
        assert text in result.stderr + result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()



def test_a_non_finite_loss_stops_training_and_exports_nothing(tmp_path):
    """optimizer.lr=1e30: the step that goes non-finite stops the run with its step named; no final_model/, and
    no checkpoint holds non-finite weights; the W&B run is closed as failed."""
    from marco_lightning.module import NonFiniteLossError
    from marco_lightning.tasks.train import main

    cfg = compose(FAST + ["logger=wandb", "optimizer.lr=1e30", "trainer.gradient_clip_val=null",
                          "callbacks.resume_checkpoint.every_n_train_steps=1", "task.validate_before=false"], tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        main(cfg)
    assert not (tmp_path / "final_model").exists() and not (tmp_path / "metrics.json").exists()
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt
    import wandb

    assert wandb.run is None  # finished, not left open for the next run in this process


def test_final_model_card_says_how_it_was_made(trained):
    """The card is this model's, not the base model's: base model, loss and similarity, data, negatives, steps,
    seed, commit, and the before/after numbers metrics.json holds, with their protocol."""
    cfg, out, metrics = trained
    card = (out / "final_model" / "README.md").read_text(encoding="utf-8")
    assert "# all-MiniLM-L6-v2\n" not in card  # not the base model's own card
    for fact in ("marco-lightning", "MarginMSELoss", "similarity `cos`", "Data: `sample`", "systems ['bm25']",
                 f"teacher scores `{Path(cfg.data.teacher_scores).name}`",
                 f"seed {cfg.seed}", "commit: `", "run.dev.bm25.trec", "grade >= 2",
                 f"{metrics['before']['ndcg@10']:.4f}", f"{metrics['after']['ndcg@10']:.4f}"):
        assert fact in card, fact


@pytest.mark.parametrize("case", ["own_similarity", "trained_on_dot", "keep_start_off"])
def test_a_model_training_made_worse_is_not_exported(tmp_path, training_makes_it_worse, case):
    """task.keep_start (on by default): val says the trained model is worse than the start (a scripted nDCG@10 of 0.9
    before training, 0.1 after), so final_model/ is the starting folder's weights, as its users have it (cosine even
    when trained on dot), with a card that says so; the trained model is exported to trained_model/. Off: final_model/
    is the trained one."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from test_prompts import st_folder

    from marco_lightning.tasks import train

    start = st_folder(tmp_path / "start")
    extra = {"own_similarity": [], "trained_on_dot": ["model.similarity=dot"], "keep_start_off": ["task.keep_start=false"]}
    out = tmp_path / "run"
    cfg = compose([*(o for o in FAST if not o.startswith("model=")), "model=minilm", f"model.backbone={start}",
                   "logger=none", *extra[case]], out)
    metrics = train.main(cfg)
    assert metrics["improved"] is False and json.loads((out / "metrics.json").read_text()) == metrics
    best = torch.load(out / metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    trained = {name[len("model.st.0.model."):]: t for name, t in best.items() if name.startswith("model.st.0.model.")}
    final = load_file(out / "final_model" / "model.safetensors")
    expected = trained if case == "keep_start_off" else load_file(start / "model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)
    card = (out / "final_model" / "README.md").read_text(encoding="utf-8")
    if case == "keep_start_off":
        assert "final_model" not in metrics and not (out / "trained_model").exists()
        assert "This is the starting model" not in card
        return
    assert metrics["final_model"] == "start"
    assert "This is the starting model, unchanged" in card and "0.9000 before, 0.1000 after" in card
    assert "unchanged (marco-lightning's training did not improve it)" in card
    theirs, ours = SentenceTransformer(str(start), device="cpu"), SentenceTransformer(str(out / "final_model"), device="cpu")
    assert ours.similarity_fn_name == "cosine"
    texts = ["what is the daily life of thai people", "rice farming in the north of Thailand"]
    np.testing.assert_allclose(ours.encode(texts), theirs.encode(texts), atol=1e-6)
    exported = load_file(out / "trained_model" / "model.safetensors")
    for name, tensor in exported.items():  # the trained model is kept: the best checkpoint's weights
        torch.testing.assert_close(tensor, trained[name], atol=0, rtol=0)
    assert "This is the starting model" not in (out / "trained_model" / "README.md").read_text(encoding="utf-8")


def test_a_val_tie_keeps_the_start(tmp_path, scripted_val):
    """A trained model that val cannot tell from the start (a scripted 0.5 before and after: CACM's 3 val queries did
    not move) is no evidence training helped: task.keep_start exports the start."""
    from marco_lightning.tasks import train

    scripted_val(lambda run: 0.5, lambda run: 0.5)
    metrics = train.main(compose([*FAST, "logger=none"], tmp_path / "run"))
    assert metrics["before"]["ndcg@10"] == metrics["after"]["ndcg@10"] == 0.5
    assert metrics["improved"] is False and metrics["final_model"] == "start"
    assert (tmp_path / "run" / "trained_model").is_dir()
    card = (tmp_path / "run" / "final_model" / "README.md").read_text(encoding="utf-8")
    assert "did not improve its validation ndcg@10 (0.5000 before, 0.5000 after)" in card


def test_candidates_train_one_after_the_other_and_the_best_by_val_is_final_model(tmp_path, scripted_val):
    """task.candidates: each variant trains in candidates/<name>/ with its overrides; final_model/ is a copy of the
    one whose val is best (scripted: 0.6 for 'slow', 0.8 for 'fast', both above the start's 0.5), and metrics.json
    is its metrics plus the candidates' table."""
    import filecmp

    from omegaconf import OmegaConf

    from marco_lightning.tasks import train

    scripted_val(lambda run: 0.5, lambda run: 0.8 if "candidates/fast" in run else 0.6)
    out = tmp_path / "run"
    cfg = compose([*FAST, "logger=none", "task.candidates={slow:[],fast:['optimizer.lr=1e-3','+seen=1']}"], out)
    metrics = train.main(cfg)
    assert metrics["chosen"] == "fast" and json.loads((out / "metrics.json").read_text()) == metrics
    table = metrics["candidates"]
    assert [table[n]["val"] for n in ("slow", "fast")] == [0.6, 0.8]
    assert table["fast"]["overrides"] == ["optimizer.lr=1e-3", "+seen=1"] and table["slow"]["overrides"] == []
    lrs = {n: OmegaConf.load(out / "candidates" / n / "config.yaml").optimizer.lr for n in table}
    assert lrs == {"slow": cfg.optimizer.lr, "fast": 1e-3}
    assert OmegaConf.load(out / "candidates" / "fast" / "config.yaml").seen == 1
    assert metrics["after"] == json.loads((out / "candidates" / "fast" / "metrics.json").read_text())["after"]
    # every candidate's files are in its own folder; the best checkpoint is named from the run folder
    assert (out / metrics["best_checkpoint"]).is_file() and metrics["best_checkpoint"].startswith("candidates/fast/")
    assert not (out / "checkpoints").exists() and (out / "candidates" / "slow" / "checkpoints" / "last.ckpt").is_file()
    from marco_lightning.tasks.report import find_runs  # the candidates stand for the run: no row twice
    assert find_runs([out]) == [out / "candidates" / "fast", out / "candidates" / "slow"]
    files = [p.name for p in (out / "candidates" / "fast" / "final_model").iterdir() if p.is_file()]
    same, differ, _ = filecmp.cmpfiles(out / "final_model", out / "candidates" / "fast" / "final_model", files,
                                       shallow=False)
    assert differ == ["README.md"] and "model.safetensors" in same  # the card adds the choice
    assert "Chosen by validation" in (out / "final_model" / "README.md").read_text(encoding="utf-8")


def test_candidates_rank_by_what_they_trained_where_both_kept_the_start(tmp_path, scripted_val):
    """Both candidates fall below the start (scripted val: 0.9 before training; 'a' 0.3, 'b' 0.5 after): each run
    exports the start (task.keep_start), and the candidates still rank by their trained models, not both at the
    start's 0.9 (a tie the first listed would win)."""
    from marco_lightning.tasks import train

    scripted_val(lambda run: 0.9, lambda run: 0.5 if "candidates/b" in run else 0.3)
    metrics = train.main(compose([*FAST, "logger=none", "task.candidates={a:[],b:['optimizer.lr=1e-4']}"],
                                 tmp_path / "run"))
    table = metrics["candidates"]
    assert [table[n]["val"] for n in "ab"] == [0.3, 0.5] and metrics["chosen"] == "b"
    assert table["a"]["final_model"] == table["b"]["final_model"] == metrics["final_model"] == "start"


def test_candidates_that_change_the_start_compare_what_they_exported(tmp_path, scripted_val):
    """Overrides that change the start's val (scripted: 'a' starts at 0.9 and trains to 0.85, so it keeps its start;
    'b' starts at 0.7 and trains to 0.88): the models exported compare, 0.9 against 0.88, and 'a' wins."""
    from marco_lightning.tasks import train

    scripted_val(lambda run: 0.7 if "candidates/b" in run else 0.9, lambda run: 0.88 if "candidates/b" in run else 0.85)
    metrics = train.main(compose([*FAST, "logger=none", "task.candidates={a:[],b:['optimizer.lr=1e-4']}"],
                                 tmp_path / "run"))
    table = metrics["candidates"]
    assert [table[n]["val"] for n in "ab"] == [0.9, 0.88] and metrics["chosen"] == "a"
    assert table["a"]["final_model"] == "start" and table["b"]["final_model"] == "trained"


@pytest.mark.parametrize("candidates, expect", [
    ("{a:[],b:['loss=mnrl']}", "config group choice"),
    ("{a:[],b:['optimizer.learning_rate=1']}", "names no setting"),
    ("{a:[],b:['task.refit=true']}", "where they run"),
    ("{a:[],b:['negatives.refresh.every_n_epochs=0']}", "every_n_epochs=0"),
    ("{a:[],b:['+loss=mnrl']}", "already set"),
    ("{a:[],b:['monitor=val/mrr@10']}", "compared on"),
    ("{a:[],b:['data.val_top_k=5']}", "compared on"),
])
def test_candidates_fail_before_anything_trains(candidates, expect, tmp_path):
    from marco_lightning.errors import ConfigError
    from marco_lightning.tasks import train

    with pytest.raises(ConfigError, match=expect):
        train.main(compose([*FAST, "logger=none", f"task.candidates={candidates}"], tmp_path))
    assert not (tmp_path / "candidates").exists()


def test_candidates_may_switch_a_section_off_and_set_a_list(tmp_path):
    from marco_lightning.tasks.choose import candidate_configs

    cfg = compose([*FAST, "logger=none", "task.candidates={a:[],b:['callbacks.lr_monitor=null','negatives.systems=[x]']}"],
                  tmp_path)
    b = candidate_configs(cfg)["b"]
    assert b.callbacks.lr_monitor is None and list(b.negatives.systems) == ["x"] and cfg.callbacks.lr_monitor is not None


@pytest.mark.parametrize("kill", ["mid_epoch", pytest.param("at_epoch_end", marks=pytest.mark.slow)])
def test_resume_with_dataloader_workers_ends_like_an_unbroken_run(kill, tmp_path):
    """With num_workers > 0 (the default) Lightning makes the training iterator before it restores a resumed run's
    progress, and the workers fetch its first batches at once: the resumed epoch must still be the one the killed
    run was in, from where it stopped (it replayed epoch 0's order before session 18). Dropout on: the same masks."""
    from conftest import killed_and_resumed

    args = [*FAST, "logger=none", "data.val_top_k=10", "trainer.max_epochs=3", "batch_size=4", "num_workers=2",
            "task.validate_before=false"]
    if kill == "mid_epoch":  # a last.ckpt every step; killed in epoch 1 (epochs of 14 steps)
        args.append("callbacks.resume_checkpoint.every_n_train_steps=1")
    unbroken, killed, resumed = killed_and_resumed(args, tmp_path, kill_after_step=17 if kill == "mid_epoch" else 14)
    load = lambda run: torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    killed_at = load(killed)["global_step"]
    assert (14 < killed_at < 28) if kill == "mid_epoch" else killed_at == 14
    a, b = load(unbroken), load(resumed)
    assert a["global_step"] == b["global_step"] == 3 * 14
    for name in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][name], a["state_dict"][name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_resume_from_an_epochs_last_batch_trains_the_next_epoch_whole(tmp_path):
    """A last.ckpt written after an epoch's last batch, before its validation (callbacks.resume_checkpoint), restores
    that epoch as done: the resumed run trains the next epochs whole, as the unbroken run did (the sampler once
    skipped the next epoch's first N examples, N = the finished epoch's, so the whole epoch)."""
    keep_every_step = ["callbacks.resume_checkpoint.every_n_train_steps=1", "callbacks.resume_checkpoint.save_top_k=-1",
                       "+callbacks.resume_checkpoint.filename='step{step}'",
                       "+callbacks.resume_checkpoint.auto_insert_metric_name=false"]
    args = [*FAST, "logger=none", "data.val_top_k=10", "trainer.max_epochs=3", "batch_size=4", "num_workers=2",
            "task.validate_before=false", *keep_every_step]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    assert run_cli([*args, f"hydra.run.dir={unbroken}"]).returncode == 0
    at_epoch_end = unbroken / "checkpoints" / "step14.ckpt"  # epochs of 14 steps
    assert torch.load(at_epoch_end, map_location="cpu", weights_only=False)["global_step"] == 14
    result = run_cli([*args, f"ckpt_path={at_epoch_end}", f"hydra.run.dir={resumed}"])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(run / "checkpoints" / "step42.ckpt", map_location="cpu", weights_only=False)
            for run in (unbroken, resumed))
    for name in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][name], a["state_dict"][name], atol=1e-6, rtol=0)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the run's processes through /proc")
def test_a_killed_run_leaves_no_dataloader_workers_behind(tmp_path):
    """SIGKILL (or the OOM killer) ends the training process: its DataLoader workers, children of a forkserver
    (`datamodule.worker_start`), must end with it instead of living on at 0.2-0.3 GB each."""
    import os
    import signal
    import subprocess
    import time
    import uuid

    tag = uuid.uuid4().hex

    def tagged():  # every process started by the run: they inherit its environment
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"MARCO_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
        return pids

    args = [*FAST, "logger=none", "trainer.max_epochs=50", "batch_size=4", "num_workers=2",
            "task.validate_before=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MARCO_TEST_TAG": tag})
    deadline = time.time() + 300
    last = tmp_path / "checkpoints" / "last.ckpt"  # after a validation: its workers started too
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.5)
    time.sleep(3)  # into the next epoch
    assert proc.poll() is None and len(tagged()) >= 5, "the run should be training with its workers by now"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while tagged() and time.time() < deadline:
        time.sleep(0.5)
    assert tagged() == []
