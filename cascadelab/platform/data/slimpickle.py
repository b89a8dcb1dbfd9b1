"""A restricted, streaming unpickler for RecFlow's ``request_id_dict`` that keeps only what is read.

``pickle.load`` of a full day's candidate dict holds every stage's whole candidate array (~200 rows of 8
int64 per stage and request, ~13 KB), although the converter reads only the first ``SLOTS`` rows of each.
Cutting the arrays after ``pickle.load`` does not lower the peak, and cutting them inside a
``pickle.Unpickler`` subclass does not either: the unpickler's memo keeps every array's raw bytes alive
until the load ends. This loader walks the opcodes itself (``pickletools.genops``), builds each array,
keeps a copy of its first ``max_rows`` rows and drops the raw bytes at once (neither byte strings nor the
argument/state tuples that carry them are kept in its memo), so the loaded dict costs about ``max_rows``
rows per array plus the Python objects (``cascadelab bench convert`` measures the peak RSS).

It accepts the pickles NumPy and CPython write for dicts/lists/tuples of str, int, float, bytes and
ndarrays (protocols 2 to 5: ``_reconstruct`` + ``__setstate__``, or ``_frombuffer``) and refuses every
other global with a DataError, so it is also safer than ``pickle.load``. It runs in pure Python, one
step per opcode.
"""

from __future__ import annotations

import importlib
import pickletools
import warnings
from typing import IO, Any

import numpy as np

from cascadelab.platform.data.schema import DataError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("__builtin__", "bytes"), ("__builtin__", "bytearray"),
}
_BIG_BYTES = 64  # byte strings above this size (array payloads) are never kept in the memo
_SCALARS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT",
            "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINBYTES", "BINBYTES",
            "BINBYTES8", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class _Dropped:
    """Memo placeholder for a large byte string that was consumed by the array built from it."""


