"""The CuPy code and the CuPy fake, checked against the real API surfaces of CuPy 13.6 and 14.2 (cupy-cuda12x and
cupy-cuda13x wheels; fixtures read from the real wheels by tests/fixtures/make_cupy_api.py), and the GPU
preprocessing path run through the fake (tests/fake_cupy.py) rather than with NumPy standing in for CuPy.

The walk: every attribute chain on ``cupy``/``cp`` (CuPy only) and ``xp``/``self.xp`` (NumPy *or* CuPy: the
name must exist in both, with the same calling form), and every attribute of an object known to be a CuPy one
(a name bound to ``cp.cuda.alloc_pinned_memory(...)``, ``cp.cuda.Stream(...)``, ``cp.empty(...)``; ``.data``
of a device array; the parameters listed in ``PARAMS``), in every module of the package. A name the release
lacks fails; so does the wrong calling form: a method read without calling it (``pinned.size < n``), a
property or attribute called (``stream.ptr()``), a keyword or more positional arguments than the recorded
signature takes, a ``with`` on an object without ``__enter__``, a buffer read of a class that exports none,
NumPy asked to convert a device array. ``xp.name`` inside ``... if hasattr(xp, "name") else ...`` is a CuPy-only use.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import textwrap
import types
from pathlib import Path

import fake_cupy
import numpy as np
import pytest

from cxr_edge.preprocess import PreprocessSpec

PKG = Path(__file__).resolve().parents[1] / "cxr_edge"
APIS = {v: fake_cupy.load_api(v) for v in fake_cupy.VERSIONS}
REC = fake_cupy.recorder()
PUBLIC_CLASSES = {path: key for key, path in REC.CLASSES.items()}  # "cupy.cuda.Stream" -> "Stream"
NUMPY_CLASSES = {"ndarray": np.ndarray}  # the CuPy classes that have a NumPy twin, for ``xp`` objects

CUPY_NAMES = {"cupy", "cp"}  # module names meaning CuPy only
XP_NAMES = {"xp"}  # NumPy or CuPy (also ``self.xp``)
# parameters that hold device arrays: (module, function, parameter) -> (lib, class)
PARAMS = {
    ("runtime/resize.py", "area_resize", "img"): ("xp", "ndarray"),
    ("runtime/resize.py", "gray_to_rgb", "img"): ("xp", "ndarray"),
    ("runtime/gpu_preprocess.py", "_place", "buf"): ("xp", "ndarray"),
    ("runtime/backends/tensorrt.py", "infer_device", "batch"): ("cupy", "ndarray"),  # past its hasattr guard
}
# what calls return (CuPy's docs; where the wheel's signature names a return type, it is checked below)
ARRAY_FUNCTIONS = {"asarray", "array", "ascontiguousarray", "empty", "empty_like", "zeros", "zeros_like", "ones",
                   "full", "einsum", "rint", "clip", "repeat", "matmul", "dot", "stack", "concatenate", "where",
                   "sum", "round", "around", "floor", "abs", "maximum", "minimum"}
RETURNS = {"cupy.cuda.alloc_pinned_memory": "PinnedMemoryPointer", "cupy.cuda.alloc": "MemoryPointer",
           "cupy.cuda.get_current_stream": "Stream", **{f"cupy.{f}": "ndarray" for f in ARRAY_FUNCTIONS}}
METHOD_RETURNS = {("ndarray", m): "ndarray" for m in ("astype", "reshape", "copy", "sum", "max", "min", "mean",
                                                      "ravel", "flatten", "transpose", "squeeze", "clip", "round",
                                                      "view", "T")}
METHOD_RETURNS[("ndarray", "data")] = "MemoryPointer"
BINOPS = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__",
          ast.FloorDiv: "__floordiv__", ast.MatMult: "__matmul__", ast.RShift: "__rshift__", ast.LShift: "__lshift__",
          ast.BitAnd: "__and__", ast.BitOr: "__or__", ast.Mod: "__mod__", ast.Pow: "__pow__"}


# ------------------------------------------------------------------------------------------ the walk


def _obj(lib: str, key: str) -> tuple:
    """An instance of CuPy class ``key``; one NumPy has no twin of (a Stream, a pinned buffer) is CuPy's whatever
    module made it."""
    return ("obj", lib if key in NUMPY_CLASSES else "cupy", key)


class Walk:
    """Types of expressions, as far as CuPy is concerned: ("mod", lib, "cupy.cuda"), ("cls", lib, "Stream"),
    ("obj", lib, "Stream"), ("func", lib, "cupy.cuda.alloc_pinned_memory"), ("meth", lib, "ndarray", "get");
    lib is "cupy" (CuPy only) or "xp" (NumPy or CuPy)."""

    def __init__(self, api: dict, source: str, rel: str):
        self.api, self.rel = api, rel
        self.tree = ast.parse(source)
        self.parent: dict = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.problems: list[str] = []
        self.uses: set[str] = set()

    # ---- where a node is
    def _func(self, node):
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None

    def _class(self, node):
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.ClassDef):
                return node
        return None

    def _guarded(self, node: ast.Attribute) -> bool:
        """``node`` (``X.name``) is in the true branch of ``if hasattr(X, "name")``."""
        want = ast.unparse(node.value)
        child, cur = node, self.parent.get(node)
        while cur is not None:
            if isinstance(cur, (ast.IfExp, ast.If)) and child is not cur.test and \
                    (child in cur.body if isinstance(cur.body, list) else child is cur.body):
                tests, probes = [cur.test], []
                while tests:  # the test, or a term of an ``and`` (not under a ``not``)
                    t = tests.pop()
                    if isinstance(t, ast.BoolOp) and isinstance(t.op, ast.And):
                        tests += t.values
                    else:
                        probes.append(t)
                for call in probes:
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "hasattr"
                            and len(call.args) == 2 and ast.unparse(call.args[0]) == want
                            and isinstance(call.args[1], ast.Constant) and call.args[1].value == node.attr):
                        return True
            child, cur = cur, self.parent.get(cur)
        return False

    # ---- environments: names and self.attributes bound to CuPy things
    def env(self, node) -> dict:
        env: dict = {}
        cls = self._class(node)
        if cls is not None:
            for a in ast.walk(cls):
                if isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Attribute):
                    t = self.typeof(a.value, env)
                    if t is not None:
                        env.setdefault(ast.unparse(a.targets[0]), t)
        scopes = []
        f = self._func(node)
        while f is not None:
            scopes.append(f)
            f = self._func(f)
        for f in [None, *reversed(scopes)]:  # the module, then outer functions first (closures)
            if f is None:
                body = [a for stmt in self.tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                                ast.ClassDef)) for a in ast.walk(stmt)]
            else:
                body = list(ast.walk(f))
                for arg in f.args.args + f.args.kwonlyargs:
                    hint = PARAMS.get((self.rel, f.name, arg.arg))
                    if hint:
                        env[arg.arg] = ("obj", *hint)
            for a in body:
                if isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Name) \
                        and a.targets[0].id not in CUPY_NAMES | XP_NAMES:
                    t = self.typeof(a.value, env)
                    if t is not None:
                        env[a.targets[0].id] = t
                elif isinstance(a, ast.withitem) and isinstance(a.optional_vars, ast.Name):
                    t = self.typeof(a.context_expr, env)
                    if t is not None and t[0] == "obj":
                        env[a.optional_vars.id] = t
        return env

    def typeof(self, node, env):
        if isinstance(node, ast.Name):
            if node.id in CUPY_NAMES:
                return ("mod", "cupy", "cupy")
            if node.id in XP_NAMES:
                return ("mod", "xp", "cupy")
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if ast.unparse(node) == "self.xp":
                return ("mod", "xp", "cupy")
            if ast.unparse(node) in env:
                return env[ast.unparse(node)]
            base = self.typeof(node.value, env)
            if base is None:
                return None
            lib = "cupy" if self._guarded(node) else base[1]
            if base[0] == "mod":
                path = f"{base[2]}.{node.attr}"
                kind = self.api["modules"].get(base[2], {}).get(node.attr)
                if kind == "module":
                    return ("mod", lib, path)
                if kind == "class" and path in PUBLIC_CLASSES:
                    return ("cls", lib, PUBLIC_CLASSES[path])
                if kind == "function":
                    return ("func", lib, path)
                return None
            if base[0] == "obj":
                kind = self.api["classes"][base[2]]["members"].get(node.attr)
                if kind == "method":
                    return ("meth", lib, base[2], node.attr)
                ret = METHOD_RETURNS.get((base[2], node.attr))
                return _obj(lib, ret) if ret and kind == "property" else None
            return None
        if isinstance(node, ast.Call):
            f = self.typeof(node.func, env)
            if f is None:
                return None
            if f[0] == "cls":
                return _obj(f[1], f[2])
            if f[0] == "func" and f[2] in RETURNS:
                return _obj(f[1], RETURNS[f[2]])
            if f[0] == "meth" and (f[2], f[3]) in METHOD_RETURNS:
                return _obj(f[1], METHOD_RETURNS[(f[2], f[3])])
            return None
        if isinstance(node, ast.BinOp):
            for side in (node.left, node.right):
                t = self.typeof(side, env)
                if t and t[0] == "obj" and t[2] == "ndarray":
                    return t
            return None
        if isinstance(node, ast.Subscript):
            t = self.typeof(node.value, env)
            return t if t and t[0] == "obj" and t[2] == "ndarray" else None
        if isinstance(node, ast.IfExp):
            return self.typeof(node.body, env) or self.typeof(node.orelse, env)
        return None

    # ---- checks
    def fail(self, node, msg: str) -> None:
        self.problems.append(f"{self.rel}:{node.lineno}: {ast.unparse(node)[:80]}: {msg}")

    def _numpy_kind(self, base, attr: str):
        """The kind NumPy gives the name an ``xp`` use reaches (None: NumPy lacks it)."""
        if base[0] == "mod":
            mod = np
            for part in base[2].split(".")[1:]:
                mod = getattr(mod, part, None)
            return REC.kind_of_name(mod, attr) if mod is not None else None
        if base[0] in ("obj", "cls") and base[2] in NUMPY_CLASSES:
            return REC.kind_of_member(NUMPY_CLASSES[base[2]], attr)
        return None

    def _context(self, node) -> str:
        p = self.parent.get(node)
        if isinstance(p, ast.Call) and p.func is node:
            return "call"
        if isinstance(p, (ast.Call, ast.keyword)):
            return "passed"
        return "read"

    def check_attribute(self, node: ast.Attribute, env) -> None:
        base = self.typeof(node.value, env)
        if base is None or base[0] in ("func", "meth"):
            return
        guarded = self._guarded(node)
        lib = "cupy" if guarded else base[1]
        if base[0] == "mod":
            if base[2] not in self.api["modules"]:
                self.fail(node, f"{base[2]} is not recorded: add it to MODULES in tests/fixtures/make_cupy_api.py")
                return
            where = f"{base[2]}.{node.attr}"
            kind = self.api["modules"][base[2]].get(node.attr)
            owner = base[2]
        else:
            where = f"{base[2]}.{node.attr}"
            kind = self.api["classes"][base[2]]["members"].get(node.attr)
            owner = f"cupy {base[2]}"
        self.uses.add(where)
        if kind is None:
            self.fail(node, f"{owner} has no {node.attr!r} in CuPy {self.api['version']}")
            return
        ctx = self._context(node)
        if kind in ("property", "attribute", "module") and ctx == "call":
            self.fail(node, f"{where} is a {kind} in CuPy {self.api['version']}, not a method: read it, do not call it")
        if kind == "method" and base[0] == "obj" and ctx == "read":
            self.fail(node, f"{where} is a method in CuPy {self.api['version']} "
                            f"({self.api['classes'][base[2]]['signatures'].get(node.attr, 'no signature')}): call it")
        if lib == "xp":
            nk = self._numpy_kind(base, node.attr)
            if nk is None:
                self.fail(node, f"used through xp, but NumPy {np.__version__} has no {node.attr!r} (CuPy-only names go "
                                f"through cp, or behind hasattr)")
            elif nk != kind and not {nk, kind} <= {"function", "class"}:  # np.float32 vs a ufunc: both called
                self.fail(node, f"used through xp: a {kind} in CuPy but a {nk} in NumPy")

    def _signature(self, f):
        if f[0] == "func":
            return self.api["signatures"].get(f[2])
        if f[0] == "cls":
            return self.api["classes"][f[2]]["constructor"]
        if f[0] == "meth":
            return self.api["classes"][f[2]]["signatures"].get(f[3])
        return None

    def check_call(self, node: ast.Call, env) -> None:
        if isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value) in ("np", "numpy") \
                and node.func.attr in ("frombuffer", "asarray", "array", "ascontiguousarray") and node.args:
            t = self.typeof(node.args[0], env)
            if t and t[0] == "obj":
                self.uses.add(f"np.{node.func.attr}({t[2]})")
                if t[2] == "ndarray":
                    self.fail(node, "NumPy cannot read a device array (CuPy: TypeError, implicit conversion): "
                                    "use .get() or cp.asnumpy")
                elif node.func.attr == "frombuffer" and not self.api["classes"][t[2]]["buffer"]:
                    self.fail(node, f"{t[2]} exports no buffer in CuPy {self.api['version']}")
        if isinstance(node.func, ast.Name) and node.func.id == "hasattr" and len(node.args) == 2:
            t = self.typeof(node.args[0], env)
            name = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
            if t and t[0] in ("mod", "obj") and isinstance(name, str):  # a probe for a name CuPy must have
                known = (self.api["modules"].get(t[2], {}) if t[0] == "mod" else self.api["classes"][t[2]]["members"])
                self.uses.add(f"hasattr({t[2]}, {name})")
                if name not in known:
                    self.fail(node, f"probes for {name!r}, which CuPy {self.api['version']} {t[2]} does not have")
        if isinstance(node.func, ast.Name) and node.func.id == "len" and node.args:
            t = self.typeof(node.args[0], env)
            if t and t[0] == "obj" and "__len__" not in self.api["classes"][t[2]]["members"]:
                self.fail(node, f"{t[2]} has no len() in CuPy {self.api['version']}")
        f = self.typeof(node.func, env)
        if f is None:
            return
        sig = self._signature(f)
        if not sig:
            return
        spec = REC.parse_signature(sig)
        self.uses.add(f"call {sig.split('(')[0]}")
        npos = sum(not isinstance(a, ast.Starred) for a in node.args)
        if spec["positional"] is not None and npos > spec["positional"]:
            self.fail(node, f"{npos} positional arguments; CuPy {self.api['version']} has {sig}")
        for kw in node.keywords:
            if kw.arg and spec["keywords"] is not None and kw.arg not in spec["keywords"]:
                self.fail(node, f"keyword {kw.arg!r}: CuPy {self.api['version']} has {sig}")
        if f[1] == "xp" and f[0] == "func":  # the same call must suit NumPy's function
            fn = getattr(np, f[2].split(".")[-1], None)
            try:
                bound = inspect.signature(fn)
            except (TypeError, ValueError):
                return
            try:
                bound.bind(*([None] * npos), **{kw.arg: None for kw in node.keywords if kw.arg})
            except TypeError as exc:
                self.fail(node, f"NumPy's {f[2].split('.')[-1]}{bound} refuses it: {exc}")

    def check_with(self, node: ast.withitem, env) -> None:
        t = self.typeof(node.context_expr, env)
        if t and t[0] == "obj":
            members = self.api["classes"][t[2]]["members"]
            self.uses.add(f"with {t[2]}")
            if members.get("__enter__") != "method" or members.get("__exit__") != "method":
                self.fail(node.context_expr, f"{t[2]} is no context manager in CuPy {self.api['version']}")

    def check_operator(self, node, env) -> None:
        if isinstance(node, ast.BinOp):
            dunder, operand = BINOPS.get(type(node.op)), node.left
        elif isinstance(node, ast.Subscript):
            dunder = "__setitem__" if isinstance(node.ctx, ast.Store) else "__getitem__"
            operand = node.value
        else:
            return
        t = self.typeof(operand, env)
        if dunder and t and t[0] == "obj":
            self.uses.add(f"{t[2]}.{dunder}")
            if self.api["classes"][t[2]]["members"].get(dunder) != "method":
                self.fail(node, f"{t[2]} has no {dunder} in CuPy {self.api['version']}")

    def run(self) -> Walk:
        envs: dict = {}
        for node in ast.walk(self.tree):
            key = (self._func(node), self._class(node))
            if key not in envs:
                envs[key] = self.env(node)
            env = envs[key]
            if isinstance(node, ast.Attribute):
                self.check_attribute(node, env)
            elif isinstance(node, ast.Call):
                self.check_call(node, env)
            elif isinstance(node, ast.withitem):
                self.check_with(node, env)
            elif isinstance(node, (ast.BinOp, ast.Subscript)):
                self.check_operator(node, env)
        return self


def _modules() -> list[tuple[str, str]]:
    """The package's modules that can reach CuPy: those naming cupy/cp/xp, or with a parameter in PARAMS."""
    hinted = {rel for rel, _, _ in PARAMS}
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel, src = str(path.relative_to(PKG)), path.read_text()
        if rel in hinted or re.search(r"\b(cupy|cp|xp)\b", src):
            out.append((rel, src))
    return out


