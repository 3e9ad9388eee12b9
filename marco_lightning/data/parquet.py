"""Parquet files or folders of them (the Hugging Face copies of MS MARCO): ids as int64, texts as str."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from marco_lightning.data.formats import DataFormatError
from marco_lightning.errors import MissingFileError


def is_parquet(path) -> bool:
    path = Path(path)
    if path.is_dir():
        return any(path.glob("*.parquet"))
    return path.suffix == ".parquet"


def iter_parquet(path, columns=None, num_columns=None, batch_size=65_536) -> Iterator[list]:
    """Column batches [ids as int64 numpy arrays, other columns as numpy arrays or lists of str] of a parquet
    file or of a folder of them (in name order). `columns=None` takes the first `num_columns` columns. Columns
    named `*id` (and the first column when `columns` is None) are ids: the HF copies store them as strings."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise MissingFileError(f"no parquet files in {path}: point the config key at a .parquet file or a folder of "
                               "them")
    for file in files:
        pf = pq.ParquetFile(file)
        names = list(columns or pf.schema_arrow.names[:num_columns])
        missing = [c for c in names if c not in pf.schema_arrow.names]
        if missing:
            raise DataFormatError(f"{file}: no column(s) {missing}; it has {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=names):
            out = []
            for i, name in enumerate(names):
                col = batch.column(name)
                if col.null_count:
                    raise DataFormatError(f"{file}: column {name!r} has missing values near row {row + 1}")
                if name.endswith("id") or (columns is None and i == 0):
                    try:
                        out.append(pc.cast(col, pa.int64()).to_numpy())
                    except pa.ArrowInvalid as e:
                        raise DataFormatError(f"{file}: column {name!r} rows {row + 1}-{row + len(col)}: "
                                              f"expected integer ids: {e}") from None
                else:
                    out.append(col.to_pylist() if pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                               else col.to_numpy())
            row += batch.num_rows
            yield out
