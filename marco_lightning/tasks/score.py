"""task=score: a teacher scores every (query, positive) and (query, mined negative) of the training split.

Writes data.teacher_scores (`query-id \\t corpus-id \\t score` lines, the folder's ids) as it goes, one flushed chunk
at a time, and beside it a .json saying which teacher wrote it and whether it is complete. A killed run resumes
after its last complete line; the pairs are enumerated in a fixed order, so nothing is scored twice.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm
from transformers import AutoConfig

from marco_lightning.config import ConfigError
from marco_lightning.data.formats import file_stamp
from marco_lightning.data.msmarco import iter_hard_negatives
from marco_lightning.data.sources import build_source
from marco_lightning.data.texts import read_texts
from marco_lightning.inference import check_precision, compile_model, device, score
from marco_lightning.models import BiEncoder, CrossEncoder, resolve_backbone
from marco_lightning.retrieval import write_json

CHUNK = 4096  # pairs scored (length-sorted inside) and written at a time


def training_pairs(hard_negatives) -> list[tuple[str, str]]:
    """(query, passage) of each training query's positives, then its negatives of every system, each pair once."""
    pairs = []
    for qid, pos, neg in iter_hard_negatives(hard_negatives, id_type=str):
        pairs += [(qid, p) for p in dict.fromkeys([*pos, *(p for pids in neg.values() for p in pids)])]
    return pairs


def load_teacher(name: str):
    """A cross-encoder (scores by its logit) or a bi-encoder (by its similarity), as its folder declares."""
    try:
        architectures = AutoConfig.from_pretrained(resolve_backbone(name)).architectures or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return CrossEncoder(name, max_query_length=32, max_doc_length=480)
        return BiEncoder(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"task.teacher={name}: cannot be loaded ({str(e).splitlines()[0]}). Give a local "
                          "sentence-transformers or cross-encoder folder, or a hub id (needs the network)") from None


def _complete_lines(path: Path) -> list[str]:
    """The complete lines of a partly written score file; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].decode("utf-8").splitlines()


def main(cfg: DictConfig) -> dict:
    build_source(cfg.data).mining_folder("score")  # a mined BEIR folder (MS MARCO's teacher scores are published)
    check_precision(cfg.task.precision)
    mined = Path(cfg.data.hard_negatives)
    if not mined.is_file():
        raise ConfigError(f"data.hard_negatives={mined}: not found; run `python run.py task=mine data=beir "
                          f"data.root={cfg.data.root}` first")
    out = Path(cfg.data.teacher_scores)
    meta_path = out.with_suffix(".json")
    source = {"teacher": str(cfg.task.teacher), "hard_negatives": file_stamp(mined)}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    replace = meta is not None and meta["source"] != source
    if replace and not cfg.task.force:
        raise ConfigError(f"{out} holds scores of {meta['source']['teacher']} for other mined negatives or "
                          "another teacher; set data.teacher_scores=OTHER_PATH to keep them, or task.force=true "
                          "to replace them")
    pairs = training_pairs(mined)
    done = [] if replace else _complete_lines(out)
    for i in (0, len(done) - 1) if done else ():  # the file must be a prefix of these pairs
        if i >= len(pairs) or done[i].split("\t")[:2] != list(pairs[i]):
            raise ConfigError(f"{out}: line {i + 1} is not pair {i + 1} of {mined}; set task.force=true to rescore")
    todo = pairs[len(done):]
    if todo:
        teacher = load_teacher(cfg.task.teacher).to(device(cfg.task.device)).eval()  # before touching any file
        if cfg.task.compile:
            compile_model(teacher)
        queries = read_texts(cfg.data.queries, keep={q for q, _ in todo})
        passages = read_texts(cfg.data.collection, keep={p for _, p in todo})
        if replace:
            out.unlink(missing_ok=True)
        write_json(meta_path, {"source": source, "pairs": len(pairs), "complete": False})
        bar = tqdm(total=len(pairs), initial=len(done), desc=f"scoring with {cfg.task.teacher}", unit="pair",
                   file=sys.stderr, mininterval=2, unit_scale=True)
        with open(out, "a", encoding="utf-8") as f:
            for i in range(0, len(todo), CHUNK):
                chunk = todo[i:i + CHUNK]
                scores = score(teacher, [queries[q] for q, _ in chunk], [passages[p] for _, p in chunk],
                               cfg.task.batch_size, precision=cfg.task.precision)
                f.writelines(f"{q}\t{p}\t{float(s)!r}\n" for (q, p), s in zip(chunk, scores.tolist()))
                f.flush()
                bar.update(len(chunk))
        bar.close()
    write_json(meta_path, {"source": source, "pairs": len(pairs), "complete": True})
    print(f"Teacher scores: {out} ({len(pairs)} pairs, {len(todo)} scored now). Train with them: python run.py "
          f"data=beir data.root={cfg.data.root} experiment=beir_margin_mse")
    return {"pairs": len(pairs), "scored": len(todo), "path": str(out)}