def walk_package(api: dict) -> tuple[set[str], list[str]]:
    uses, problems = set(), []
    for rel, src in _modules():
        w = Walk(api, src, rel).run()
        uses |= w.uses
        problems += w.problems
    return uses, problems


def walk_snippet(source: str, version: str = "cupy-cuda12x-14.2") -> list[str]:
    return Walk(APIS[version], textwrap.dedent(source), "snippet.py").run().problems


# ------------------------------------------------------------------------------------------ the record


@pytest.mark.parametrize("version", fake_cupy.VERSIONS)
def test_the_record_says_what_the_issue_says(version):
    """Read from the real wheels: PinnedMemoryPointer.size is a method in 13.6 and 14.2 alike, ptr a property;
    the pinned pointer exports the buffer protocol (checked by really viewing one), MemoryPointer.ptr is a
    property, Stream.ptr an attribute set per instance."""
    api = APIS[version]
    pmp = api["classes"]["PinnedMemoryPointer"]
    assert pmp["members"]["size"] == "method" and pmp["signatures"]["size"].endswith("size(self) -> size_t")
    assert pmp["members"]["ptr"] == "property" and pmp["buffer"] and pmp["buffer_checked"]
    assert api["classes"]["MemoryPointer"]["members"]["ptr"] == "property"
    assert api["classes"]["Stream"]["members"]["ptr"] == "attribute" and "ptr" in api["classes"]["Stream"]["instance_attributes"]
    assert api["classes"]["ndarray"]["members"]["data"] == "property"
    assert api["classes"]["ndarray"]["members"]["nbytes"] == "property"
    assert api["classes"]["ndarray"]["members"]["get"] == "method" and api["classes"]["ndarray"]["members"]["set"] == "method"
    assert "non_blocking" in REC.parse_signature(api["classes"]["Stream"]["constructor"])["keywords"]
    assert REC.parse_signature(api["signatures"]["cupy.cuda.alloc_pinned_memory"])["returns"] == "PinnedMemoryPointer"
    assert api["modules"]["cupy.cuda.runtime"]["getDeviceCount"] == "function"
    assert api["version"].startswith(version.rsplit("-", 1)[1]) and api["package"] == version.rsplit("-", 1)[0]


