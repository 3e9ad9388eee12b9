"""RetrieverModule's training step: dropout as in the recipes, and fused AdamW clipped exactly like the default."""
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from marco_lightning.losses import MarginMSELoss
from marco_lightning.module import RetrieverModule

QRELS = {"1": {"2": 1}}  # validation is not run here, but the module wants qrels


def tiny_model(tmp_path, dropout=0.1):
    torch.manual_seed(0)
    overrides = [f"+model.random_init.hidden_dropout_prob={dropout}",
                 f"+model.random_init.attention_probs_dropout_prob={dropout}"]
    return instantiate(compose(["model=tiny", *overrides], tmp_path).model)


def batches(model, n=3):
    texts = ["rice farming in the north of thailand", "the daily life of thai people", "a recipe for pad thai",
             "the history of the mekong river and its delta", "what is the capital of thailand"]
    return [model.collator().train([(texts[(i + j) % 5], [texts[(i + j + 1) % 5], texts[(i + j + 2) % 5]],
                                     [5.0 + j, -1.0 * j]) for j in range(4)]) for i in range(n)]


def fit(model, data, callbacks=(), module_kwargs=None, **trainer_kwargs):
    optimizer = trainer_kwargs.pop("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    module = RetrieverModule(model, MarginMSELoss(), optimizer, warmup_steps=0, val_qrels=QRELS, **(module_kwargs or {}))
    pl.Trainer(max_steps=len(data), accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
               **trainer_kwargs).fit(module, DataLoader(data, batch_size=None))
    return module


def test_training_runs_with_dropout_like_the_recipes(tmp_path):
    """from_pretrained hands out the backbone in eval mode; training must still use its dropout (the recipes do)."""
    model = tiny_model(tmp_path).eval()  # as from_pretrained returns it
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, module, *_):
            modes.append({m.training for m in module.model.modules()})

    fit(model, batches(model, 2), callbacks=[Spy()])
    assert modes == [{True}, {True}]


def fp16_with_grad_scaler():
    """16-mixed as on a GPU, on CPU: Trainer(precision="16-mixed") would turn into bf16 there, without a scaler."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_fused_adamw_is_clipped_like_the_default_adamw(tmp_path, precision):
    """Lightning refuses to clip a fused optimizer under mixed precision; the module clips it itself, exactly."""
    weights = {}
    for fused in (False, True):
        model = tiny_model(tmp_path, dropout=0.0)
        mode = fp16_with_grad_scaler() if precision == "16-mixed" else {"precision": precision}
        fit(model, batches(model), **mode, gradient_clip_val=0.05,  # small: clipping acts every step
            optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=fused))
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_model(tmp_path, dropout=0.0).parameters()])
    assert (weights[False] - start).abs().max() > 1e-4  # it trained
    # Fused and loop AdamW round differently, and Adam's m / sqrt(v) lifts that to ~1e-5 on a few weights whose
    # gradients are near zero: compare the whole update instead. Measured: the two differ by <= 6e-5 of it (fp16),
    # while the same run without clipping differs by 0.11 of it.
    update, gap = (weights[False] - start).norm(), (weights[True] - weights[False]).norm()
    assert gap < 1e-3 * update


@pytest.mark.parametrize("fused", [False, True])
def test_grad_cache_under_fp16_clips_unscaled_gradients(tmp_path, fused):
    """GradCache (manual optimisation) under 16-mixed: clipping must see true gradients, as automatic training does."""
    weights = {}
    for grad_cache in (False, True):
        model = tiny_model(tmp_path, dropout=0.0)
        clip = {"module_kwargs": {"mini_batch_size": 2, "gradient_clip_val": 0.05}} if grad_cache else \
            {"gradient_clip_val": 0.05}
        # SGD: a weight moves by lr x its clipped gradient (Adam would blow fp16 noise in near-zero gradients up)
        fit(model, batches(model), **fp16_with_grad_scaler(), **clip,
            optimizer=partial(torch.optim.SGD, lr=0.1, fused=fused))
        weights[grad_cache] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_model(tmp_path, dropout=0.0).parameters()])
    # lr 0.1 decays linearly over the 3 steps (0.1 + 0.067 + 0.033): with every gradient clipped to norm 0.05,
    # the weights move by at most 0.2 * 0.05
    assert 1e-3 < (weights[False] - start).norm() <= 0.2 * 0.05 * 1.001
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=0)


def test_the_sanity_check_keeps_no_validation_run(tmp_path):
    """Lightning's 2-batch sanity check must not stand in for a validation: metrics.json would report it."""
    from types import SimpleNamespace

    module = RetrieverModule(tiny_model(tmp_path), MarginMSELoss(), partial(torch.optim.AdamW), warmup_steps=0,
                             val_qrels=QRELS)
    module._trainer = SimpleNamespace(sanity_checking=True)
    module.val_rows = [torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)]
    module.on_validation_epoch_end()
    assert module.last_val_run == {} and module.last_val_step == -1 and module.val_rows == []
