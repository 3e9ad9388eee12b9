"""Prompts: a sentence-transformers folder that declares them (config_sentence_transformers.json `prompts`), or
model.query_prompt / model.document_prompt, is embedded everywhere exactly as sentence-transformers'
`encode_query` / `encode_document` embed it (a Pooling with include_prompt=False too): training batches,
validation, inference, retrieval and mining, teacher scoring; the exported folder declares what was trained, and
the collection-embedding cache is keyed by the document prompt. Tiny random models built here."""
import json

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, compose
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from test_fidelity import st_rerank_metrics
from transformers import AutoConfig, AutoModel

from marco_lightning import inference
from marco_lightning.models import BiEncoder, from_exported, load_model, resolve_backbone

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
SAMPLE = ROOT / "data" / "sample"
E5 = {"query": "query: ", "document": "passage: "}
BGE = {"query": "Represent this sentence for searching relevant passages: "}


def st_folder(path, prompts=None, include_prompt=True, seed=0):
    """A random tiny cosine model (mean pooling, Normalize) with MiniLM's tokenizer, declaring `prompts`."""
    torch.manual_seed(seed)
    transformer = Transformer(resolve_backbone(BACKBONE), max_seq_length=48)
    transformer.model = AutoModel.from_config(AutoConfig.from_pretrained(transformer.model.config._name_or_path,
                                                                         **TINY))
    modules = [transformer, Pooling(32, "mean", include_prompt=include_prompt), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts, similarity_fn_name="cosine").save(str(path))
    return path


@pytest.fixture(scope="module")
def texts():
    with open(SAMPLE / "collection.tsv", encoding="utf-8") as f:
        passages = [line.split("\t", 1)[1].rstrip("\n") for _, line in zip(range(13), f)]
    with open(SAMPLE / "queries.dev.tsv", encoding="utf-8") as f:
        queries = [line.split("\t", 1)[1].rstrip("\n") for _, line in zip(range(13), f)]
    return queries + ["", "naïve café ☕"], passages + ["", "short"]  # 15 each: blocks of 7 leave a partial one


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(inference, "BLOCK", 7)  # several blocks, the last one partial


CASES = {  # name: (folder prompts, include_prompt, overrides, the prompts sentence-transformers is given)
    "folder": (E5, True, {}, None),
    "folder_bge": (BGE, True, {}, None),
    "overrides": (E5, True, {"query_prompt": "search_query: ", "document_prompt": ""},
                  {"query": "search_query: ", "document": ""}),
    "added": (None, True, {"document_prompt": "search_document: "}, {"document": "search_document: "}),
    "exclude_prompt": (E5, False, {}, None),
    "e5_passage": ({"query": "query: ", "passage": "passage: "}, True, {}, None),  # encode_document: no prompt
}


@pytest.mark.parametrize("case", CASES)
def test_encode_is_encode_query_and_encode_document(case, texts, tmp_path, small_blocks, caplog):
    """inference.encode(role="query") == SentenceTransformer.encode_query, role="document" == encode_document, to
    1e-5: for the folder's prompts, for model.query_prompt / document_prompt (which sentence-transformers is given
    as its `prompts`), and for a Pooling that leaves the prompt's tokens out."""
    prompts, include_prompt, overrides, st_prompts = CASES[case]
    folder = st_folder(tmp_path / "m", prompts, include_prompt)
    st = SentenceTransformer(str(folder), device="cpu", prompts=st_prompts)
    model = BiEncoder(str(folder), **overrides).eval()
    queries, passages = texts
    for role, reference, some in (("query", st.encode_query, queries), ("document", st.encode_document, passages)):
        for batch_size in (4, 1):
            ours = inference.encode(model, some, batch_size, "32", role=role)
            np.testing.assert_allclose(ours, reference(some, batch_size=4, normalize_embeddings=True), atol=1e-5)
        prompt = model.prompts[role]
        assert prompt == (st.prompts["query"] if role == "query" else st.prompts["document"])
        plain = st.encode(some, batch_size=4, normalize_embeddings=True)
        assert (np.abs(ours - plain).max() > 1e-3) == bool(prompt)  # the prompt did change the vectors
    if not include_prompt:  # the same prompts pooled over: other vectors, so the exclusion did happen
        pooled = BiEncoder(str(st_folder(tmp_path / "incl", prompts, True))).eval()
        assert np.abs(inference.encode(pooled, queries, 4, "32", role="query") - ours).max() > 1e-3
    with pytest.raises(ValueError, match="role='passage'"):
        inference.encode(model, queries, 4, "32", role="passage")
    # a "passage" prompt that encode_document does not apply is pointed out (set model.document_prompt)
    assert ("model.document_prompt" in caplog.text) == (case == "e5_passage")


