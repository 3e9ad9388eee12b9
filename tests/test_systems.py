"""Negative sources by name: the MS MARCO systems' aliases (conf/negatives/), and task=mine's task.systems nodes."""
import gzip
import json

import pytest
from conftest import compose
from omegaconf import OmegaConf
from test_beir import make_folder

from marco_lightning.config import ConfigError
from marco_lightning.data.beir import BeirFolder
from marco_lightning.data.datamodule import negatives_inputs, store_path
from marco_lightning.data.sources import build_source


def test_negatives_aliases_pick_the_files_systems_and_do_not_key_the_store(tmp_path):
    cfg = compose(["negatives=tas_b"], tmp_path)
    neg = negatives_inputs(cfg.negatives)
    assert neg["systems"] == ["msmarco-distilbert-base-tas-b"] and "aliases" not in neg
    # the full name, with one more alias defined: the same selection, so the same store
    full = compose(["negatives=tas_b", "negatives.systems=[msmarco-distilbert-base-tas-b]",
                    "+negatives.aliases.another=some-system"], tmp_path)
    assert store_path(tmp_path, build_source(full.data), full.negatives) == \
        store_path(tmp_path, build_source(cfg.data), cfg.negatives)
    mixed = compose(["negatives.systems=[bm25_rm3,bm25,splade_pp]"], tmp_path)
    assert negatives_inputs(mixed.negatives)["systems"] == ["bm25-rm3", "bm25", "splade-pp-ed"]


# --- task.systems: nodes behind one searcher protocol -----------------------------------------------------------

class Overlap:
    """A negative source of a user's own: a passage scores the number of its words the query has."""

    searches = 0

    def __init__(self, collection, cache_dir, lowercase: bool = True):
        from marco_lightning.data.formats import file_stamp
        from marco_lightning.data.texts import iter_collection

        self.ids, self.words = zip(*((pid, set(text.split())) for pid, text in iter_collection(collection)))
        self.cache_dir = cache_dir
        (cache_dir / "meta.json").write_text(json.dumps({"collection": file_stamp(collection)}))

    def search(self, queries, k):
        Overlap.searches += 1
        out = {}
        for qid, query in queries.items():
            scores = self.pair_scores(qid, query, range(len(self.ids)))
            best = sorted(range(len(self.ids)), key=lambda r: (-scores[r], r))[:k]
            out[qid] = ([self.ids[r] for r in best], [scores[r] for r in best])
        return out

    def pair_scores(self, qid, query, rows):
        return [float(len(set(query.split()) & self.words[r])) for r in rows]


class NoPairScores:
    def __init__(self, collection):
        pass

    def search(self, queries, k):
        return {}


def not_a_searcher(collection):
    return object()


def _mine_cfg(root, systems, *extra):
    return compose(["task=mine", "data=beir", f"data.root={root}", "model=tiny", "task.device=cpu", "task.depth=3",
                    "task.run_depth=10", f"task.systems={systems}", *extra])


def test_short_spellings_expand_to_their_nodes_with_todays_names():
    from marco_lightning.tasks.mine import system_node

    cfg = _mine_cfg("/a/folder", "[bm25,model]")
    assert system_node("bm25", cfg) == {"_target_": "marco_lightning.mining.BM25", "name": "bm25"}
    model = system_node("model", cfg)
    assert model["_target_"] == "marco_lightning.mining.dense" and model["name"] == "all-MiniLM-L6-v2"
    assert model["model"] == OmegaConf.to_container(cfg.model, resolve=True)  # the model= bi-encoder's node
    assert system_node("sentence-transformers/msmarco-MiniLM-L6-cos-v5", cfg) == {
        "_target_": "marco_lightning.mining.dense", "model": "sentence-transformers/msmarco-MiniLM-L6-cos-v5",
        "name": "msmarco-MiniLM-L6-cos-v5"}
    assert system_node("/runs/x y/final_model/", cfg)["name"] == "final_model"
    assert system_node("/runs/my model", cfg)["name"] == "my-model"
    # a node: as given, named by `name`, else its model, else its class
    assert system_node({"_target_": "marco_lightning.mining.BM25"}, cfg)["name"] == "bm25"
    assert system_node({"_target_": "marco_lightning.mining.dense", "model": "a/b"}, cfg)["name"] == "b"
    assert system_node(OmegaConf.create({"_target_": "x.Y", "name": "mine", "k": 3}), cfg) == {
        "_target_": "x.Y", "name": "mine", "k": 3}