def test_return_types_the_walk_assumes_agree_with_the_recorded_signatures():
    for api in APIS.values():
        for name, ret in RETURNS.items():
            sig = api["signatures"].get(name)
            declared = REC.parse_signature(sig)["returns"] if sig else None
            if declared and declared in api["classes"]:
                assert declared == ret, (name, sig)
            assert api["modules"][name.rsplit(".", 1)[0]].get(name.rsplit(".", 1)[1]) == "function", name
        for (cls, member), ret in METHOD_RETURNS.items():
            assert api["classes"][cls]["members"].get(member) in ("method", "property"), (cls, member)
            assert ret in api["classes"]


# ------------------------------------------------------------------------------------------ the code


@pytest.mark.parametrize("version", fake_cupy.VERSIONS)
def test_every_cupy_use_in_the_package_exists_with_its_calling_form(version):
    """Issue 27 defect 1: ``self._pinned.size < nbytes`` compared CuPy's ``size`` method with an int: TypeError
    on the second image, and the Screener silently fell back to the CPU path."""
    uses, problems = walk_package(APIS[version])
    assert not problems, "\n".join(problems)
    # the walk reached the code it is meant to check
    assert {"cupy.cuda.alloc_pinned_memory", "PinnedMemoryPointer.size", "cupy.cuda.Stream", "Stream.synchronize",
            "with Stream", "ndarray.set", "np.frombuffer(PinnedMemoryPointer)",
            "cupy.asnumpy", "cupy.asarray", "cupy.cuda.get_current_stream", "cupy.cuda.runtime.getDeviceCount",
            "cupy.einsum", "cupy.rint", "cupy.clip", "cupy.repeat", "ndarray.astype", "ndarray.reshape",
            "ndarray.__matmul__", "ndarray.__setitem__", "call _ndarray_base.set", "hasattr(cupy, asnumpy)"} <= uses, \
        sorted(uses)


