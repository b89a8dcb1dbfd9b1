"""A restricted, streaming unpickler for RecFlow's ``request_id_dict`` that keeps only what is read.

``pickle.load`` of a full day's candidate dict holds every stage's whole candidate array (~200 rows per
request, ~4 GB for a day of ~250k requests), although the converter reads only the first ``SLOTS`` rows
of each. Cutting the arrays after ``pickle.load`` does not lower the peak, and cutting them inside a
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


def load_trimmed(f: IO[bytes], max_rows: int) -> Any:
    """Unpickle ``f`` keeping only the first ``max_rows`` rows of every 2-D array; raises DataError."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    array_keys: dict[int, list[int]] = {}  # id(ndarray) -> memo keys, to swap in its trimmed copy

    def put(key: int) -> None:
        obj = stack[-1]
        if _payload(obj) or (isinstance(obj, tuple) and any(_payload(x) for x in obj)):
            memo[key] = _Dropped  # a raw array payload, or the argument/state tuple that carries one
            return
        memo[key] = obj
        if isinstance(obj, np.ndarray):
            array_keys.setdefault(id(obj), []).append(key)

    def replace_top(new: Any) -> None:
        old = stack[-1]
        stack[-1] = new
        for key in array_keys.pop(id(old), ()):
            memo[key] = new

    def pop_mark() -> list[Any]:
        k = marks.pop()
        items = stack[k:]
        del stack[k:]
        return items

    for op, arg, _pos in pickletools.genops(f):
        name = op.name
        if name in _SCALARS:
            stack.append(arg)
        elif name in ("PROTO", "FRAME"):
            continue
        elif name == "STOP":
            break
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("EMPTY_DICT", "DICT"):
            stack.append({} if name == "EMPTY_DICT" else dict(_pairs(pop_mark())))
        elif name in ("EMPTY_LIST", "LIST"):
            stack.append([] if name == "EMPTY_LIST" else pop_mark())
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            stack[-n:] = [tuple(stack[-n:])]
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "BYTEARRAY8":
            stack.append(bytearray(arg))
        elif name == "SETITEM":
            value = stack.pop()
            key = stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(_pairs(items))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "MEMOIZE":
            put(len(memo))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            put(int(arg))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            obj = memo[int(arg)]
            if obj is _Dropped:
                raise DataError("shares an array buffer between objects, which this loader does not keep")
            stack.append(obj)
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(_resolve(module, attr))
        elif name == "STACK_GLOBAL":
            attr = stack.pop()
            module = stack.pop()
            stack.append(_resolve(module, attr))
        elif name == "REDUCE":
            args = stack.pop()
            stack[-1] = _kept(stack[-1](*args), max_rows)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            kwargs = stack.pop() if name == "NEWOBJ_EX" else {}
            args = stack.pop()
            cls = stack[-1]
            stack[-1] = cls.__new__(cls, *args, **kwargs)
        elif name == "BUILD":
            state = stack.pop()
            inst = stack[-1]
            inst.__setstate__(state)
            if isinstance(inst, np.ndarray):
                replace_top(_kept(inst, max_rows))
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        else:
            raise DataError(f"uses pickle opcode {name}, which this loader does not support")
    if len(stack) != 1:
        raise DataError("is not a complete pickle")
    return stack[0]


def _payload(obj: Any) -> bool:
    return isinstance(obj, (bytes, bytearray)) and len(obj) > _BIG_BYTES


def _pairs(items: list[Any]):
    return zip(items[0::2], items[1::2], strict=True)
