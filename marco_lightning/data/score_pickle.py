"""The teacher-score pickle (`scores[qid][pid] -> float`, 160M entries for MS MARCO), read safely and streaming.

The score pickle is read by a restricted, streaming pickle VM. pickle.load would run any code the file asks for, and
would build a 160M-entry dict (17-25 GB). This VM interprets only the opcodes a dict of dicts of numbers needs and
allows exactly three callables -- numpy's scalar reconstructor, numpy.dtype, and the latin1 `_codecs.encode` of
protocol-2 bytes -- through stand-ins that never call numpy's own unpickling code. Each inner dict is handed out as
arrays once complete, and its memo keeps only the few small objects a later entry may refer to (globals, dtypes,
strings): a file that refers back to anything else fails loudly. The bulk of the entries (int keys, Python-float or
numpy-scalar values) is decoded by a regex + numpy path.
"""
from __future__ import annotations

import pickletools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from marco_lightning.data.formats import GZIP_ERRORS, DataFormatError, open_binary


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


class ScorePickle:
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
        except GZIP_ERRORS as e:
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
    ord("."): ScorePickle.stop,                                                   # STOP
    ord("("): ScorePickle.mark,                                                   # MARK
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
    ord("R"): ScorePickle.reduce,                                                 # REDUCE
    ord("b"): ScorePickle.build,                                                  # BUILD
    0x94: lambda s: s.put(s.nput),                                                 # MEMOIZE
    ord("q"): lambda s: s.put(s.take(1)[0]),                                       # BINPUT
    ord("r"): lambda s: s.put(_u(s.take(4))),                                      # LONG_BINPUT
    ord("h"): lambda s: s.get(s.take(1)[0]),                                       # BINGET
    ord("j"): lambda s: s.get(_u(s.take(4))),                                      # LONG_BINGET
}