def test_every_import_of_cupy_binds_a_name_the_walk_knows():
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "cupy":
                        assert (a.asname or a.name) in CUPY_NAMES, f"{path}: import {a.name} as {a.asname}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cupy":
                pytest.fail(f"{path}: from {node.module} import ...: use cupy.X chains (the walk checks them)")


@pytest.mark.parametrize("source, expected", [
    ("p = cp.cuda.alloc_pinned_memory(8)\nok = p.size < 3", "is a method"),  # the defect
    ("p = cp.cuda.alloc_pinned_memory(8)\nn = p.ptr()", "not a method"),
    ("s = cp.cuda.Stream(nonblocking=True)", "keyword 'nonblocking'"),
    ("s = cp.cuda.Stream()\nq = s.ptr()", "not a method"),
    ("a = cp.empty(3)\nb = a.data.ptr()", "not a method"),
    ("a = cp.empty(3)\nb = a.nbytes()", "not a method"),
    ("a = cp.empty(3)\nb = a.get", "is a method"),
    ("x = cp.asnumpyy(3)", "has no 'asnumpyy'"),
    ("def f(xp):\n    return xp.asnumpy(xp.zeros(3))", "NumPy"),
    ("a = cp.empty(3)\nb = np.asarray(a)", "implicit conversion"),
    ("s = cp.cuda.Stream()\nv = np.frombuffer(s, np.uint8)", "exports no buffer"),
    ("a = cp.empty(3)\na.set(np.zeros(3), 0, 1)", "positional"),
    ("with cp.cuda.alloc_pinned_memory(8) as p:\n    pass", "no context manager"),
    ("def f(xp):\n    return xp.cuda.Stream()", "NumPy"),
    ("def f(xp):\n    return hasattr(xp, 'asnumpyy')", "probes"),
    ("def f(xp, a):\n    return xp.asnumpy(a) if not hasattr(xp, 'asnumpy') else a", "NumPy"),  # not a guard
    ("import cupy as cp\nx = cp.fft.fft(cp.zeros(4))", "not recorded"),
])
def test_the_walk_catches_wrong_names_and_calling_forms(source, expected):
    problems = walk_snippet(source)
    assert any(expected in p for p in problems), problems


