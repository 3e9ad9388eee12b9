"""Full retrieval with a bi-encoder: encode the collection in streamed chunks into a faiss index, then search."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHUNK = 8192  # passages read, encoded and added to the index at a time: memory stays flat for 8.8M passages


@torch.no_grad()
def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    collator, dev = model.collator(), next(model.parameters()).device
    length = model.max_doc_length  # sentence-transformers' max_seq_length, for queries too
    order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar length pad less
    out = []
    for i in range(0, len(texts), batch_size):
        features = collator._tok([texts[j] for j in order[i:i + batch_size]], length)
        features = {k: v.to(dev, non_blocking=True) for k, v in features.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(model.output_embedding(features).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.dim), np.float32)
    embeddings = np.empty((len(texts), out[0].shape[1]), np.float32)
    embeddings[order] = np.concatenate(out)  # back to input order
    return embeddings


def model_fingerprint(model) -> str:
    """Digest of what decides the vectors: every weight, the module stack, similarity and max_seq_length."""
    import hashlib

    digest = hashlib.sha1(repr([type(m).__name__ for m in model.st]).encode())
    digest.update(f"{model.similarity} {model.max_doc_length}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stat(path) -> list:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]  # a collection replaced in place gets a new index


def build_index(model, collection, index_dir: Path, index_factory: str = "Flat", batch_size: int = 64):
    """Encode `collection` (pid \\t text) into `index_dir/index.faiss` + `pids.npy`; reused when already built."""
    import faiss
    from tqdm import tqdm

    from marco_lightning.data.formats import iter_id_text

    index_dir = Path(index_dir)
    meta = {"collection": str(collection), "collection_stat": _stat(collection), "factory": index_factory,
            "model": model_fingerprint(model)}
    if (index_dir / "meta.json").exists() and json.loads((index_dir / "meta.json").read_text()) == meta:
        return faiss.read_index(str(index_dir / "index.faiss")), np.load(index_dir / "pids.npy")
    dim = model.dim
    index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
    pids, chunk, vectors = [], [], []

    def flush():
        vectors.append(encode(model, [t for _, t in chunk], batch_size))
        pids.extend(p for p, _ in chunk)
        chunk.clear()

    for pid, text in tqdm(iter_id_text(collection), desc="encoding collection", unit="passage"):
        chunk.append((pid, text))
        if len(chunk) == CHUNK:
            flush()
            if index.is_trained:  # a flat index takes vectors as they come; trained ones wait (below)
                index.add(vectors.pop())
    if chunk:
        flush()
    if not index.is_trained:  # IVF/PQ: train on what was encoded (for 8.8M passages, pass a sample instead)
        index.train(np.concatenate(vectors))
    for v in vectors:
        index.add(v)
    index_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(index_dir / "index.faiss"))
    np.save(index_dir / "pids.npy", np.asarray(pids, dtype=np.int64))
    (index_dir / "meta.json").write_text(json.dumps(meta))  # written last: its presence means complete
    return index, np.asarray(pids, dtype=np.int64)


def retrieve(model, collection, queries: dict[str, str], top_k: int, index_dir, index_factory: str = "Flat",
             batch_size: int = 64) -> dict[str, dict[str, float]]:
    if model.kind != "bi":
        raise ValueError("task.mode=retrieve needs a bi-encoder (a cross-encoder can only re-rank: task.mode=rerank)")
    index, pids = build_index(model, collection, index_dir, index_factory, batch_size)
    qids = list(queries)
    scores, rows = index.search(encode(model, [queries[q] for q in qids], batch_size), top_k)
    return {q: {str(pids[r]): float(s) for s, r in zip(srow, rrow) if r >= 0}
            for q, srow, rrow in zip(qids, scores, rows)}
