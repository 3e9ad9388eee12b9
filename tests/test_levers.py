"""The own-collection recipe's levers composed in one training run: GradCache (mini_batch_size) with one row per
(query, positive) (train_rows=positive) and MNRL's false-negative guard gives the plain step's weights."""
import pytest
import torch
from conftest import FAST, compose

from marco_lightning import losses as L

SHORT = [*FAST, "logger=none", "data=sample", "trainer=cpu", "data.val_top_k=10", "trainer.max_epochs=1",
         "model.max_doc_length=64", "task.validate_before=false"]


def test_grad_cache_composes_with_positive_rows_and_the_guard(tmp_path, monkeypatch):
    from marco_lightning.tasks.train import main

    seen, judged = [], []
    forward = L.MultipleNegativesRankingLoss.forward

    def spy(self, query_emb, doc_emb, teacher=None, query_ids=None, **ids):
        seen.append(query_ids)
        judged.append(ids)
        return forward(self, query_emb, doc_emb, teacher, query_ids=query_ids, **ids)

    monkeypatch.setattr(L.MultipleNegativesRankingLoss, "forward", spy)
    common = ["loss=mnrl", "train_rows=positive", "loss.guard_margin=0.05", "batch_size=16", "trainer.max_steps=2",
              "+model.random_init.hidden_dropout_prob=0", "+model.random_init.attention_probs_dropout_prob=0",
              "callbacks.resume_checkpoint.every_n_train_steps=1", "trainer.gradient_clip_val=1.0"]
    states = []
    for extra in ([], ["mini_batch_size=5"]):
        out = tmp_path / str(len(states))
        main(compose([*SHORT, *common, *extra], out))
        states.append(torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"])
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-4, atol=1e-5, msg=name)
    # the batches carried query ids, with rows of one query side by side (what the masking is for)
    assert len(seen) == 4 and all(ids is not None and len(ids) == 16 for ids in seen)
    assert any(len(set(ids.tolist())) < len(ids) for ids in seen)
    # ... and every row's documents and judged positives (loss.leave_out_judged), each row's positive among them
    for ids in judged:
        assert ids["doc_ids"].shape == (16, 2) and ids["judged_ids"].shape[0] == 16
        assert (ids["judged_ids"] == ids["doc_ids"][:, :1]).any(1).all()


@pytest.mark.parametrize("overrides,message", [(["train_rows=pairs"], "train_rows=pairs")])
def test_lever_settings_are_checked_before_data_loads(overrides, message, tmp_path):
    from marco_lightning.config import ConfigError
    from marco_lightning.tasks.train import main

    with pytest.raises(ConfigError, match=message):
        main(compose([*SHORT, "loss=mnrl", *overrides, f"paths.cache_dir={tmp_path}/never"], tmp_path))
    assert not (tmp_path / "never").exists()
