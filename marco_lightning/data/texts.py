"""Id -> text files of either family, whatever their format: the one dispatch over the readers of collections and
queries. It sits above the readers it picks from (msmarco, beir, parquet), so none of them imports it.

- MS MARCO `id \\t text` lines (collection.tsv, queries.*.tsv), plain or gzipped, or a parquet file or folder;
- a BEIR corpus.jsonl or queries.jsonl (a document's text is its title and text, as BEIR and MTEB encode it;
  entries without text are left out, as data/beir.BeirFolder leaves them out, so rows agree everywhere).
"""
from __future__ import annotations

from collections.abc import Iterator

from marco_lightning.data.beir import iter_texts
from marco_lightning.data.formats import is_jsonl
from marco_lightning.data.msmarco import iter_id_text
from marco_lightning.data.parquet import is_parquet


def iter_collection(path) -> Iterator[tuple[str, str]]:
    """(id as a string, text) of a collection or queries file: MS MARCO `id \\t text` (or parquet) or BEIR jsonl."""
    if not is_parquet(path) and is_jsonl(path):
        yield from iter_texts(path)
    else:
        for i, text in iter_id_text(path):
            yield str(i), text


def read_texts(path, keep=None) -> dict[str, str]:
    """id -> text of a collection or queries file (MS MARCO tsv, BEIR jsonl), only the ids in `keep` if given."""
    return {i: t for i, t in iter_collection(path) if keep is None or i in keep}
