"""Full retrieval with a bi-encoder: the collection encoded chunk by chunk into a memory-mapped matrix on disk
(resumable, reused while model and collection are unchanged), a faiss index over it, then search."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from marco_lightning.data.formats import file_stamp
from marco_lightning.data.texts import iter_collection, read_texts
from marco_lightning.data.trec import top_candidates
from marco_lightning.errors import ConfigError, DataFormatError
from marco_lightning.inference import (  # the one inference path (also as retrieval.encode)
    encode,
    score,
    uses_bf16,
)

CHUNK = 2048  # passages read, encoded, written and counted done at a time: memory stays flat for 8.8M passages


def model_fingerprint(model) -> str:
    """Digest of what decides the collection's vectors: every weight, the module stack, similarity, max_seq_length
    and the document prompt (digested only when there is one: a model without prompts keeps its old caches)."""
    digest = hashlib.sha1(repr([type(m).__name__ for m in model.st]).encode())
    digest.update(f"{model.similarity} {model.max_doc_length}".encode())
    if model.document_prompt:
        digest.update(f"document_prompt={model.document_prompt!r}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_json(path: Path, value) -> None:
    """Replace `path` atomically: a kill mid-write leaves the old file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, mininterval=2, unit_scale=True, **kwargs)


def collection_ids(collection, cache_dir: Path) -> np.ndarray:
    """The passage ids of `collection` in file order (strings), read once into `cache_dir/ids.npy`."""
    path = cache_dir / "ids.npy"
    if not path.exists():
        parts, chunk = [], []
        for pid, _ in _progress(iterable=iter_collection(collection), desc="reading ids", unit="passage"):
            chunk.append(pid)
            if len(chunk) == 1 << 20:
                parts.append(np.array(chunk))
                chunk = []
        parts.append(np.array(chunk, dtype=str))
        ids = np.concatenate(parts)
        tmp = cache_dir / "ids.tmp.npy"
        np.save(tmp, ids)
        tmp.rename(path)
    return np.load(path, mmap_mode="r")