def test_a_model_without_prompts_is_unchanged(texts, tmp_path):
    """No prompts: both roles are sentence-transformers' plain encode, the features carry no prompt_length."""
    folder = st_folder(tmp_path / "m")
    model, st = BiEncoder(str(folder)).eval(), SentenceTransformer(str(folder), device="cpu")
    assert model.prompts == {"query": "", "document": ""}
    plain = st.encode(texts[1], normalize_embeddings=True)
    for role in ("query", "document"):
        np.testing.assert_allclose(inference.encode(model, texts[1], 4, "32", role=role), plain, atol=1e-5)
    collator = model.collator()
    assert "prompt_length" not in collator.texts(texts[1], "query")
    assert collator.max_train_query_length == model.max_query_length


def test_max_query_length_null_trains_queries_as_sentence_transformers_tokenises_them(tmp_path):
    """model.max_query_length=null (the BEIR recipes: queries can be paragraphs): a training query is cut where
    sentence-transformers cuts it, at max_seq_length (48 here), not at 32 tokens."""
    folder = st_folder(tmp_path / "m")
    st = SentenceTransformer(str(folder), device="cpu")
    query = " ".join(["the effect of transonic flow on a swept wing"] * 12)  # ~100 tokens
    features = BiEncoder(str(folder), max_query_length=None).collator().train([(query, ["a passage"], None)])["query"]
    assert torch.equal(features["input_ids"], st.tokenize([query])["input_ids"]) and features["input_ids"].shape[1] == 48
    assert BiEncoder(str(folder)).collator().train([(query, ["a passage"], None)])["query"]["input_ids"].shape[1] == 32


@pytest.mark.parametrize("include_prompt", [True, False])
def test_training_batches_carry_the_prompts(texts, tmp_path, include_prompt):
    """Collator.train: each query starts with the query prompt's tokens, each passage with the document prompt's;
    the training embeddings (length chunks, GradCache's mini-batches) are encode_query's / encode_document's."""
    from marco_lightning.grad_cache import cached_loss_backward

    folder = st_folder(tmp_path / "m", E5, include_prompt)
    model = BiEncoder(str(folder), max_query_length=8).eval()
    st = SentenceTransformer(str(folder), device="cpu")
    queries, passages = texts
    examples = [(queries[i], [passages[(i + j) % 15] for j in range(3)], None) for i in range(12)]
    collator = model.collator()
    batch = collator.train(examples)
    for key, prompt in (("query", "query: "), ("docs", "passage: ")):
        head = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = batch[key]["input_ids"]
        assert (ids[:, 1:1 + len(head)] == torch.tensor(head)).all() and (ids[:, 0] == model.tokenizer.cls_token_id).all()
        assert batch[key]["prompt_length"].tolist() == [1 + len(head)] * len(ids)  # [CLS] + prompt, as ST counts
    # the query prompt's tokens come on top of max_query_length: the query keeps the tokens it has without one
    assert collator.max_train_query_length == 8 + 2
    without = BiEncoder(str(folder), max_query_length=8, query_prompt="").collator().train(examples)["query"]
    ids = batch["query"]["input_ids"]
    assert torch.equal(torch.cat([ids[:, :1], ids[:, 3:]], 1), without["input_ids"])
    short = [i for i, q in enumerate(queries[:12]) if len(model.tokenizer(q)["input_ids"]) <= 8]
    with torch.no_grad():
        q, docs = model.embed_group(batch)  # docs in 4 length-sorted chunks
    np.testing.assert_allclose(q[short].numpy(), st.encode_query([queries[i] for i in short]), atol=1e-5)
    doc_texts = [d for _, ds, _ in examples for d in ds]
    np.testing.assert_allclose(docs.reshape(36, -1).numpy(), st.encode_document(doc_texts, batch_size=5), atol=1e-5)
    # GradCache cuts the features into mini-batches by rows: prompt_length with them, the same loss
    def loss(q_emb, d_emb, _):
        return torch.einsum("bd,bnd->bn", q_emb, d_emb).square().sum()

    with torch.no_grad():
        whole = loss(q, docs, None)
    cached = cached_loss_backward(model.embed, batch["query"], batch["docs"], loss, 5, lambda value: None)
    torch.testing.assert_close(cached, whole, atol=1e-4, rtol=1e-5)