def _resolve(module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
        raise DataError(f"refers to '{module}.{name}', expected only NumPy arrays inside dicts, lists and tuples")
    with warnings.catch_warnings():  # numpy.core is a deprecated alias of numpy._core in NumPy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(importlib.import_module("builtins" if module == "__builtin__" else module), name)


def _kept(a: Any, max_rows: int) -> Any:
    """A built ndarray as kept: 2-D ones with more rows are cut to a copy of their first ``max_rows``."""
    if isinstance(a, np.ndarray) and a.ndim == 2 and a.shape[0] > max_rows:
        return a[:max_rows].copy()
    return a


def _payload(obj: Any) -> bool:
    return isinstance(obj, (bytes, bytearray)) and len(obj) > _BIG_BYTES


def _pairs(items: list[Any]):
    return zip(items[0::2], items[1::2], strict=True)


class _Machine:
    """The pickle virtual machine restricted to containers, scalars and NumPy arrays.

    State as in ``pickle.Unpickler``: the value ``stack``, the ``marks`` (stack heights at each MARK) and
    the ``memo``; ``array_keys`` maps ``id(ndarray)`` to its memo keys, so that a trimmed copy replaces
    the full array there too. Each opcode is one method of :data:`_OPS`.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.array_keys: dict[int, list[int]] = {}

    def run(self, f: IO[bytes]) -> Any:
        stack = self.stack
        for op, arg, _pos in pickletools.genops(f):
            name = op.name
            if name in _SCALARS:
                stack.append(arg)
            elif name == "STOP":
                break
            else:
                step = _OPS.get(name)
                if step is None:
                    raise DataError(f"uses pickle opcode {name}, which this loader does not support")
                step(self, name, arg)
        if len(stack) != 1:
            raise DataError("is not a complete pickle")
        return stack[0]

    # stack and marks

    def pop_mark(self) -> list[Any]:
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def skip(self, name: str, arg: Any) -> None:  # PROTO, FRAME
        pass

    def mark(self, name: str, arg: Any) -> None:
        self.marks.append(len(self.stack))

    def pop(self, name: str, arg: Any) -> None:
        self.stack.pop()

    def pop_to_mark(self, name: str, arg: Any) -> None:
        self.pop_mark()

    def dup(self, name: str, arg: Any) -> None:
        self.stack.append(self.stack[-1])

    def constant(self, name: str, arg: Any) -> None:  # NONE, NEWTRUE, NEWFALSE
        self.stack.append(_CONSTANTS[name])

    def bytearray8(self, name: str, arg: Any) -> None:
        self.stack.append(bytearray(arg))

    # containers

    def dict_(self, name: str, arg: Any) -> None:  # EMPTY_DICT, DICT
        self.stack.append({} if name == "EMPTY_DICT" else dict(_pairs(self.pop_mark())))

    def list_(self, name: str, arg: Any) -> None:  # EMPTY_LIST, LIST
        self.stack.append([] if name == "EMPTY_LIST" else self.pop_mark())

    def tuple_(self, name: str, arg: Any) -> None:  # EMPTY_TUPLE, TUPLE, TUPLE1..3
        if name == "EMPTY_TUPLE":
            self.stack.append(())
        elif name == "TUPLE":
            self.stack.append(tuple(self.pop_mark()))
        else:
            n = int(name[-1])
            self.stack[-n:] = [tuple(self.stack[-n:])]

    def setitem(self, name: str, arg: Any) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self.stack[-1][key] = value

    def setitems(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.stack[-1].update(_pairs(items))

    def append(self, name: str, arg: Any) -> None:
        value = self.stack.pop()
        self.stack[-1].append(value)

    def appends(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.stack[-1].extend(items)

    # memo: array payloads (and the tuples that carry them) are never kept

    def put(self, name: str, arg: Any) -> None:  # MEMOIZE, PUT, BINPUT, LONG_BINPUT
        key = len(self.memo) if name == "MEMOIZE" else int(arg)
        obj = self.stack[-1]
        if _payload(obj) or (isinstance(obj, tuple) and any(_payload(x) for x in obj)):
            self.memo[key] = _Dropped
            return
        self.memo[key] = obj
        if isinstance(obj, np.ndarray):
            self.array_keys.setdefault(id(obj), []).append(key)

    def get(self, name: str, arg: Any) -> None:  # GET, BINGET, LONG_BINGET
        obj = self.memo[int(arg)]
        if obj is _Dropped:
            raise DataError("shares an array buffer between objects, which this loader does not keep")
        self.stack.append(obj)

    # objects: allowed globals only; every built array is trimmed at once

    def global_(self, name: str, arg: Any) -> None:  # GLOBAL, STACK_GLOBAL
        if name == "GLOBAL":
            module, _, attr = arg.partition(" ")
        else:
            attr = self.stack.pop()
            module = self.stack.pop()
        self.stack.append(_resolve(module, attr))

    def reduce(self, name: str, arg: Any) -> None:
        args = self.stack.pop()
        self.stack[-1] = _kept(self.stack[-1](*args), self.max_rows)

    def newobj(self, name: str, arg: Any) -> None:  # NEWOBJ, NEWOBJ_EX
        kwargs = self.stack.pop() if name == "NEWOBJ_EX" else {}
        args = self.stack.pop()
        cls = self.stack[-1]
        self.stack[-1] = cls.__new__(cls, *args, **kwargs)

    def build(self, name: str, arg: Any) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        inst.__setstate__(state)
        if isinstance(inst, np.ndarray):
            trimmed = _kept(inst, self.max_rows)
            self.stack[-1] = trimmed
            for key in self.array_keys.pop(id(inst), ()):
                self.memo[key] = trimmed


_OPS = {
    **dict.fromkeys(("PROTO", "FRAME"), _Machine.skip),
    "MARK": _Machine.mark, "POP": _Machine.pop, "POP_MARK": _Machine.pop_to_mark, "DUP": _Machine.dup,
    **dict.fromkeys(_CONSTANTS, _Machine.constant), "BYTEARRAY8": _Machine.bytearray8,
    **dict.fromkeys(("EMPTY_DICT", "DICT"), _Machine.dict_),
    **dict.fromkeys(("EMPTY_LIST", "LIST"), _Machine.list_),
    **dict.fromkeys(("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"), _Machine.tuple_),
    "SETITEM": _Machine.setitem, "SETITEMS": _Machine.setitems,
    "APPEND": _Machine.append, "APPENDS": _Machine.appends,
    **dict.fromkeys(("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"), _Machine.put),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _Machine.get),
    **dict.fromkeys(("GLOBAL", "STACK_GLOBAL"), _Machine.global_),
    "REDUCE": _Machine.reduce, **dict.fromkeys(("NEWOBJ", "NEWOBJ_EX"), _Machine.newobj),
    "BUILD": _Machine.build,
}


def load_trimmed(f: IO[bytes], max_rows: int) -> Any:
    """Unpickle ``f`` keeping only the first ``max_rows`` rows of every 2-D array; raises DataError on a
    global outside the allowed NumPy constructors, an unsupported opcode or an incomplete pickle."""
    return _Machine(max_rows).run(f)
