"""Each published recipe (experiment=...) trains on the real sample with a tiny model; cross-encoders export."""
import json

import numpy as np
import pytest
import torch
from conftest import FAST, compose

TINY = {"bi_margin_mse": "tiny", "bi_margin_mse_dot": "tiny", "bi_mnrl": "tiny", "ce_distill": "tiny_ce"}
SHORT = [*FAST, "logger=none", "data=sample", "trainer=cpu", "data.val_top_k=10", "trainer.max_epochs=1",
         "model.backbone=sentence-transformers/all-MiniLM-L6-v2", "model.max_doc_length=64"]


def train(overrides, tmp_path):
    from marco_lightning.tasks.train import main

    cfg = compose([*SHORT, *overrides], tmp_path)
    return cfg, main(cfg)


@pytest.mark.parametrize("experiment", sorted(TINY))
def test_recipe_trains_on_the_sample_with_its_pinned_hyperparameters(experiment, tmp_path):
    cfg, metrics = train([f"experiment={experiment}", f"model={TINY[experiment]}"], tmp_path)
    # the recipe's own values survive the test overrides (sentence-transformers' examples/training/ms_marco:
    # train_bi-encoder_margin-mse.py, train_bi-encoder_mnrl.py, train_cross-encoder_kd.py)
    expected = {"bi_margin_mse": (2e-5, "MarginMSELoss", None, "cos"),
                "bi_margin_mse_dot": (2e-5, "MarginMSELoss", None, "dot"),
                "bi_mnrl": (2e-5, "MultipleNegativesRankingLoss", 3.0, "cos"),
                "ce_distill": (7e-6, "MSELoss", None, None)}[experiment]
    assert (cfg.optimizer.lr, cfg.loss._target_.rsplit(".", 1)[1], cfg.negatives.ce_score_margin,
            cfg.model.get("similarity")) == expected  # the similarity is the model's
    assert cfg.trainer.precision == "bf16-mixed"  # the recipes' AMP; bf16 autocast runs on CPU too
    assert set(metrics["after"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    assert (tmp_path / "final_model").is_dir()


def test_cross_encoder_export_predicts_the_module_scores(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from marco_lightning.models import CrossEncoder, load_checkpoint_weights

    cfg, _ = train(["model=tiny_ce", "loss=ce_mse"], tmp_path)
    best = tmp_path / json.loads((tmp_path / "metrics.json").read_text())["best_checkpoint"]
    model = CrossEncoder(**{k: v for k, v in cfg.model.items() if k != "_target_"})
    load_checkpoint_weights(model, best)
    model.eval()
    pairs = [("what is durable medical equipment", "Durable medical equipment is equipment that ..."),
             ("cost of interior concrete flooring", "Polished concrete runs from $2 to $12 per square foot.")]
    with torch.no_grad():
        ours = model.score_pairs(model.collator().pairs([(0, 0, q, d) for q, d in pairs])).numpy()
    theirs = STCrossEncoder(str(tmp_path / "final_model"), device="cpu").predict(pairs)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_grad_cache_training_matches_plain_training(tmp_path):
    """mini_batch_size (GradCache) must give the same weights as the plain full-batch step."""
    common = ["loss=mnrl", "model.similarity=cos", "trainer.max_steps=2", "task.validate_before=false",
              "+model.random_init.hidden_dropout_prob=0", "+model.random_init.attention_probs_dropout_prob=0",
              "callbacks.resume_checkpoint.every_n_train_steps=1"]
    states = []
    for extra in ([], ["mini_batch_size=3"]):
        out = tmp_path / str(len(states))
        train([*common, *extra, "trainer.gradient_clip_val=1.0"], out)
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        states.append(ckpt["state_dict"])
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("overrides,message", [
    (["model=tiny_ce", "loss=mnrl"], "loss=mnrl"),                                     # bi-encoders only
    (["model=tiny_ce", "loss=margin_mse"], "model=tiny_ce"),                            # a bi-encoder recipe
    (["model=tiny", "loss=margin_mse", "data.teacher_scores=null"], "data.teacher_scores"),
    (["model=tiny", "loss=mnrl", "model.similarity=dot", "+loss.similarity=cos"], "model.similarity=cos"),  # model's
    (["model=tiny", "loss=margin_mse", "+loss.temperature=2"], "loss.temperature"),     # an option no loss reads
    (["model=tiny", "loss=mnrl", "negatives.require_positive=false"], "require_positive"),
    (["model=tiny_ce", "loss=ce_mse", "mini_batch_size=4"], "mini_batch_size"),
])
def test_incompatible_choices_fail_before_data_loads(overrides, message, tmp_path):
    from marco_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train([*overrides, f"paths.cache_dir={tmp_path}/never"], tmp_path)
    assert not (tmp_path / "never").exists()  # no store was prepared


@pytest.mark.slow
@pytest.mark.parametrize("experiment,model", [("bi_margin_mse", "minilm"), ("bi_margin_mse_dot", "minilm"),
                                              ("bi_mnrl", "minilm"),
                                              ("ce_distill", "minilm_ce")])
def test_recipe_trains_with_the_real_minilm(experiment, model, tmp_path):
    _, metrics = train([f"experiment={experiment}", f"model={model}", "trainer.max_steps=2", "data.val_top_k=5",
                        "trainer.precision=32-true"], tmp_path)
    assert set(metrics["after"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    assert (tmp_path / "final_model" / "config.json").exists()
