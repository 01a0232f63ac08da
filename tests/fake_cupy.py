"""A CuPy-shaped fake that runs on the CPU, built only from names the real CuPy has, with their calling forms.

It exists so that the GPU preprocessing path (``GpuBatchPacker``, ``self_test``, the device resize, a
device batch handed to ``infer_device``) runs in the CPU suite with CuPy's semantics rather than NumPy's:

* device arrays are not host arrays: ``asarray`` copies host -> "device", ``.get()``/``asnumpy`` copy back,
  ``np.asarray(device_array)`` raises CuPy's TypeError (implicit conversion), NumPy arrays are refused as
  operands of device math (CuPy: "Unsupported type"), ``.set()`` takes a NumPy array of the same shape and
  dtype only; ``.data.ptr`` is an int (a property of ``MemoryPointer``);
* ``cuda.alloc_pinned_memory(n)`` returns a ``PinnedMemoryPointer`` whose ``size`` is a *method* and
  ``ptr`` a property, which exports the buffer protocol (``np.frombuffer(pinned, ...)``), at least ``n``
  bytes long (rounded up: a block from CuPy's pool may be larger than asked);
* ``cuda.Stream(non_blocking=...)``: ``synchronize()``, a context manager making it the thread's current
  stream (``cuda.get_current_stream()``), ``ptr``/``device_id`` set per instance as on the real class.

:func:`problems` compares the fake with a record of the real CuPy (``fixtures/cupy_api/*.json``, written
from the real wheels by ``fixtures/make_cupy_api.py``): every public name (and dunder the record knows) of
the fake module, submodules and classes must exist there with the same kind (method / property /
attribute / class / function / module), every parameter of a fake function must be one the real one
takes, and a class the real one exports a buffer from must export one here. :func:`make_fake_cupy`
refuses to build a fake that fails it. ``events`` records copies, synchronisations and on which stream
device writes ran, for the tests to check ordering.
"""

from __future__ import annotations

import ctypes
import inspect
import itertools
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "cupy_api"
VERSIONS = ("cupy-cuda12x-13.6", "cupy-cuda12x-14.2", "cupy-cuda13x-13.6", "cupy-cuda13x-14.2")
DTYPES = ("uint8", "uint16", "int32", "int64", "float32", "float64", "bool_")
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
            "array explicitly.")  # CuPy's message, word for word


def load_api(version: str) -> dict:
    return json.loads((FIXTURES / f"{version}.json").read_text())


class _State(threading.local):
    def __init__(self):
        self.streams: list = []  # the current-stream stack of this thread (``with stream:``)


_state = _State()
# ("alloc" | "write", the current stream), ("set" | "synchronize", the stream), ("pinned", bytes asked for)
events: list[tuple] = []
_ptrs = itertools.count(0x7F0000001000, 0x1000)


def _current():
    return _state.streams[-1] if _state.streams else Stream.null


