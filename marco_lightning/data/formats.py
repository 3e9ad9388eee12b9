"""What every data-file reader shares: plain-or-gzip opening, numbered lines with errors that name file and line,
file stamps, and the qrels of every family. The readers, each built on this module and on no module above it:
`msmarco.py` (MS MARCO and Hofstätter formats, teacher scores), `score_pickle.py` (the score pickle), `parquet.py`
(the HF copies), `beir.py` (BEIR folders and task=mine / task=score files), `trec.py` (runs and qrels as dicts).
`texts.py` sits above them: it picks the reader of a collection or queries file (`iter_collection`, `read_texts`).

Every reader is an iterator (the real files hold 8.8M passages and 160M teacher scores) and reads plain or
gzipped files (told apart by their magic bytes, not their names). A malformed line raises `DataFormatError`
naming the file, the 1-based line number and what was expected; with `on_error="skip"` such lines are skipped,
counted in `skipped[str(path)]` when a Counter is given, and reported in one warning at the end.
"""
from __future__ import annotations

import gzip
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from marco_lightning.errors import DataFormatError, MissingFileError  # DataFormatError: re-exported here

GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a truncated or corrupt .gz


def open_binary(path):
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}; fix the config key that names it (data.* or task.*) or "
                               "set data.root=DIR to the folder holding it")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def file_stamp(path) -> list:
    """[resolved path, size, mtime]: what tells a file from its replacement (caches built from it key on this)."""
    path = Path(path)
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


def peek(path, n: int) -> bytes:
    with open_binary(path) as f:
        return f.read(n)


class Lines:
    """(line number, line without its newline) of the non-blank lines; `bad(...)` raises or counts."""

    def __init__(self, path, on_error: str, skipped: Counter | None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.on_error, self.skipped, self.count = Path(path), on_error, skipped, 0

    def __iter__(self):
        n = 0
        with open_binary(self.path) as f:
            try:
                for n, line in enumerate(f, 1):  # binary: lines end at b"\n" only, never at a stray \r or \x85
                    line = line.rstrip(b"\r\n")
                    if line.strip():
                        yield n, line
            except GZIP_ERRORS as e:
                raise DataFormatError(f"{self.path}:{n + 1}: truncated or corrupt gzip file ({e})") from None
        if self.count:
            warnings.warn(f"{self.path}: skipped {self.count} malformed line(s)", stacklevel=3)

    def bad(self, n: int, what: str, line: bytes):
        if self.on_error == "raise":
            raise DataFormatError(f"{self.path}:{n}: {what}, got {line[:200]!r}")
        self.count += 1
        if self.skipped is not None:
            self.skipped[str(self.path)] += 1


def iter_qrels(path, on_error="raise", skipped=None, id_type=int) -> Iterator[tuple]:
    """(qid, pid, grade) of a qrels file of any family: TREC `qid Q0 pid grade`, MS MARCO `qid \\t 0 \\t pid \\t 1`,
    BEIR `query-id \\t corpus-id \\t score` (after its header). id_type=str keeps the ids as written (BEIR, TREC
    runs and metrics); a pair judged twice with different grades is an error."""
    lines, grades, width = Lines(path, on_error, skipped), {}, None  # 4 fields (TREC) or 3 (BEIR): the first line's
    for n, line in lines:
        parts = line.split()
        if n == 1 and parts[:2] == [b"query-id", b"corpus-id"]:
            width = 3
            continue
        try:
            if len(parts) != (width or len(parts)) or len(parts) not in (3, 4):
                raise ValueError
            qid, pid, grade = (parts[0], parts[-2], int(parts[-1]))
            qid, pid = (int(qid), int(pid)) if id_type is int else (qid.decode(), pid.decode())
        except (ValueError, UnicodeDecodeError):
            layout = {3: "3 fields `query-id <TAB> corpus-id <TAB> score` (BEIR)"}.get(
                width, "4 fields `qid Q0 pid grade` (TREC, MS MARCO)")
            lines.bad(n, f"expected {layout} with an integer grade{' and integer ids' * (id_type is int)}", line)
            continue
        width = len(parts)  # the first good line fixes the layout
        if grades.setdefault((qid, pid), grade) != grade:
            lines.bad(n, f"({qid}, {pid}) judged twice with different grades", line)
            continue
        yield qid, pid, grade


def is_jsonl(path) -> bool:
    return peek(path, 64).lstrip()[:1] == b"{"
