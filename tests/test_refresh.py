"""Negatives that refresh themselves (negatives.refresh): the lists become the model's own ranking under task=mine's
rule, the datamodule's state carries them across a resume, and a killed run resumed past a refresh ends as an
unbroken one."""
import json

import ir_measures
import numpy as np
import pytest
import torch
from conftest import FAST, compose, killed_and_resumed, run_cli
from hydra.utils import instantiate
from test_beir import _mine, make_folder

from marco_lightning.config import ConfigError, check_training_config
from marco_lightning.data.sources import build_source
from marco_lightning.data.store import TrainLists
from marco_lightning.refresh import RefreshSettings, refresh

MNRL = ["loss=mnrl", "model.similarity=cos"]
# A random tiny model scores everything alike (cosines ~0.9), so NV-Retriever's 5% would skip every candidate:
# the rule at margin 0 (nothing scoring above the lowest positive) still skips some and leaves others
MARGIN = 0.0


def beir(root):
    return ["data=beir", f"data.root={root}", "negatives.systems=all"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small BEIR folder mined by task=mine, as a store, its datamodule and a tiny model (seeded)."""
    tmp = tmp_path_factory.mktemp("refresh")
    root = make_folder(tmp / "f", n_docs=120, n_train=40)
    assert _mine(root).returncode == 0
    cfg = compose([*FAST, *MNRL, *beir(root), "negatives.refresh.every_n_epochs=1", "negatives.refresh.depth=3",
                   "negatives.refresh.relative_margin=null"],
                  tmp)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    dm = instantiate(cfg.datamodule, _partial_=True)(source=build_source(cfg.data), negatives=cfg.negatives,
                                                     collator=model.collator(), with_teacher=False)
    dm.prepare_data()
    dm.setup()
    return cfg, model, dm


def reference_negatives(passages, queries, store, candidates: int, relative_margin: float):
    """A NumPy ranking of sentence-transformers' vectors: among each training query's top `candidates`, those that
    are not positives and score at most its lowest positive minus |that| x margin (NV-Retriever's rule)."""
    lists, out = store.train, []
    for i, q in enumerate(queries):
        scores = passages @ q
        pos = set(np.asarray(lists.positives(i)[0]).tolist())
        floor = min(scores[store.passages.positions(sorted(pos))])
        top = np.argsort(-scores)[:candidates]
        out.append([(float(scores[r]), int(store.passages.ids[r])) for r in top
                    if int(store.passages.ids[r]) not in pos and scores[r] <= floor - abs(floor) * relative_margin])
    return out


def test_refreshed_lists_are_the_models_own_ranking_under_the_positive_aware_rule(sample, tmp_path):
    _, model, dm = sample
    store = dm.store
    old = [set(np.asarray(store.train.negatives(i)[0]).tolist()) for i in range(len(store.train))]
    settings = RefreshSettings(every_n_epochs=1, depth=3, relative_margin=MARGIN)
    qrels = dm.source.validation_set()[0]
    stats = refresh(model, store, tmp_path, settings, epoch=1, val_qrels=qrels, val_rel_level=1)
    new = TrainLists(tmp_path / "epoch-1")
    st = model.st  # sentence-transformers' own encode: the reference vectors
    passages = st.encode_document(store.passages.texts(store.passages.ids), normalize_embeddings=True)
    queries = st.encode_query([store.queries.text(int(q)) for q in store.train.qids], normalize_embeddings=True)
    reference = reference_negatives(passages, queries, store, stats["candidates_per_query"], MARGIN)
    changed = total = refreshed = 0
    for i, eligible in enumerate(reference):
        got = np.asarray(new.negatives(i)[0]).tolist()
        if not eligible:  # the rule left nothing: the query keeps its mined lists
            assert got == np.asarray(store.train.negatives(i)[0]).tolist()
        else:
            refreshed += 1
            last = eligible[min(3, len(eligible)) - 1][0]
            assert len(got) == min(3, len(eligible))
            # the best eligible candidates (ties within float noise of ST's encode may swap)
            assert {p for s, p in eligible if s > last + 1e-5} <= set(got) <= {p for s, p in eligible
                                                                             if s >= last - 1e-5}
        assert np.array_equal(new.positives(i)[0], store.train.positives(i)[0])  # positives untouched
        assert np.isnan(new.negatives(i)[1]).all()  # no teacher scored these
        changed += sum(p not in old[i] for p in got)
        total += len(got)
    assert 0 < refreshed and sum(stats["skipped"].values()) > 0  # the rule acted, and left negatives
    assert stats["changed_share"] == round(changed / total, 4) and stats["negatives"] == total
    assert not (tmp_path / "epoch-1" / "embeddings.npy").exists()  # the matrix is not kept
    # the val queries' nDCG@10 of the model's own full ranking, by ir-measures on ST's vectors
    run = []
    for q in qrels:
        scores = passages @ model.st.encode_query(store.queries.text(int(q)), normalize_embeddings=True)
        run += [ir_measures.ScoredDoc(q, str(store.passages.ids[r]), float(scores[r])) for r in np.argsort(-scores)[:10]]
    judged = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
    expected = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], judged, run)[ir_measures.nDCG @ 10]
    assert stats["val_ndcg@10"] == pytest.approx(expected, abs=1e-4)