def _dev(x):
    """An operand of device math: device arrays and scalars, never a host array (CuPy refuses them)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    return x


def _wrap(a):
    return ndarray._of(np.asarray(a))


# ------------------------------------------------------------------------------------------ device memory


class MemoryPointer:
    """``ndarray.data``: ``ptr`` and ``device_id`` are properties (Cython readonly attributes)."""

    __slots__ = ("_arr",)

    def __init__(self, mem, offset=0):
        self._arr = mem

    @property
    def ptr(self) -> int:
        return int(self._arr.ctypes.data)

    @property
    def device_id(self) -> int:
        return 0


class ndarray:  # CuPy's name
    """A device array: a NumPy array the host cannot reach except through ``get``/``asnumpy``/``set``."""

    __slots__ = ("_a", "__weakref__")

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype, order=order)

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    # ---- properties (getset descriptors on the real class)
    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def itemsize(self):
        return self._a.itemsize

    @property
    def strides(self):
        return self._a.strides

    @property
    def T(self):  # CuPy's name
        return ndarray._of(self._a.T)

    @property
    def data(self):
        return MemoryPointer(self._a)

    # ---- host <-> device
    def get(self, stream=None, order="C", out=None, blocking=True):
        if stream is not None:
            events.append(("get", stream))
        return np.array(self._a, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self._a.shape}, new shape: {arr.shape}")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"Dtype mismatch. Old dtype: {self._a.dtype}, new dtype: {arr.dtype}")
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(f"stream must be a cupy.cuda.Stream, got {type(stream)}")
        events.append(("set", stream if stream is not None else _current()))
        self._a[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # a NumPy ufunc with a device operand
        for x in inputs:
            _dev(x)
        return ndarray._of(getattr(ufunc, method)(*(_dev(x) for x in inputs), **kwargs))

    # ---- array methods
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return ndarray._of(self._a.astype(dtype, order=order, copy=copy))

    def reshape(self, *shape, order="C"):
        return ndarray._of(self._a.reshape(*shape, order=order))

    def copy(self, order="C"):
        return ndarray._of(self._a.copy(order=order))

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims))

    def max(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.max(axis=axis, keepdims=keepdims))

    def fill(self, value):
        self._a.fill(value)

    # ---- Python protocols
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray._of(r) for r in self._a)

    def __getitem__(self, key):
        key = tuple(_dev(k) for k in key) if isinstance(key, tuple) else _dev(key)
        return _wrap(self._a[key])

    def __setitem__(self, key, value):
        events.append(("write", _current()))
        self._a[key] = value._a if isinstance(value, ndarray) else value

    def __repr__(self):
        return f"array({self._a!r}) on the fake device"

    def __bool__(self):
        return bool(self._a)

    def __int__(self):
        return int(self._a)

    def __float__(self):
        return float(self._a)

    def __neg__(self):
        return ndarray._of(-self._a)

    def __abs__(self):
        return ndarray._of(abs(self._a))


def _binary(name: str):
    op = getattr(np.ndarray, name)

    def method(self, other):
        return _wrap(op(self._a, _dev(other)))

    method.__name__ = name
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__floordiv__", "__matmul__", "__rmatmul__", "__rshift__", "__lshift__", "__and__", "__or__",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ndarray, _name, _binary(_name))
ndarray.__hash__ = None  # type: ignore[assignment]  # as CuPy's (it defines __eq__)


# ------------------------------------------------------------------------------------------ module functions


def _alloc(a: np.ndarray) -> ndarray:
    events.append(("alloc", _current()))  # CuPy's pool keeps a block in the arena of the stream current here
    return ndarray._of(a)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return _alloc(np.array(a, dtype=dtype, order=order or "K", copy=True))  # host -> device: a copy


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    src = obj._a if isinstance(obj, ndarray) else obj
    return _alloc(np.array(src, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None):
    return a.get(stream=stream, order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def empty(shape, dtype=float, order="C"):
    return _alloc(np.empty(shape, dtype, order=order))


def zeros(shape, dtype=float, order="C"):
    return _alloc(np.zeros(shape, dtype, order=order))


def einsum(subscripts, *operands, dtype=None, optimize=False):
    return _wrap(np.einsum(subscripts, *(_dev(x) for x in operands), dtype=dtype, optimize=optimize))


def rint(x, out=None, casting="same_kind", dtype=None):
    return _wrap(np.rint(_dev(x), casting=casting, dtype=dtype))


def clip(a, a_min, a_max, out=None):
    return _wrap(np.clip(_dev(a), _dev(a_min), _dev(a_max)))


def repeat(a, repeats, axis=None):
    return _wrap(np.repeat(_dev(a), repeats, axis=axis))


# ------------------------------------------------------------------------------------------ cupy.cuda


class Stream:
    """``cupy.cuda.Stream``: a Python class on the real side too; ``ptr`` and ``device_id`` per instance."""

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else next(_ptrs)
        self.device_id = 0
        self._non_blocking = non_blocking

    def synchronize(self):
        events.append(("synchronize", self))

    def use(self):
        _state.streams[:] = [self]
        return self

    def __enter__(self):
        _state.streams.append(self)
        return self

    def __exit__(self, *exc):
        _state.streams.pop()

    def __repr__(self):
        return f"<fake Stream {self.ptr:#x}>"


Stream.null = Stream(null=True)  # type: ignore[attr-defined]


def get_current_stream(device_id=-1):
    return _current()


class PinnedMemoryPointer:
    """Page-locked host memory: ``size()`` a method, ``ptr`` a property, the buffer protocol exported (the
    instances are ctypes arrays of the allocated length; the real one exports ``size()`` bytes from ``ptr``)."""

    __slots__ = ()

    def size(self) -> int:
        return ctypes.sizeof(self)

    @property
    def ptr(self) -> int:
        return ctypes.addressof(self)


_pinned_types: dict[int, type] = {}


def alloc_pinned_memory(size):
    """At least ``size`` bytes (a pooled block may be larger; rounded up to 512 here, so code must not assume equality)."""
    n = max(512, -(-int(size) // 512) * 512)
    if n not in _pinned_types:
        _pinned_types[n] = type("PinnedMemoryPointer", (PinnedMemoryPointer, ctypes.c_uint8 * n), {"__slots__": ()})
    events.append(("pinned", int(size)))
    return _pinned_types[n]()


class Device:
    def __init__(self, device=None):
        self._id = 0 if device is None else int(device)

    @property
    def id(self):
        return self._id

    def synchronize(self):
        events.append(("synchronize", self))

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def getDeviceCount():  # CUDA's name
    return 1


def getDevice():
    return 0


# ------------------------------------------------------------------------------------------ assembly

_MODULE = {"ndarray": ndarray, "asarray": asarray, "array": array, "asnumpy": asnumpy, "empty": empty,
           "zeros": zeros, "einsum": einsum, "rint": rint, "clip": clip, "repeat": repeat,
           **{d: getattr(np, d) for d in DTYPES}}
_CUDA = {"Stream": Stream, "Device": Device, "MemoryPointer": MemoryPointer, "PinnedMemoryPointer": PinnedMemoryPointer,
         "alloc_pinned_memory": alloc_pinned_memory, "get_current_stream": get_current_stream}
_RUNTIME = {"getDeviceCount": getDeviceCount, "getDevice": getDevice}
CLASSES = {"ndarray": ndarray, "Stream": Stream, "Device": Device, "MemoryPointer": MemoryPointer,
           "PinnedMemoryPointer": PinnedMemoryPointer}
_SKIP = {"__init__", "__new__", "__slots__", "__module__", "__doc__", "__dict__", "__weakref__", "__hash__",
         "__qualname__", "__firstlineno__", "__static_attributes__", "__annotations__"}


def recorder() -> types.ModuleType:
    """``fixtures/make_cupy_api.py``: its kind classifiers and signature parser are the tests' too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_cupy_api", FIXTURES.parent / "make_cupy_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _params(fn) -> list[str]:
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in ps if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]