def test_the_walk_accepts_the_right_forms():
    assert walk_snippet("""
        p = cp.cuda.alloc_pinned_memory(8)
        ok = p.size() < 3 and p.ptr > 0
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            a = cp.empty((2, 3), cp.uint8)
        a.set(np.zeros((2, 3), np.uint8), stream=s)
        s.synchronize()
        n = int(a.data.ptr) + a.nbytes + len(a)
        h = a.get()
        v = np.frombuffer(p, np.uint8, 8)
        def f(xp, img):
            got = xp.asnumpy(img) if hasattr(xp, "asnumpy") else img
            return xp.rint(xp.asarray(got) * xp.float32(2)).astype(xp.uint8)
    """) == []


# ------------------------------------------------------------------------------------------ the fake


@pytest.mark.parametrize("version", fake_cupy.VERSIONS)
def test_the_fake_has_only_real_names_with_their_real_kinds(version):
    cp = fake_cupy.make_fake_cupy(version)
    assert fake_cupy.problems(cp, APIS[version]) == []
    assert cp.__version__ == APIS[version]["version"]


def test_a_fake_with_the_wrong_calling_form_is_refused(monkeypatch):
    """The check has teeth: a fake whose ``size`` were a property (what the old code assumed) is rejected."""
    monkeypatch.setattr(fake_cupy.PinnedMemoryPointer, "size", property(lambda self: 0))
    with pytest.raises(AssertionError, match="PinnedMemoryPointer.size is a property in the fake, a method"):
        fake_cupy.make_fake_cupy()
    monkeypatch.undo()
    monkeypatch.setattr(fake_cupy.ndarray, "to_host", lambda self: None, raising=False)
    with pytest.raises(AssertionError, match="ndarray.to_host is a method in the fake, a None"):
        fake_cupy.make_fake_cupy()


