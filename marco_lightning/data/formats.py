"""Streaming readers for the MS MARCO and BEIR file formats.

Every reader is an iterator (the real files hold 8.8M passages and 160M teacher scores) and reads plain or
gzipped files (told apart by their magic bytes, not their names). A malformed line raises `DataFormatError`
naming the file, the 1-based line number and what was expected; with `on_error="skip"` such lines are skipped,
counted in `skipped[str(path)]` when a Counter is given, and reported in one warning at the end.
"""
from __future__ import annotations

import gzip
import json
import math
import pickletools
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class DataFormatError(ValueError):
    """A data file does not have the expected format."""


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a truncated or corrupt .gz


def open_binary(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def file_stamp(path) -> list:
    """[resolved path, size, mtime]: what tells a file from its replacement (caches built from it key on this)."""
    path = Path(path)
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


def _peek(path, n: int) -> bytes:
    with open_binary(path) as f:
        return f.read(n)


class _Lines:
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
            except _GZIP_ERRORS as e:
                raise DataFormatError(f"{self.path}:{n + 1}: truncated or corrupt gzip file ({e})") from None
        if self.count:
            warnings.warn(f"{self.path}: skipped {self.count} malformed line(s)", stacklevel=3)

    def bad(self, n: int, what: str, line: bytes):
        if self.on_error == "raise":
            raise DataFormatError(f"{self.path}:{n}: {what}, got {line[:200]!r}")
        self.count += 1
        if self.skipped is not None:
            self.skipped[str(self.path)] += 1


# --- MS MARCO text formats -------------------------------------------------------------------------------

def iter_id_text(path, on_error="raise", skipped=None) -> Iterator[tuple[int, str]]:
    """(id, text) from `id \\t text` lines (collection.tsv, queries.*.tsv), or from the first two columns of
    a parquet file or folder (the HF copies: passage_id/passage, query_id/query)."""
    if _is_parquet(path):
        for ids, texts in iter_parquet(path, columns=None, num_columns=2):
            yield from zip(ids.tolist(), texts)
        return
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        id_, tab, text = line.partition(b"\t")
        try:
            if not tab:
                raise ValueError
            yield int(id_), text.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            lines.bad(n, "expected `integer id <TAB> utf-8 text`", line)


def iter_qrels(path, on_error="raise", skipped=None) -> Iterator[tuple[int, int, int]]:
    """(qid, pid, grade) from MS MARCO `qid \\t 0 \\t pid \\t 1` or TREC `qid Q0 pid grade` lines."""
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.split()
        try:
            if len(parts) != 4:
                raise ValueError
            yield int(parts[0]), int(parts[2]), int(parts[3])
        except ValueError:
            lines.bad(n, "expected 4 fields `qid 0|Q0 pid grade` with integer qid, pid and grade", line)


def _int_list(x) -> bool:
    return type(x) is list and set(map(type, x)) <= _INT  # (bool, float and str are refused)


_INT = {int}


def iter_hard_negatives(path, on_error="raise", skipped=None, id_type=int) -> Iterator[tuple]:
    """(qid, positive pids, {system: negative pids, best first}) from msmarco-hard-negatives.jsonl(.gz).
    id_type=str reads the files task=mine writes for BEIR folders (string ids; integers are read as strings)."""
    lines = _Lines(path, on_error, skipped)
    ok = _int_list if id_type is int else _id_list
    for n, line in lines:
        try:
            d = json.loads(line)
            qid, pos, neg = d["qid"], d["pos"], d["neg"]
            if not ok([qid]) or not ok(pos) or type(neg) is not dict or not all(ok(v) for v in neg.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            kind = "int" if id_type is int else "id"
            lines.bad(n, f'expected JSON {{"qid": {kind}, "pos": [{kind}, ...], "neg": {{"system": [{kind}, ...], '
                         '...}}', line)
            continue
        if id_type is str:
            qid, pos, neg = str(qid), [str(x) for x in pos], {k: [str(x) for x in v] for k, v in neg.items()}
        yield qid, pos, neg


def _id_list(x) -> bool:
    return type(x) is list and set(map(type, x)) <= {int, str}


def iter_hofstaetter_triples(path, on_error="raise", skipped=None) -> Iterator[tuple[int, int, int, float, float]]:
    """(qid, pid_pos, pid_neg, pos_score, neg_score) from `pos_score \\t neg_score \\t qid \\t pid_pos \\t pid_neg`
    lines (Hofstätter et al.'s bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv)."""
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.split(b"\t")
        try:
            if len(parts) != 5:
                raise ValueError
            pos_score, neg_score = float(parts[0]), float(parts[1])
            if not (math.isfinite(pos_score) and math.isfinite(neg_score)):
                raise ValueError
            yield int(parts[2]), int(parts[3]), int(parts[4]), pos_score, neg_score
        except ValueError:
            lines.bad(n, "expected 5 tab-separated fields `pos_score neg_score qid pid_pos pid_neg`", line)


# --- teacher scores ----------------------------------------------------------------------------------------

def iter_teacher_scores(path, on_error="raise", skipped=None) -> Iterator[tuple[int, int, float]]:
    """(qid, pid, score) from a teacher-score file; see `iter_teacher_score_chunks` for the formats."""
    for qids, pids, scores in iter_teacher_score_chunks(path, on_error, skipped):
        yield from zip(qids.tolist(), pids.tolist(), scores.tolist())


def iter_teacher_score_chunks(path, on_error="raise", skipped=None, chunk_size=1 << 20):
    """Aligned (qids int64, pids int64, scores float64) arrays of about `chunk_size` scores each, from
    - the score pickle(.gz) `scores[qid][pid] -> float` (read safely, never with pickle.load: see below),
    - a parquet file or folder with (query_id, passage_id, score) columns (the HF copies),
    - Hofstätter's triples TSV (each line gives a positive and a negative score).
    """
    if _is_parquet(path):
        for q, p, s in iter_parquet(path, columns=["query_id", "passage_id", "score"]):
            yield q, p, np.asarray(s, np.float64)
        return
    if _peek(path, 1) != b"\x80" and not re.search(r"\.(pkl|pickle)(\.gz)?$", str(path)):  # PROTO starts a pickle
        buf = []
        for qid, pos, neg, s_pos, s_neg in iter_hofstaetter_triples(path, on_error, skipped):
            buf += [(qid, pos, s_pos), (qid, neg, s_neg)]
            if len(buf) >= chunk_size:
                yield _chunk_from_rows(buf)
                buf = []
        if buf:
            yield _chunk_from_rows(buf)
        return
    parts, n = [], 0
    for qid, pids, scores in _ScorePickle(path).blocks():
        parts.append((np.full(len(pids), qid, np.int64), pids, scores))
        n += len(pids)
        if n >= chunk_size:
            yield tuple(np.concatenate(c) for c in zip(*parts))
            parts, n = [], 0
    if parts:
        yield tuple(np.concatenate(c) for c in zip(*parts))


def _chunk_from_rows(rows):
    q, p, s = zip(*rows)
    return np.array(q, np.int64), np.array(p, np.int64), np.array(s, np.float64)


# The score pickle is read by a restricted, streaming pickle VM. pickle.load would run any code the file asks
# for, and would build a 160M-entry dict (17-25 GB). This VM interprets only the opcodes a dict of dicts of
# numbers needs and allows exactly three callables -- numpy's scalar reconstructor, numpy.dtype, and the latin1
# `_codecs.encode` of protocol-2 bytes -- through stand-ins that never call numpy's own unpickling code. Each
# inner dict is handed out as arrays once complete, and its memo keeps only the few small objects a later entry
# may refer to (globals, dtypes, strings): a file that refers back to anything else fails loudly.
# The bulk of the entries (int keys, Python-float or numpy-scalar values) is decoded by a regex + numpy path.

class _DType:
    """Stand-in for numpy.dtype: plain numeric types only, byte order from the pickled state."""

    def __init__(self, name, align=False, copy=True):
        if name not in ("f4", "f8", "i4", "i8"):
            raise ValueError(f"numpy.dtype({name!r}) is not float32/float64/int32/int64")
        self.np = np.dtype(name)

    def setstate(self, state):
        if not (type(state) is tuple and len(state) >= 2 and state[1] in ("<", ">", "=", "|")):
            raise ValueError(f"unexpected numpy.dtype state {state!r}")
        if state[1] in "<>":
            self.np = self.np.newbyteorder(state[1])


def _scalar(dtype, data):
    if type(dtype) is not _DType or type(data) is not bytes or len(data) != dtype.np.itemsize:
        raise ValueError("numpy scalar with unexpected arguments")
    return np.frombuffer(data, dtype.np)[0].item()


def _latin1_encode(text, encoding):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


_GLOBALS = {("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar,
            ("numpy", "dtype"): _DType, ("_codecs", "encode"): _latin1_encode}
_CALLABLES = (_scalar, _DType, _latin1_encode)


class _Dict(list):
    """A dict being read, as a list of (keys, values) array chunks; the root dict is a _Root."""


class _Root(_Dict):
    pass


# One number as the pickler writes it: BININT/BININT2/BININT1, BINFLOAT, or a numpy scalar (get scalar,
# get dtype, SHORT_BINBYTES, put, TUPLE2, put, REDUCE, put). Each alternative starts with its own byte, so a
# token has one parse only.
_PUT = rb"(?:\x94|q.|r.{4})"
_GET = rb"(?:h.|j.{4})"
_NUM = rb"(?:J.{4}|M..|K.|G.{8}|" + _GET + _GET + rb"C(?:\x04.{4}|\x08.{8})" + _PUT + rb"\x86" + _PUT + rb"R" + _PUT + rb")"
_TOKEN = re.compile(_NUM, re.DOTALL)
_SIMPLE = {ord("J"): np.dtype("<i4"), ord("M"): np.dtype("<u2"), ord("K"): np.dtype("u1"), ord("G"): np.dtype(">f8")}
_PUT_WIDTH = {0x94: 1, ord("q"): 2, ord("r"): 5}
_OPNAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
_MARGIN = 1 << 18  # bytes kept ahead of the cursor: any short opcode and any 1000-entry batch fits
_CHUNK = 1 << 22
_MEMO_LIMIT = 100_000
_MAX_STRING = 1 << 16


def _deframed(f):
    """The pickle stream without its FRAME opcodes, in chunks. Protocol 4+ cuts the stream into frames whose
    FRAME header is a no-op length hint; dropping the headers keeps the fast path's fixed-stride runs whole.
    Anything else at a frame boundary (a big object written unframed) passes the rest through unchanged: the
    VM skips FRAME opcodes itself."""
    head = f.read(2)
    yield head
    if head[:1] == b"\x80" and head[1:2] >= b"\x04":
        while (op := f.read(1)) == b"\x95":
            n = int.from_bytes(f.read(8), "little")
            while n > 0 and (chunk := f.read(min(n, _CHUNK))):
                n -= len(chunk)
                yield chunk
        yield op
    while chunk := f.read(_CHUNK):
        yield chunk


class _ScorePickle:
    def __init__(self, path):
        self.path = Path(path)
        self.buf, self.pos, self.base, self.eof = b"", 0, 0, False
        self.stack, self.marks, self.memo, self.nput = [], [], {}, 0
        self.out = []  # finished (qid, _Dict) pairs of the root

    def fail(self, what):
        raise DataFormatError(f"{self.path}: byte {self.base + self.pos} of the pickle stream: {what}")

    def blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(qid, pids int64, scores float64) for each scores[qid], in file order."""
        with open_binary(self.path) as f:
            self.chunks = _deframed(f)
            while True:
                if len(self.buf) - self.pos < _MARGIN and not self.eof:
                    self.refill(_CHUNK)
                if self.pos >= len(self.buf):
                    self.fail("the file ends without the pickle STOP opcode (truncated?)")
                op = self.buf[self.pos]
                if self.pos + self.base == 0 and op != 0x80:
                    self.fail("not a pickle of protocol 2 or higher (no PROTO opcode); re-save the scores with "
                              "pickle.dump(scores, f, protocol=4)")
                handler = _OPS.get(op)
                if handler is None:
                    self.fail(f"refused pickle opcode {_OPNAMES.get(op, hex(op))}: a teacher-score pickle may "
                              "only hold a dict of dicts of numbers; nothing was executed")
                self.pos += 1
                try:
                    done = handler(self)
                except DataFormatError:
                    raise
                except (IndexError, ValueError, TypeError, OverflowError) as e:  # a too-short stack, bad utf-8...
                    self.fail(f"malformed pickle at opcode {_OPNAMES[op]}: {e!r}")
                for qid, d in self.out:
                    keys, vals = zip(*d) if d else ((), ())
                    yield qid, np.concatenate((np.empty(0, np.int64),) + keys), np.concatenate((np.empty(0),) + vals)
                self.out = []
                if done:
                    return

    # input
    def refill(self, n):
        parts, size = [self.buf[self.pos:]], len(self.buf) - self.pos
        try:
            while size < n and (chunk := next(self.chunks, None)) is not None:
                parts.append(chunk)
                size += len(chunk)
        except _GZIP_ERRORS as e:
            self.fail(f"truncated or corrupt gzip file ({e})")
        self.buf, self.base, self.pos = b"".join(parts), self.base + self.pos, 0
        self.eof = size < n

    def take(self, n):
        if len(self.buf) - self.pos < n:  # only long strings get here
            self.refill(n)
            if len(self.buf) < n:
                self.fail("the file ends in the middle of an opcode (truncated?)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def length(self, width):
        n = _u(self.take(width))
        if n > _MAX_STRING:  # no score pickle holds long strings; do not let one make us read gigabytes
            self.fail(f"refused a string of {n} bytes")
        return n

    def take_line(self):
        end = self.buf.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            self.fail("expected a short newline-terminated name")
        line, self.pos = self.buf[self.pos:end], end + 1
        return line.decode("ascii", "replace")

    # stack and memo
    def push(self, v):
        self.stack.append(v)

    def pop_mark(self):
        if not self.marks:
            self.fail("MARK expected")
        k = self.marks.pop()
        items, self.stack[k:] = self.stack[k:], []
        return items

    def pop_n(self, n):
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < n:
            raise IndexError
        items, self.stack[-n:] = self.stack[-n:], []
        return items

    def put(self, idx):
        self.nput += 1
        v = self.stack[-1]
        # Keep what a later entry may refer to; drop numbers, bytes, tuples and dicts (the bulk of the file).
        if (type(v) in (_DType, str) or v in _CALLABLES) and len(self.memo) < _MEMO_LIMIT:
            self.memo[idx] = v

    def get(self, idx):
        if idx not in self.memo:
            self.fail(f"refers back to memo entry {idx}, which this streaming reader does not keep (it keeps "
                      "globals, dtypes and strings only); save the scores as a plain dict of dicts of floats")
        self.push(self.memo[idx])

    # opcodes with a meaning beyond pushing a value
    def mark(self):
        self.marks.append(len(self.stack))
        if self.stack and type(self.stack[-1]) is _Dict:
            self.fast_batch(self.stack[-1])

    def setitems(self, items):
        target = self.stack[-1] if self.stack else None
        keys, vals = items[::2], items[1::2]
        if type(target) is _Dict:
            if not all(type(k) is int for k in keys) or not all(type(v) in (int, float) for v in vals):
                self.fail("expected scores[qid] to map int pids to numbers, got "
                          f"{sorted({type(x).__name__ for x in items})}")
            target.append((np.array(keys, np.int64), np.array(vals, np.float64)))
        elif type(target) is _Root:
            if not all(type(k) is int for k in keys) or not all(type(v) is _Dict for v in vals):
                self.fail("expected the pickle of a dict scores[qid][pid] -> float with int qids, got "
                          f"{sorted({type(x).__name__ for x in items})}")
            self.out += zip(keys, vals)
        else:
            self.fail("SETITEM(S) on something that is not a dict")

    def find_class(self, module, name):
        func = _GLOBALS.get((module, name))
        if func is None:
            self.fail(f"refused to load global {module}.{name}: a teacher-score pickle may only hold numbers "
                      "(numpy scalars included); nothing was executed")
        self.push(func)

    def reduce(self):
        func, args = self.pop_n(2)
        if func not in _CALLABLES or type(args) is not tuple:
            self.fail(f"refused REDUCE of {type(func).__name__}: only numpy scalars are rebuilt")
        try:
            self.push(func(*args))
        except (ValueError, TypeError) as e:
            self.fail(f"refused REDUCE: {e}")

    def build(self):
        obj, state = self.pop_n(2)
        if type(obj) is not _DType:
            self.fail(f"refused BUILD of {type(obj).__name__}: only numpy dtypes are rebuilt")
        try:
            obj.setstate(state)
        except ValueError as e:
            self.fail(f"refused BUILD: {e}")
        self.push(obj)

    def stop(self):
        if len(self.stack) != 1 or type(self.stack[0]) is not _Root or self.marks:
            self.fail("expected the pickle of one dict scores[qid][pid] -> float")
        return True

    # Fast path: right after the MARK of an inner dict, decode its `(key value)* SETITEMS` batch with numpy.
    # Entries of one layout (e.g. BININT key + numpy float32 value) repeat at a fixed stride, so rows of the
    # batch are compared at the bytes that decide the layout and decoded as columns; a key of another width
    # starts a new run. Taken only if the whole batch reads so, i.e. exactly as the VM would read it.
    def fast_batch(self, target):
        buf, p, keys, vals, puts = self.buf, self.pos, [], [], 0
        while p < len(buf) and buf[p] != 0x75:  # SETITEMS
            layout = self.layout(p)
            if layout is None:
                return
            stride, const, (ks, kdt), (vs, vdt), nput = layout
            n = min(1024, (len(buf) - p) // stride)
            rows = np.frombuffer(buf, np.uint8, n * stride, p).reshape(n, stride)
            same = (rows[:, const] == rows[0, const]).all(1)
            n = n if same.all() else int(same.argmin())
            keys.append(rows[:n, ks:ks + kdt.itemsize].copy().view(kdt).ravel())
            vals.append(rows[:n, vs:vs + vdt.itemsize].copy().view(vdt).ravel())
            puts, p = puts + nput * n, p + n * stride
        if p >= len(buf):
            return
        if keys:  # `MARK SETITEMS` with nothing between: pickle writes it after a full last batch of 1000
            target.append((np.concatenate(keys).astype(np.int64), np.concatenate(vals).astype(np.float64)))
        self.marks.pop()
        self.nput += puts
        self.pos = p + 1  # past SETITEMS

    def layout(self, p):
        """(stride, layout-deciding byte positions, key (offset, dtype), value (offset, dtype), memo puts) of the
        (key, value) entry at p, or None if it is not one the fast path reads."""
        mk = _TOKEN.match(self.buf, p)
        mv = mk and _TOKEN.match(self.buf, mk.end())
        kt = mv and self.template(mk.group())
        vt = kt and self.template(mv.group())
        if not vt or kt[1].kind == "f":
            return None
        n = len(mk.group())
        const = np.array(kt[2] + [n + c for c in vt[2]])
        return n + len(mv.group()), const, kt[:2], (n + vt[0], vt[1]), kt[3] + vt[3]

    def template(self, tok):
        """(payload offset, numpy dtype, positions of the bytes that decide the layout, memo puts) of a number."""
        if tok[0] in _SIMPLE:
            return 1, _SIMPLE[tok[0]], [0], 0
        p, refs = 0, []
        for _ in range(2):  # BINGET / LONG_BINGET of the scalar reconstructor and of the dtype
            w = 2 if tok[p] == ord("h") else 5
            refs.append(int.from_bytes(tok[p + 1:p + w], "little"))
            p += w
        func, dtype = self.memo.get(refs[0]), self.memo.get(refs[1])
        if func is not _scalar or type(dtype) is not _DType or tok[p + 1] != dtype.np.itemsize:
            return None
        start = p + 2
        const, p = list(range(start)), start + tok[p + 1]
        for _ in range(3):  # put, TUPLE2, put, REDUCE, put: the opcodes decide, not the varying memo indices
            const.append(p)
            p += _PUT_WIDTH[tok[p]]
            if p < len(tok):
                const.append(p)
                p += 1
        return start, dtype.np, const, 3


def _u(b, signed=False):
    return int.from_bytes(b, "little", signed=signed)


_OPS = {
    0x80: lambda s: s.take(1) and None,                                             # PROTO
    0x95: lambda s: s.take(8) and None,                                             # FRAME: a length hint only
    ord("."): _ScorePickle.stop,                                                   # STOP
    ord("("): _ScorePickle.mark,                                                   # MARK
    ord("}"): lambda s: s.push(_Root() if not s.stack and not s.marks else _Dict()),  # EMPTY_DICT
    ord("s"): lambda s: s.setitems(s.pop_n(2)),                                    # SETITEM
    ord("u"): lambda s: s.setitems(s.pop_mark()),                                  # SETITEMS
    ord(")"): lambda s: s.push(()),                                                # EMPTY_TUPLE
    ord("t"): lambda s: s.push(tuple(s.pop_mark())),                               # TUPLE
    0x85: lambda s: s.push(tuple(s.pop_n(1))),                                     # TUPLE1
    0x86: lambda s: s.push(tuple(s.pop_n(2))),                                     # TUPLE2
    0x87: lambda s: s.push(tuple(s.pop_n(3))),                                     # TUPLE3
    ord("N"): lambda s: s.push(None),                                              # NONE
    0x88: lambda s: s.push(True),                                                  # NEWTRUE
    0x89: lambda s: s.push(False),                                                 # NEWFALSE
    ord("J"): lambda s: s.push(_u(s.take(4), signed=True)),                        # BININT
    ord("K"): lambda s: s.push(s.take(1)[0]),                                      # BININT1
    ord("M"): lambda s: s.push(_u(s.take(2))),                                     # BININT2
    0x8A: lambda s: s.push(_u(s.take(s.take(1)[0]), signed=True)),                 # LONG1
    ord("G"): lambda s: s.push(float(np.frombuffer(s.take(8), ">f8")[0])),         # BINFLOAT
    0x8C: lambda s: s.push(s.take(s.take(1)[0]).decode("utf-8")),                  # SHORT_BINUNICODE
    ord("X"): lambda s: s.push(s.take(s.length(4)).decode("utf-8")),              # BINUNICODE
    ord("C"): lambda s: s.push(s.take(s.take(1)[0])),                              # SHORT_BINBYTES
    ord("B"): lambda s: s.push(s.take(s.length(4))),                               # BINBYTES
    ord("c"): lambda s: s.find_class(s.take_line(), s.take_line()),                # GLOBAL
    0x93: lambda s: s.find_class(*[x if type(x) is str else "?" for x in s.pop_n(2)]),  # STACK_GLOBAL
    ord("R"): _ScorePickle.reduce,                                                 # REDUCE
    ord("b"): _ScorePickle.build,                                                  # BUILD
    0x94: lambda s: s.put(s.nput),                                                 # MEMOIZE
    ord("q"): lambda s: s.put(s.take(1)[0]),                                       # BINPUT
    ord("r"): lambda s: s.put(_u(s.take(4))),                                      # LONG_BINPUT
    ord("h"): lambda s: s.get(s.take(1)[0]),                                       # BINGET
    ord("j"): lambda s: s.get(_u(s.take(4))),                                      # LONG_BINGET
}


# --- parquet (the HF copies) ------------------------------------------------------------------------------

def _is_parquet(path) -> bool:
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
        raise FileNotFoundError(f"no parquet files in {path}")
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


# --- BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) -----------------------------------------

class IdMap:
    """BEIR ids are strings: a decimal id without leading zeros keeps its value, any other string gets a
    negative number (-1, -2, ... in order of first sight), so int ids never collide with mapped ones."""

    def __init__(self, mapped: dict[str, int] | None = None):
        self.mapped = dict(mapped or {})
        self._names = {v: k for k, v in self.mapped.items()}

    def __call__(self, s: str) -> int:
        if s.isdigit() and s.isascii() and (s == "0" or s[0] != "0") and len(s) < 19:
            return int(s)
        if s not in self.mapped:
            self.mapped[s] = -(len(self.mapped) + 1)
            self._names[self.mapped[s]] = s
        return self.mapped[s]

    def name(self, i: int) -> str:
        return self._names[i] if i < 0 else str(i)


def _iter_jsonl(path, on_error, skipped, required=("_id", "text")):
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        try:
            d = json.loads(line)
            if not all(type(d.get(k)) is str for k in required):
                raise ValueError
        except ValueError:
            lines.bad(n, f"expected a JSON object with string fields {list(required)}", line)
            continue
        yield d


def iter_beir_corpus(path, ids: IdMap, on_error="raise", skipped=None) -> Iterator[tuple[int, str]]:
    """(id, "title text") from a BEIR corpus.jsonl (title and text joined by a space, as BEIR encodes them)."""
    for d in _iter_jsonl(path, on_error, skipped):
        yield ids(d["_id"]), beir_text(d)


def beir_text(d: dict) -> str:
    """A BEIR document as BEIR and MTEB encode it: title and text joined by a space."""
    title = (d.get("title") or "").strip()
    return f"{title} {d['text']}" if title else d["text"]


def iter_beir_queries(path, ids: IdMap, on_error="raise", skipped=None) -> Iterator[tuple[int, str]]:
    for d in _iter_jsonl(path, on_error, skipped):
        yield ids(d["_id"]), d["text"]


def iter_beir_qrels_names(path, on_error="raise", skipped=None) -> Iterator[tuple[str, str, int]]:
    """(query id, corpus id, grade) from a BEIR qrels/<split>.tsv (`query-id \\t corpus-id \\t score`, a header)."""
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.decode("utf-8", "replace").split("\t")
        if n == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue
        try:
            if len(parts) != 3:
                raise ValueError
            yield parts[0], parts[1], int(parts[2])
        except ValueError:
            lines.bad(n, "expected `query-id <TAB> corpus-id <TAB> integer score`", line)


def iter_beir_qrels(path, qids: IdMap, pids: IdMap, on_error="raise", skipped=None) -> Iterator[tuple[int, int, int]]:
    for qid, pid, grade in iter_beir_qrels_names(path, on_error, skipped):
        yield qids(qid), pids(pid), grade


def is_jsonl(path) -> bool:
    return _peek(path, 64).lstrip()[:1] == b"{"


def iter_collection(path) -> Iterator[tuple[str, str]]:
    """(id as a string, text) of a collection: MS MARCO `id \\t text` (or parquet) or a BEIR corpus.jsonl."""
    if not _is_parquet(path) and is_jsonl(path):
        for d in _iter_jsonl(path, "raise", None):
            yield d["_id"], beir_text(d)
    else:
        for i, text in iter_id_text(path):
            yield str(i), text


def iter_pair_scores(path, on_error="raise", skipped=None) -> Iterator[tuple[str, str, float]]:
    """(query id, passage id, score) from `query-id \\t corpus-id \\t score` lines (task=score writes these)."""
    lines = _Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.decode("utf-8", "replace").split("\t")
        try:
            if len(parts) != 3 or not math.isfinite(score := float(parts[2])):
                raise ValueError
            yield parts[0], parts[1], score
        except ValueError:
            lines.bad(n, "expected `query-id <TAB> corpus-id <TAB> finite score`", line)