def test_validation_and_teacher_scores_are_sentence_transformers(texts, tmp_path, small_blocks):
    """Re-ranking scores (Collator.pairs + score_pairs, as validation_step; inference.score, as task=evaluate and
    a bi-encoder teacher of task=score) are the similarity of encode_query and encode_document."""
    from marco_lightning.tasks.score import load_teacher

    folder = st_folder(tmp_path / "m", E5, include_prompt=False)
    st = SentenceTransformer(str(folder), device="cpu")
    queries, passages = texts
    want = st.similarity_pairwise(st.encode_query(queries), st.encode_document(passages)).numpy()
    model = load_teacher(str(folder)).eval()
    batch = model.collator().pairs([(i, i, q, p) for i, (q, p) in enumerate(zip(queries, passages))])
    with torch.no_grad():
        np.testing.assert_allclose(model.score_pairs(batch).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(inference.score(model, queries, passages, 4, precision="32"), want, atol=1e-5)
    # validation's batches (unique=True): every query against every passage, each text embedded once
    grid = [(i, j, q, p) for i, q in enumerate(queries) for j, p in enumerate(passages)]
    batch = model.collator().pairs(grid, unique=True)
    assert len(batch["query"]["input_ids"]) == len(queries) and len(batch["doc"]["input_ids"]) == len(passages)
    want = st.similarity(st.encode_query(queries), st.encode_document(passages)).numpy().ravel()
    with torch.no_grad():
        np.testing.assert_allclose(model.score_pairs(batch).numpy(), want, atol=1e-5)


def test_export_declares_the_prompts_trained(texts, tmp_path):
    """final_model/ (BiEncoder.save) declares the prompts as "query" / "document": sentence-transformers loaded
    from it gives our vectors, and reading it back gives the same model; the folder's other prompts stay."""
    folder = st_folder(tmp_path / "m", {"query": "query: ", "passage": "passage: "})
    model = BiEncoder(str(folder), similarity="dot", document_prompt="passage: ").eval()  # dot: modules rebuilt
    model.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "document": "passage: ", "passage": "passage: "}
    assert config["default_prompt_name"] is None and config["similarity_fn_name"] == "dot"
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    queries, passages = texts
    np.testing.assert_allclose(st.encode_query(queries), inference.encode(model, queries, 4, "32", role="query"),
                               atol=1e-5)
    np.testing.assert_allclose(st.encode_document(passages),
                               inference.encode(model, passages, 4, "32", role="document"), atol=1e-5)
    again = from_exported(tmp_path / "out")
    assert again.prompts == model.prompts == {"query": "query: ", "document": "passage: "}