def test_the_fake_keeps_device_and_host_apart():
    cp = fake_cupy.make_fake_cupy()
    host = np.arange(6, dtype=np.uint8).reshape(2, 3)
    dev = cp.asarray(host)
    host[0, 0] = 99  # a copy went to the "device"
    assert isinstance(dev, cp.ndarray) and not isinstance(dev, np.ndarray) and int(dev.get()[0, 0]) == 0
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(dev)
    with pytest.raises(TypeError, match="Unsupported type"):
        dev + host
    with pytest.raises(TypeError):
        host + dev
    assert isinstance(dev.data.ptr, int) and dev.nbytes == 6
    half = cp.asnumpy(cp.rint(dev.astype(cp.float32) * cp.float32(0.5)))
    assert half.dtype == np.float32 and (half == np.rint(np.arange(6).reshape(2, 3) * np.float32(0.5))).all()
    p = cp.cuda.alloc_pinned_memory(1000)
    assert callable(p.size) and p.size() >= 1000 and isinstance(p.ptr, int)
    np.frombuffer(p, np.uint8, 4)[:] = 5
    assert bytes(memoryview(p)[:4]) == b"\5" * 4
    with pytest.raises(TypeError):
        p.size < 1000  # noqa: B015 - what the old code did
    s = cp.cuda.Stream(non_blocking=True)
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null
    with s:
        assert cp.cuda.get_current_stream() is s
    with pytest.raises(ValueError, match="Shape mismatch"):
        dev.set(np.zeros((3, 2), np.uint8), stream=s)
    assert cp.cuda.runtime.getDeviceCount() == 1