def test_model_as_a_system_refuses_a_cross_encoder():
    from marco_lightning.tasks.mine import system_node

    with pytest.raises(ConfigError, match="'model' mines with the model= bi-encoder, but .*CrossEncoder is a cross"):
        system_node("model", compose(["task=mine", "model=tiny_ce"]))


def test_a_searcher_of_ones_own_mines_by_its_target(tmp_path):
    from marco_lightning.data.trec import read_run
    from marco_lightning.tasks.mine import main

    root = make_folder(tmp_path / "f")
    systems = f"[bm25,{{_target_:{__name__}.Overlap,name:overlap}}]"
    Overlap.searches = 0
    manifest = main(_mine_cfg(root, systems, "task.relative_margin=0.5"))
    mined = root / "mined"
    assert set(manifest["systems"]) == {"bm25", "overlap"} and Overlap.searches == 1
    assert manifest["systems"]["overlap"]["source"] == {"_target_": f"{__name__}.Overlap", "name": "overlap"}
    assert (mined / "cache" / "overlap" / "meta.json").is_file()  # cache_dir: a folder of its own
    lines = [json.loads(x) for x in gzip.decompress((mined / "hard-negatives.jsonl.gz").read_bytes()).splitlines()]
    run, folder = read_run(mined / "runs" / "train.overlap.trec"), BeirFolder(root)
    corpus = dict(folder.corpus())
    for d in lines:
        assert set(d["neg"]) == {"bm25", "overlap"} and len(d["neg"]["overlap"]) == 3
        # the margin on its own scores: below half the positive's overlap
        floor = min(len(set(folder.queries[d["qid"]].split()) & set(corpus[p].split())) for p in d["pos"])
        assert all(run[d["qid"]][n] <= floor * 0.5 for n in d["neg"]["overlap"])
    assert manifest["skipped"]["overlap"]["relative_margin"] > 0
    # the same settings again: its runs are reused (its meta.json is unchanged)
    main(_mine_cfg(root, systems, "task.relative_margin=0.5"))
    assert Overlap.searches == 1


NOT_IMPORTABLE = r"task.systems: searcher \(_target_ no_such_module.Searcher\) cannot be imported"


@pytest.mark.parametrize("node, message", [
    ("{_target_:no_such_module.Searcher}", NOT_IMPORTABLE),
    (f"{{_target_:{__name__}.NoPairScores}}", r"task.systems: nopairscores .*: NoPairScores has no pair_scores"),
    (f"{{_target_:{__name__}.not_a_searcher}}", r"not_a_searcher .*: what it builds \(object\) has no search or "),
    (f"{{_target_:{__name__}.Overlap,k1:1.2}}", r"overlap .*argument 'k1'; it takes: collection, cache_dir, lower"),
    ("{_target_:marco_lightning.mining.BM25,name:all-MiniLM-L6-v2}", "two entries share the name 'all-MiniLM-L6-v2'"),
    ("{_target_:marco_lightning.mining.BM25,name:'a b'}", "name 'a b' .*letters, digits"),
    ("3", "task.systems: 3 is neither a name nor a node with a _target_"),
])
def test_a_wrong_system_node_fails_naming_task_systems(tmp_path, node, message):
    from marco_lightning.tasks.mine import main

    root = make_folder(tmp_path / "f")
    with pytest.raises(ConfigError, match=message) as e:
        main(_mine_cfg(root, f"[model,{node}]"))
    assert str(e.value).startswith("task.systems")
    if "what it builds" not in message:  # found before anything is read, encoded or written
        assert not (root / "mined").exists()