def _check_params(where: str, fn, sig: str | None, parse) -> list[str]:
    if not sig:
        return []
    real = parse(sig)["params"]
    extra = [p for p in _params(fn) if p not in real]
    return [f"{where} takes {extra}, the real {sig} does not"] if extra else []


def problems(fake: types.ModuleType, api: dict) -> list[str]:
    """Where the fake differs from the record of a real CuPy: names it lacks, other kinds, parameters."""
    rec = recorder()
    kind_of_member, kind_of_name, parse = rec.kind_of_member, rec.kind_of_name, rec.parse_signature
    out = []
    mods = {"cupy": fake, "cupy.cuda": fake.cuda, "cupy.cuda.runtime": fake.cuda.runtime}
    for modname, mod in mods.items():
        real = api["modules"][modname]
        for name in (n for n in vars(mod) if not n.startswith("_") or n == "__version__"):
            mine = kind_of_name(mod, name)
            if real.get(name) != mine:
                out.append(f"{modname}.{name} is a {mine} in the fake, a {real.get(name)} in CuPy {api['version']}")
            out += _check_params(f"{modname}.{name}", getattr(mod, name),
                                 api["signatures"].get(f"{modname}.{name}"), parse)
    for key, cls in CLASSES.items():
        rec = api["classes"][key]
        for name in (n for n in vars(cls) if (not n.startswith("_") or n.startswith("__")) and n not in _SKIP):
            mine, real = kind_of_member(cls, name), rec["members"].get(name)
            if mine != real:
                out.append(f"{key}.{name} is a {mine} in the fake, a {real} in CuPy {api['version']}")
            elif mine == "method":
                out += _check_params(f"{key}.{name}", getattr(cls, name), rec["signatures"].get(name), parse)
        if "__init__" in vars(cls) and rec["constructor"]:
            out += _check_params(f"{key}()", cls.__init__, rec["constructor"], parse)
    inst = Stream()
    extra = sorted(n for n in vars(inst) if not n.startswith("_") and n not in api["classes"]["Stream"]["instance_attributes"])
    out += [f"a fake Stream has the instance attributes {extra}, the real one does not"] if extra else []
    try:
        memoryview(alloc_pinned_memory(1))
        buffers = True
    except TypeError:
        buffers = False
    if buffers != api["classes"]["PinnedMemoryPointer"]["buffer"]:
        out.append(f"PinnedMemoryPointer: buffer protocol {buffers} in the fake, {not buffers} in CuPy {api['version']}")
    return out


def make_fake_cupy(version: str = "cupy-cuda12x-14.2") -> types.ModuleType:
    """The fake ``cupy`` module (with ``cuda`` and ``cuda.runtime``) as CuPy ``version`` shapes it; refused
    if anything in it differs from that version's record."""
    api = load_api(version)
    cp = types.ModuleType("cupy", "fake CuPy (tests/fake_cupy.py)")
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    vars(cp).update(_MODULE, cuda=cuda, __version__=api["version"])
    vars(cuda).update(_CUDA, runtime=runtime)
    vars(runtime).update(_RUNTIME)
    cp._api = api
    cp._events = events
    wrong = problems(cp, api)
    if wrong:
        raise AssertionError(f"the fake CuPy is not CuPy {api['version']}: {wrong}")
    return cp


def install(monkeypatch, version: str = "cupy-cuda12x-14.2") -> types.ModuleType:
    """``import cupy`` gives the fake for the rest of the test."""
    cp = make_fake_cupy(version)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cp.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", cp.cuda.runtime)
    events.clear()
    return cp