# ------------------------------------------------------------------------------------------ the device path, run


def _images():
    """Sizes that reuse the pinned buffer (smaller after larger) and grow it (larger after smaller), integer
    and fractional factors, gray and colour-converted inputs."""
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in
            [(64, 64, 1), (200, 120, 1), (70, 90, 1), (300, 256, 1), (32, 32, 1), (33, 47, 1), (256, 256, 1)]]


@pytest.mark.parametrize("version", ["cupy-cuda12x-13.6", "cupy-cuda13x-14.2"])
def test_gpu_packer_runs_on_the_cupy_fake_image_after_image(monkeypatch, version):
    """Issue 27: the second image died (``self._pinned.size < nbytes``). Seven images of different sizes through
    GpuBatchPacker on the fake: the pinned buffer is reused and grown, every input equals the CPU packer's within
    one grey level, the batches are device arrays, the copies and resizes ran on the packer's stream."""
    from cxr_edge.runtime.batching import BatchPacker
    from cxr_edge.runtime.gpu_preprocess import GpuBatchPacker, to_host

    cp = fake_cupy.install(monkeypatch, version)
    spec = PreprocessSpec(32, 32, "rescale", input_channels=1, model_channels=1)
    items = _images()
    cpu, gpu = BatchPacker(spec, 3), GpuBatchPacker(spec, 3)  # CuPy found by import, as on a GPU machine
    try:
        assert gpu.xp is cp and gpu.on_device and isinstance(gpu.stream, cp.cuda.Stream)
        fake_cupy.events.clear()
        a, b = list(cpu.iter_batches(items)), list(gpu.iter_batches(items))
    finally:
        cpu.close()
        gpu.close()
    assert [p.indices for p in b] == [[0, 1, 2], [3, 4, 5], [6]] and not any(p.errors for p in b)
    for p, q in zip(a, b):
        assert isinstance(q.x, cp.ndarray)
        d = np.abs(p.x.astype(int) - to_host(q.x).astype(int))
        assert d.max() <= 1 and (d == 0).mean() > 0.95
    asked = [n for e, n in fake_cupy.events if e == "pinned"]
    assert asked == [64 * 64, 200 * 120, 300 * 256]  # grown twice, reused for the other four
    stream = gpu.stream
    device_work = [(e, s) for e, s in fake_cupy.events if e in ("alloc", "write", "set")]
    assert device_work and all(s is stream for _, s in device_work), device_work  # stream-ordered pool blocks
    assert sum(1 for e, s in fake_cupy.events if e == "synchronize" and s is stream) == len(items) + 3