def test_training_validates_and_exports_with_the_prompts(tmp_path):
    """task=train from a folder declaring e5's prompts, the document prompt overridden: "before" is the folder as
    sentence-transformers' encode_query / encode_document measure it, "after" the exported final_model/, which
    declares the prompts trained (its card says them); its last.ckpt evaluates with them."""
    from marco_lightning.tasks.evaluate import main as evaluate
    from marco_lightning.tasks.train import main as train

    folder = st_folder(tmp_path / "start", E5, include_prompt=False)
    out = tmp_path / "run"
    cfg = compose([*FAST, "model=minilm", f"model.backbone={folder}", "model.document_prompt=document: ",
                   "loss=margin_mse", "logger=none", "data.val_top_k=10", "trainer.max_steps=2",
                   "task.keep_start=false"], out)  # final_model/ is the trained one, whatever val says
    metrics = train(cfg)
    for when, model_dir in (("before", folder), ("after", out / "final_model")):
        for name, value in st_rerank_metrics(model_dir).items():
            assert metrics[when][name] == pytest.approx(value, abs=1e-4), (when, name)
    config = json.loads((out / "final_model" / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"] == "query: " and config["prompts"]["document"] == "document: "
    card = (out / "final_model" / "README.md").read_text(encoding="utf-8")
    assert "Prompts: query 'query: ', document 'document: '" in card
    # the .ckpt with the model= config of the folder alone (its "passage: "): scored with the prompts it trained
    ckpt = out / "checkpoints" / "last.ckpt"
    cfg = compose(["task=evaluate", "task.mode=rerank", "task.top_k=10", "task.device=cpu", "model=minilm",
                   f"model.backbone={folder}", f"task.model_path={ckpt}"], tmp_path / "e")
    assert load_model(cfg.model, str(ckpt)).prompts == {"query": "query: ", "document": "document: "}
    evaluated = evaluate(cfg)
    for name in ("ndcg@10", "mrr@10"):
        assert evaluated[name] == pytest.approx(metrics["after"][name], abs=1e-4), name


def test_collection_cache_and_mining_runs_are_keyed_by_the_prompts(tmp_path):
    """The collection's embeddings are reused only under the same document prompt (a cache made without it is
    encoded again); a query prompt keeps them but not Dense's runs; searches score encode_query . encode_document."""
    from marco_lightning.mining import Dense
    from marco_lightning.retrieval import encode_collection, model_fingerprint

    folder = st_folder(tmp_path / "m")
    collection = tmp_path / "collection.tsv"
    with open(SAMPLE / "collection.tsv", encoding="utf-8") as src:
        collection.write_text("".join(line for _, line in zip(range(40), src)), encoding="utf-8")
    lines = [line.split("\t", 1) for line in collection.read_text(encoding="utf-8").splitlines()]
    row_of, passages = {pid: i for i, (pid, _) in enumerate(lines)}, [text for _, text in lines]
    plain, with_doc = BiEncoder(str(folder)).eval(), BiEncoder(str(folder), document_prompt="passage: ").eval()
    with_query = BiEncoder(str(folder), query_prompt="query: ").eval()
    assert model_fingerprint(plain) == model_fingerprint(with_query) != model_fingerprint(with_doc)
    cache = tmp_path / "cache"
    _, first = encode_collection(plain, collection, cache)
    first = np.array(first)
    _, second = encode_collection(with_doc, collection, cache)  # the same weights, another document prompt
    st = SentenceTransformer(str(folder), device="cpu", prompts={"query": "query: ", "document": "passage: "})
    np.testing.assert_allclose(second, st.encode_document(passages), atol=1e-5)
    assert np.abs(np.array(second) - first).max() > 1e-3

    queries = {"1": "what is the daily life of thai people", "2": "cost of interior concrete flooring"}
    dense = {m: Dense(m, collection, tmp_path / "dense") for m in (with_doc, plain, with_query)}
    assert dense[plain].cache_dir == tmp_path / "dense" != dense[with_query].cache_dir  # its runs: its own key
    assert json.loads((dense[with_query].cache_dir / "meta.json").read_text())["query_prompt"] == "query: "
    ref = SentenceTransformer(str(folder), device="cpu", prompts={"query": "query: "})
    run = dense[with_query].search(queries, 5)
    for i, (qid, text) in enumerate(queries.items()):
        sims = ref.similarity(ref.encode_query([text]), ref.encode_document(passages))[0].numpy()
        pids, scores = run[qid]
        np.testing.assert_allclose(scores, np.sort(sims)[::-1][:5], atol=1e-5)
        rows = [row_of[p] for p in pids]
        np.testing.assert_allclose(scores, sims[rows], atol=1e-5)  # each the score of the passage returned
        np.testing.assert_allclose(dense[with_query].pair_scores(qid, text, rows), sims[rows], atol=1e-5)


def test_cross_encoders_take_no_prompts(tmp_path):
    from marco_lightning.config import ConfigError, check_training_config

    cfg = compose(["model=tiny_ce", "loss=ce_mse", "+model.query_prompt=query: "])
    with pytest.raises(ConfigError, match="model.query_prompt"):
        check_training_config(cfg)
    with pytest.raises(ValueError, match="model.document_prompt"):
        BiEncoder(BACKBONE, random_init=TINY, document_prompt=["passage: "])
