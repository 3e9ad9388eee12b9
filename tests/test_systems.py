"""Negative sources by name: the MS MARCO systems' aliases (conf/negatives/), and task=mine's task.systems nodes."""
from conftest import compose

from marco_lightning.data.datamodule import store_inputs, store_path


def test_negatives_aliases_pick_the_files_systems_and_do_not_key_the_store(tmp_path):
    cfg = compose(["negatives=tas_b"], tmp_path)
    _, neg = store_inputs(cfg.data, cfg.negatives)
    assert neg["systems"] == ["msmarco-distilbert-base-tas-b"] and "aliases" not in neg
    # the full name, with one more alias defined: the same selection, so the same store
    full = compose(["negatives=tas_b", "negatives.systems=[msmarco-distilbert-base-tas-b]",
                    "+negatives.aliases.another=some-system"], tmp_path)
    assert store_path(tmp_path, full.data, full.negatives) == store_path(tmp_path, cfg.data, cfg.negatives)
    mixed = compose(["negatives.systems=[bm25_rm3,bm25,splade_pp]"], tmp_path)
    assert store_inputs(mixed.data, mixed.negatives)[1]["systems"] == ["bm25-rm3", "bm25", "splade-pp-ed"]