def test_self_test_and_the_bench_run_on_the_cupy_fake(monkeypatch):
    from cxr_edge.bench.preprocess_bench import measure_preprocessing
    from cxr_edge.runtime.gpu_preprocess import self_test

    cp = fake_cupy.install(monkeypatch)
    assert self_test(cp) is None
    rows = measure_preprocessing([], PreprocessSpec(64, 64, "rescale"), budget_s=0.01, n_images=1)
    assert rows[2]["path"] == "gpu" and rows[2]["status"] == "ran", rows[2]


def test_the_server_gpu_resize_runs_on_the_cupy_fake(monkeypatch, caplog):
    from cxr_edge.runtime.resize import area_resize
    from cxr_edge.serve import app

    fake_cupy.install(monkeypatch)
    counted = []
    server = types.SimpleNamespace(engine=types.SimpleNamespace(spec=PreprocessSpec(32, 32, "rescale")),
                                   metrics=types.SimpleNamespace(images=types.SimpleNamespace(
                                       labels=lambda *a: types.SimpleNamespace(inc=lambda: counted.append(a)))))
    gpu_resize = next(v for v in vars(app).values() if isinstance(v, type) and "_gpu_resize" in vars(v))._gpu_resize
    img = np.random.default_rng(0).integers(0, 256, (100, 70, 1), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        out = gpu_resize(server, img)
    assert isinstance(out, np.ndarray) and not counted and "GPU resize failed" not in caplog.text
    assert np.abs(out.astype(int) - area_resize(img, 32, 32).astype(int)).max() <= 1


def test_the_screener_device_path_runs_on_the_cupy_fake(tiny_export, monkeypatch, caplog):
    """preprocess='gpu' with CuPy importable (the fake): the load-time self-test passes, every image is prepared
    on the device path (none falls back to the CPU), the device batches reach ``infer_device``, and the results
    match the CPU path's."""
    from cxr_edge.runtime import Screener

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    good = sorted((tiny_export.data / "COVID").iterdir())[:4] + sorted((tiny_export.data / "Normal").iterdir())[:3]
    items = good[:2] + [b"not an image"] + good[2:]
    with Screener(art, isolation=None, preprocess="cpu", batch_size=3) as s:
        ref = s.predict(items)
    cp = fake_cupy.install(monkeypatch)
    seen = []
    with Screener(art, isolation=None, preprocess="gpu", batch_size=3) as s:
        assert s.preprocess == "gpu", s.preprocess_note
        orig = s.engine.infer_device
        monkeypatch.setattr(s.engine, "infer_device", lambda x, o=None: seen.append(type(x)) or orig(x, o))
        with caplog.at_level(logging.WARNING):
            got = s.predict(items)
    assert "GPU preprocessing failed" not in caplog.text, caplog.text
    assert seen and set(seen) == {cp.ndarray}
    assert [r.ok for r in got] == [r.ok for r in ref] == [True, True, False, True, True, True, True, True]
    assert {r.preprocess for r in got if r.ok} == {"gpu"}
    for r, g in zip(ref, got):
        if r.ok:
            assert max(abs(r.probabilities[c] - g.probabilities[c]) for c in r.probabilities) < 0.02
