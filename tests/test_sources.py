"""Data sources are config nodes: a new format is one Source class and one config node, and nothing outside
data/ asks which kind of data it has."""
import json
import re
from pathlib import Path

import pytest
from conftest import FAST, ROOT, compose
from omegaconf import open_dict

from marco_lightning.config import ConfigError
from marco_lightning.data.sources import MarcoSource, build_source
from marco_lightning.data.trec import read_qrels


class SampleFolder(MarcoSource):
    """A 'new format' for the test: a folder whose file names are fixed, so its config is just `root`."""

    def __init__(self, root: str, val_top_k: int = 20):
        files = {name: f"{root}/{name}" for name in ("collection.tsv", "queries.train.tsv", "queries.dev.tsv",
                                                     "qrels.train.tsv", "qrels.dev.trec", "run.dev.bm25.trec")}
        super().__init__(collection=files["collection.tsv"], queries=[files["queries.train.tsv"], files["queries.dev.tsv"]],
                         name="sample-folder", root=root, train_queries=files["queries.train.tsv"],
                         train_qrels=files["qrels.train.tsv"], hard_negatives=f"{root}/msmarco-hard-negatives.jsonl.gz",
                         teacher_scores=f"{root}/teacher-scores.pkl.gz", val_queries=files["queries.dev.tsv"],
                         val_qrels=files["qrels.dev.trec"], val_run=files["run.dev.bm25.trec"], val_top_k=val_top_k)

    def describe(self):
        return "a folder of fixed file names", "its dev queries"


def test_a_new_format_is_one_class_and_one_config_node(tmp_path):
    from marco_lightning.tasks.train import main

    cfg = compose([*FAST, "logger=none"], tmp_path)
    with open_dict(cfg):
        cfg.data = {"_target_": f"{__name__}.SampleFolder", "root": str(ROOT / "data" / "sample")}  # its YAML
    metrics = main(cfg)
    assert set(metrics["after"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    card = (tmp_path / "final_model" / "README.md").read_text()
    assert "a folder of fixed file names" in card and "Re-ranking the top 20 of `run.dev.bm25.trec`" in card
    assert json.loads((tmp_path / "metrics.json").read_text())["after"] == metrics["after"]


def test_sources_give_their_splits_or_say_what_they_have(tmp_path):
    sample = build_source(compose([], tmp_path).data)
    split = sample.split(None)
    assert split.run.endswith("run.dev.bm25.trec") and split.qrels() == read_qrels(sample.val_qrels)
    with pytest.raises(ConfigError, match="task.split=test: data=sample has one set of judged queries"):
        sample.split("test")
    with pytest.raises(ConfigError, match="task=mine works on a BEIR folder: add data=beir"):
        sample.mining_folder("mine")


def test_no_code_outside_data_asks_for_the_kind_of_data():
    package = ROOT / "marco_lightning"
    asks = re.compile(r"""data\.get\(["']kind["']\)|data\.kind\b|["']beir["']\s*(==|!=|in)|(==|!=)\s*["']beir["']""")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in package.rglob("*.py") if "data" not in p.relative_to(package).parts
             for n, line in enumerate(Path(p).read_text().splitlines(), 1) if asks.search(line)]
    assert not found, f"these lines branch on the kind of data; ask the data source instead: {found}"
