"""Scale-out behaviours, each as a user would run them (subprocesses; slow): DDP on 2 CPU processes, resume."""
import json

import pytest
import torch
from conftest import FAST, killed_and_resumed, run_cli

SMALL = [*FAST, "logger=none", "data.val_top_k=10"]


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_train_and_report_the_global_batch(tmp_path):
    result = run_cli([*SMALL, "trainer=ddp_cpu", "trainer.devices=2", "loss=mnrl", "model.similarity=cos", "num_negatives=2",
                      f"hydra.run.dir={tmp_path}"], timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    # 8 queries x 2 processes; MNRL gathers across both: 16 queries x 3 candidates - own positive
    assert "= 16 per step; each query is scored against 47 negatives" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["after"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    step, _ = final_state(tmp_path)
    assert step == (54 // 2 + 7) // 8  # 54 training queries sharded over 2 ranks, batches of 8, one epoch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_a_kill_mid_epoch_ends_like_an_unbroken_run(tmp_path):
    args = [*SMALL, "trainer.max_epochs=3", "batch_size=4", "callbacks.resume_checkpoint.every_n_train_steps=1",
            "trainer.check_val_every_n_epoch=3"]
    # kill it mid-epoch 1 (epochs of 14 steps)
    unbroken, killed, resumed = killed_and_resumed(args, tmp_path, kill_after_step=17)
    killed_at, _ = final_state(killed)
    assert 14 < killed_at < 28, "the kill should land mid-epoch 1"
    step_a, weights_a = final_state(unbroken)
    step_b, weights_b = final_state(resumed)
    assert step_a == step_b == 3 * 14
    # Same data order and the same dropout masks (tiny has dropout 0.1): the very same weights.
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-6, rtol=0)
    after_a = json.loads((unbroken / "metrics.json").read_text())["after"]
    after_b = json.loads((resumed / "metrics.json").read_text())["after"]
    assert after_a == pytest.approx(after_b, abs=1e-6)


def test_atomic_checkpoint_keeps_the_old_file_when_writing_fails(tmp_path):
    from marco_lightning.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"global_step": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no half-written leftovers


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grad_cache_under_ddp_gives_the_plain_ddp_weights(tmp_path):
    """GradCache's mini-batch backwards run in DDP's no_sync, all-reduced once per step: same weights as the plain
    DDP step (no dropout, so both draw nothing at random)."""
    states = []
    for extra in ([], ["mini_batch_size=3"]):
        out = tmp_path / str(len(states))
        result = run_cli([*SMALL, "trainer=ddp_cpu", "trainer.devices=2", "loss=mnrl", "trainer.max_steps=2",
                          "task.validate_before=false", "+model.random_init.hidden_dropout_prob=0",
                          "+model.random_init.attention_probs_dropout_prob=0", *extra, f"hydra.run.dir={out}"],
                         timeout=420)
        assert result.returncode == 0, result.stderr[-3000:]
        states.append(final_state(out)[1])
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_candidates_under_ddp_train_each_on_both_ranks_and_export_the_chosen(tmp_path):
    """task.candidates on 2 gloo processes: each candidate is one more fit in the same process group (the ranks
    split its batches), rank 0 alone writes the run's final_model/ and metrics.json."""
    from sentence_transformers import SentenceTransformer

    result = run_cli([*SMALL, "trainer=ddp_cpu", "trainer.devices=2", "loss=mnrl", "trainer.max_steps=2",
                      "task.candidates={a:[],b:['optimizer.lr=1e-4']}", "task.keep_start=false",
                      f"hydra.run.dir={tmp_path}"], timeout=840)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["candidates"]) == {"a", "b"} and metrics["chosen"] in ("a", "b")
    for name in ("a", "b"):
        step, _ = final_state(tmp_path / "candidates" / name)
        assert step == 2  # two DDP steps each: the second fit ran on both ranks too
    chosen = metrics["candidates"][metrics["chosen"]]["val"]
    assert chosen == max(c["val"] for c in metrics["candidates"].values())
    assert SentenceTransformer(str(tmp_path / "final_model"), device="cpu").encode(["a query"]).shape == (1, 32)