def test_the_datamodule_samples_the_refreshed_lists_and_a_resume_gets_the_same(sample):
    cfg, model, dm = sample
    assert dm.negatives_for_epoch(0, model) is None  # not due before epoch K
    stats = dm.negatives_for_epoch(1, model)
    assert stats["epoch"] == 1 and dm.train_set.lists.folder.name == "epoch-1"
    assert dm.negatives_for_epoch(1, None) is None  # epoch 1's lists are in use: nothing is recomputed
    draws = [dm.train_set.draw(1, i)[1].tolist() for i in range(len(dm.train_set))]
    assert any(p not in np.asarray(dm.store.train.negatives(i)[0]) for i, d in enumerate(draws) for p in d[1:])

    resumed = instantiate(cfg.datamodule, _partial_=True)(source=build_source(cfg.data), negatives=cfg.negatives,
                                                          collator=model.collator(), with_teacher=False)
    resumed.setup()
    resumed.load_state_dict(dm.state_dict())  # what Lightning restores from a checkpoint
    assert resumed.negatives_for_epoch(1, None) is None
    assert [resumed.train_set.draw(1, i)[1].tolist() for i in range(len(draws))] == draws


@pytest.mark.parametrize("overrides,message", [
    (["negatives.refresh.every_n_epochs=1"], "distils teacher scores"),  # the default MarginMSE
    (["model=tiny_ce", "loss=ce_bce", "negatives.refresh.every_n_epochs=1"], "cross-encoder"),
    ([*MNRL, "negatives.refresh.every_n_epochs=0"], "positive number of epochs"),
    ([*MNRL, "negatives.refresh.every_n_epochs=1", "task.refit=true"], "task.refit retrains on train \\+ val"),
])
def test_refresh_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_training_config(compose(["model=tiny", *overrides]))


def test_a_run_with_refresh_records_it(tmp_path):
    from marco_lightning.tasks.train import main

    root = make_folder(tmp_path / "f")
    assert _mine(root).returncode == 0
    cfg = compose([*FAST, *MNRL, *beir(root), "logger=none", "trainer.max_epochs=2",
                   "negatives.refresh.every_n_epochs=1"], tmp_path / "run")
    metrics = main(cfg)
    history = metrics["refresh"]["history"]
    assert [h["epoch"] for h in history] == [1] and 0 <= history[0]["changed_share"] <= 1
    run = tmp_path / "run"
    assert (run / "refresh" / "epoch-1" / "stats.json").is_file()
    assert "re-mined by the model itself every 1 epoch(s)" in (run / "final_model" / "README.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["refresh"] == metrics["refresh"]
    # where the time went: a validation after each of the 2 epochs, the one refresh, training the rest of the fit
    seconds = metrics["seconds"]
    assert seconds["epochs"] == 2 and len(seconds["validation"]) == 2 and seconds["refresh"] == [history[0]["seconds"]]
    assert 0 < seconds["training"] < seconds["fit"] and all(v >= 0 for v in seconds["validation"])  # 0.1 s resolution


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_a_kill_past_a_refresh_ends_like_an_unbroken_run(tmp_path):
    args = [*FAST, *MNRL, "logger=none", "data.val_top_k=10", "trainer.max_epochs=3", "batch_size=4",
            "negatives.refresh.every_n_epochs=1", "callbacks.resume_checkpoint.every_n_train_steps=1",
            "trainer.check_val_every_n_epoch=3"]
    # kill it mid-epoch 1 (epochs of 14 steps), after its refresh
    unbroken, killed, resumed = killed_and_resumed(args, tmp_path, kill_after_step=17)
    killed_at = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 14 < killed_at < 28, "the kill should land mid-epoch 1"
    a = torch.load(unbroken / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3 * 14
    for name in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][name], a["state_dict"][name], atol=1e-6, rtol=0)
    history = json.loads((resumed / "metrics.json").read_text())["refresh"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1's came with the checkpoint; epoch 2's made anew
    seconds = json.loads((resumed / "metrics.json").read_text())["seconds"]  # this process's time: epoch 2's only
    assert seconds["refresh"] == [history[1]["seconds"]] and seconds["epochs"] == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_under_ddp_the_ranks_split_the_encoding_and_train_on_one_set_of_lists(tmp_path):
    root = make_folder(tmp_path / "f")
    assert _mine(root).returncode == 0
    run = tmp_path / "run"
    result = run_cli([*FAST, *MNRL, *beir(root), "logger=none", "trainer=ddp_cpu", "trainer.devices=2",
                      "trainer.max_epochs=2", "negatives.refresh.every_n_epochs=1",
                      "negatives.refresh.relative_margin=null", f"hydra.run.dir={run}"], timeout=800)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((run / "metrics.json").read_text())["refresh"]["history"]
    assert [(h["epoch"], h["encoded_by_ranks"]) for h in history] == [(1, 2)]
    assert [p.name for p in (run / "refresh").iterdir()] == ["epoch-1"]  # one set of lists, written once