def encode_collection(model, collection, cache_dir, batch_size: int = 64,
                      precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(passage ids, embeddings memmap) of `collection` in file order, kept in `cache_dir`.

    Each chunk is flushed before `progress.json` counts it, so a run killed mid-way resumes at its last complete
    chunk; a different model or collection starts afresh. Peak memory: one chunk of texts and vectors.
    """
    cache_dir = Path(cache_dir)
    meta = {"collection": file_stamp(collection), "model": model_fingerprint(model), "dim": model.dim,
            "bf16": uses_bf16(model, precision)}  # the vectors' precision is part of what they are
    old = json.loads((cache_dir / "meta.json").read_text()) if (cache_dir / "meta.json").exists() else None
    if old is not None:
        old.setdefault("bf16", next(model.parameters()).is_cuda)  # caches from before the key: bf16 on CUDA only
    if old is not None and old != meta:
        for stale in ("embeddings.npy", "progress.json", "ids.npy", "index.faiss", "index.json"):
            (cache_dir / stale).unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    ids = collection_ids(collection, cache_dir)
    emb_path, progress = cache_dir / "embeddings.npy", cache_dir / "progress.json"
    done = json.loads(progress.read_text())["done"] if progress.exists() and emb_path.exists() else 0
    if not done:
        np.lib.format.open_memmap(emb_path, "w+", np.float32, (len(ids), model.dim)).flush()
    if done < len(ids):
        emb = np.lib.format.open_memmap(emb_path, "r+")
        bar = _progress(total=len(ids), initial=done, desc="encoding collection", unit="passage")
        chunk, row = [], 0
        for _, text in iter_collection(collection):
            row += 1
            if row <= done:
                continue
            chunk.append(text)
            if len(chunk) == CHUNK or row == len(ids):
                emb[done:done + len(chunk)] = encode(model, chunk, batch_size, precision, "document")  # role
                emb.flush()
                done += len(chunk)
                write_json(progress, {"done": done})
                bar.update(len(chunk))
                chunk = []
        bar.close()
        del emb
    return ids, np.load(emb_path, mmap_mode="r")


def build_index(model, collection, index_dir: Path, index_factory: str = "Flat", batch_size: int = 64,
                precision: str = "auto"):
    """(faiss index, passage ids) of `collection` under `model`; index and embeddings reused when unchanged."""
    import faiss

    index_dir = Path(index_dir)
    ids, emb = encode_collection(model, collection, index_dir, batch_size, precision)
    stamp = json.dumps({"factory": index_factory, "meta": (index_dir / "meta.json").read_text()})
    if (index_dir / "index.json").exists() and (index_dir / "index.json").read_text() == stamp:
        return with_nprobe(faiss.read_index(str(index_dir / "index.faiss"))), ids
    index = index_from_embeddings(emb, index_factory)
    faiss.write_index(index, str(index_dir / "index.faiss"))
    (index_dir / "index.json").write_text(stamp)  # written last: its presence means complete
    return index, ids


NPROBE = 64  # lists an IVF index searches (faiss' default, 1, misses most neighbours)


def index_from_embeddings(emb: np.ndarray, factory: str = "Flat", nprobe: int = NPROBE):
    """A faiss inner-product index (faiss.index_factory string) over a (memory-mapped) matrix, added in slices."""
    import faiss

    index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:  # IVF/PQ: train on a sample (faiss recommends ~100-1000 vectors per list)
        sample = np.random.default_rng(0).permutation(len(emb))[:256 * 1024]
        index.train(np.ascontiguousarray(emb[np.sort(sample)]))
    for i in range(0, len(emb), CHUNK * 8):
        index.add(np.ascontiguousarray(emb[i:i + CHUNK * 8]))
    return with_nprobe(index, nprobe)


def with_nprobe(index, nprobe: int = NPROBE):
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # not an IVF index
        pass
    return index


def search(index, ids: np.ndarray, qids: list[str], vectors: np.ndarray, top_k: int) -> dict[str, dict[str, float]]:
    """qid -> {passage id: score}, best first (faiss marks missing hits with row -1)."""
    scores, rows = index.search(vectors, min(top_k, len(ids)))
    return {q: {str(ids[r]): float(s) for s, r in zip(srow, rrow) if r >= 0}
            for q, srow, rrow in zip(qids, scores, rows)}


def retrieve(model, collection, queries: dict[str, str], top_k: int, index_dir, index_factory: str = "Flat",
             batch_size: int = 64, precision: str = "auto") -> dict[str, dict[str, float]]:
    if model.kind != "bi":
        raise ConfigError("task.mode=retrieve needs a bi-encoder (a cross-encoder can only re-rank: task.mode=rerank)")
    index, ids = build_index(model, collection, index_dir, index_factory, batch_size, precision)
    qids = list(queries)
    vectors = encode(model, [queries[q] for q in qids], batch_size, precision, role="query")
    return search(index, ids, qids, vectors, top_k)


def rerank(model, run, queries: dict[str, str], collection, top_k: int, batch_size: int,
           precision: str = "auto") -> dict[str, dict[str, float]]:
    """The model's scores of each query's top_k candidates of `run` (texts streamed from `collection`)."""
    rows = [(qid, pid) for qid, docs in run.items() if qid in queries
            for pid in top_candidates(qid, docs, top_k, key="task.top_k")]
    passages = read_texts(collection, keep={pid for _, pid in rows})  # streams the collection, keeps what is needed
    missing = sorted({pid for _, pid in rows if pid not in passages})
    if missing:
        raise DataFormatError(f"{collection}: {len(missing)} passages of the run have no text (e.g. {missing[:3]}): "
                              "re-rank a run of this collection (task.collection=...)")
    scores = score(model, [queries[q] for q, _ in rows], [passages[p] for _, p in rows], batch_size, "re-ranking",
                   precision)
    out: dict[str, dict[str, float]] = {}
    for (q, p), s in zip(rows, scores.tolist()):
        out.setdefault(q, {})[p] = s
    return out
