"""Every option of every config group composes, and every _target_ accepts its arguments (without building)."""
import inspect
from pathlib import Path

import pytest
from conftest import ROOT, compose
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "local"))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))]


def bind(node):
    """torchtune's trick: a config is valid when its arguments bind to the target's signature."""
    node = OmegaConf.to_container(node, resolve=True)
    fn, partial = get_method(node.pop("_target_")), node.pop("_partial_", False)
    signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    args = (None,) if inspect.isclass(fn) else ()
    signature.bind_partial(*args, **node) if partial else signature.bind(*args, **node)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option, tmp_path):
    beir = ["data.root=/a/beir/folder"] if option == "beir" or option.startswith("beir_") else []  # or data.name
    # a cross-encoder trains with a cross-encoder loss: the default one is a bi-encoder recipe (it sets a similarity)
    cross = ["loss=ce_mse"] if group == "model" and option.endswith("_ce") else []
    cfg = compose([f"{group}={option}", *beir, *cross], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for key in ("model", "loss", "optimizer", "trainer", "data"):
        if key in cfg:  # only training composes a loss (conf/task/train.yaml picks the default one)
            bind(cfg[key])
    datamodule = OmegaConf.to_container(cfg.datamodule, resolve=True)
    bind(OmegaConf.create({**datamodule, "_partial_": True}))  # the task adds source, collator, negatives


def test_cli_override_reaches_every_value(tmp_path):
    cfg = compose(["optimizer.lr=3e-5", "model.max_doc_length=128", "negatives.num_per_system=3",
                   "trainer.precision=bf16-mixed"], tmp_path)
    assert (cfg.optimizer.lr, cfg.model.max_doc_length, cfg.negatives.num_per_system) == (3e-5, 128, 3)
    assert cfg.trainer.precision == "bf16-mixed"


def test_default_experiment_is_the_documented_one(tmp_path):
    cfg = compose([], tmp_path)
    assert get_class(cfg.model._target_).kind == "bi"
    assert cfg.model.backbone == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.loss._target_.endswith("MarginMSELoss") and list(cfg.negatives.systems) == ["bm25"]
    assert Path(cfg.data.collection).exists(), "the committed sample is the default data"


def test_only_training_composes_a_loss(tmp_path):
    """The loss (and the similarity a recipe's loss config sets on the model) is a training choice: evaluation,
    mining and scoring build `model=` with its own similarity."""
    assert compose([], tmp_path).loss._target_.endswith("MarginMSELoss")  # the default recipe, margin_mse_cos
    for task in ("evaluate", "mine", "score"):
        cfg = compose([f"task={task}"], tmp_path)
        assert "loss" not in cfg and cfg.model.similarity is None, task


@pytest.mark.parametrize("overrides,similarity,scale", [
    (["loss=mnrl"], "cos", 20.0),                               # sentence-transformers' MNRL: cos_sim, scale 20
    (["loss=mnrl", "model.similarity=dot"], "dot", 1.0),        # the user's explicit choice; dot's scale is 1
    (["loss=margin_mse"], "dot", 1.0),                          # Hofstaetter's MarginMSE: dot product
    (["loss=margin_mse", "model.similarity=cos"], "cos", 20.0),  # honoured, at cosine's scale
    ([], "cos", 20.0),                                          # the default recipe: MarginMSE on 20 x cos
    (["model.similarity=dot"], "dot", 1.0),                     # its 20 belongs to cos: dot takes dot's scale
    (["model.similarity=dot", "loss.scale=5"], "dot", 5.0),     # unless the user set one
    (["experiment=bi_mnrl", "model=tiny", "model.similarity=dot"], "dot", 1.0),
    (["loss=distill_kl"], "dot", 1.0),                          # listwise KL: unscaled, its temperature sets the sharpness
])
def test_each_loss_brings_its_recipes_similarity_unless_the_model_sets_one(overrides, similarity, scale):
    """The similarity is the model's (a recipe's loss config sets model.similarity, the command line wins); the
    loss has none and gets the recipe's scale for the model's similarity, or the one the user set."""
    from hydra.utils import instantiate

    from marco_lightning.config import check_training_config
    from marco_lightning.tasks.train import build_loss

    cfg = compose(["model=tiny", *overrides])
    check_training_config(cfg)
    model = instantiate(cfg.model)
    loss = build_loss(cfg.loss, model)
    assert model.similarity == similarity and model.st.similarity_fn_name == {"cos": "cosine", "dot": "dot"}[similarity]
    assert loss.scale == scale and not hasattr(loss, "similarity")


@pytest.mark.parametrize("loss,similarity,expected", [
    ("MarginMSELoss", "cos", 20.0), ("MarginMSELoss", "dot", 1.0), ("MarginMSELoss", None, 1.0),  # None: logits
    ("MultipleNegativesRankingLoss", "cos", 20.0), ("MultipleNegativesRankingLoss", "dot", 1.0),
    ("DistillKLDivLoss", "cos", 1.0), ("DistillKLDivLoss", "dot", 1.0),  # unscaled: its temperature is the knob
    ("MSELoss", "cos", 1.0), ("BinaryCrossEntropyLoss", "cos", 1.0), ("BinaryCrossEntropyLoss", None, 1.0),
])
def test_default_scale_follows_the_models_similarity(loss, similarity, expected):
    from marco_lightning import losses

    assert losses.default_scale(getattr(losses, loss), similarity) == expected


def test_a_bi_encoder_trains_with_a_cross_encoder_loss_config_on_its_own_similarity():
    """ce_* configs name no similarity: on a bi-encoder they score by the model's own (MiniLM: cos)."""
    from hydra.utils import instantiate

    from marco_lightning.config import check_training_config
    from marco_lightning.tasks.train import build_loss

    for option, scale in (("ce_margin_mse", 20.0), ("ce_mse", 1.0)):
        cfg = compose(["model=tiny", f"loss={option}"])
        check_training_config(cfg)
        model = instantiate(cfg.model)
        assert cfg.model.similarity is None and model.similarity == "cos" and build_loss(cfg.loss, model).scale == scale


LOSS_CONTRACTS = {  # loss= option: (inputs, needs_teacher, min_candidates, model_kind), as its class declares them
    "margin_mse": ("scores", True, 2, None), "margin_mse_cos": ("scores", True, 2, None),
    "distill_kl": ("scores", True, 1, None), "mnrl": ("embeddings", False, 1, "bi"),
    "ce_margin_mse": ("scores", True, 2, None), "ce_kl": ("scores", True, 1, None), "ce_mse": ("scores", True, 1, None),
    "ce_bce": ("scores", False, 1, None),
}


def test_every_shipped_loss_declares_its_contract_through_the_base_class():
    from marco_lightning.losses import Loss

    assert sorted(LOSS_CONTRACTS) == sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml"))
    for option, contract in LOSS_CONTRACTS.items():
        cls = get_class(compose([f"loss={option}"]).loss._target_)
        assert issubclass(cls, Loss), option
        assert (cls.inputs, cls.needs_teacher, cls.min_candidates, cls.model_kind) == contract, option


def test_a_loss_without_the_contract_is_refused_before_anything_is_built():
    from marco_lightning.config import ConfigError, check_training_config

    cfg = compose(["model=tiny_ce", "loss=ce_mse", "loss._target_=torch.nn.MSELoss"])
    with pytest.raises(ConfigError, match=r"loss=ce_mse: torch\.nn\.MSELoss is not a marco_lightning\.losses\.Loss"):
        check_training_config(cfg)
