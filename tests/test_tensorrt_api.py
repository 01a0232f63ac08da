"""The TensorRT/CUDA code and the fakes, checked against the real API surfaces of TensorRT 10.3, 10.16, 11.4
and cuda-bindings 12/13 (fixtures read from the real wheels by tests/fixtures/make_tensorrt_api.py).

Names are not enough: a property called like a method (``engine.num_io_tensors()``), a method read like a
property, or a write-only property read, passes a name check and fails on a GPU. The fixtures record the kind of
every member (property, read-only or write-only property, method, static method, value) and the pybind11
signature of the methods cxr-edge calls, so the code's calling forms and the fakes' kinds are checked here too.
"""

import ast
import importlib.util
import inspect
import json
from pathlib import Path

import fake_gpu
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt_api"
PKG = Path(__file__).resolve().parents[1] / "cxr_edge"


def _uses_gpu_libraries(path: Path) -> bool:
    """``trt.X`` or ``cudart.X`` somewhere in the module."""
    return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("trt", "cudart")
               for n in ast.walk(ast.parse(path.read_text())))


# every module of the package that touches the TensorRT or CUDA runtime modules (found, not listed)
TRT_MODULES = sorted(p for p in PKG.rglob("*.py") if _uses_gpu_libraries(p))
TRT_APIS = {v: json.loads((FIXTURES / f"tensorrt-{v}.json").read_text()) for v in ("10.3", "10.16", "11.4")}
CUDART_APIS = {v: json.loads((FIXTURES / f"cudart-{v}.json").read_text()) for v in ("12", "13")}
MAJOR = {"10.3": 10, "10.16": 10, "11.4": 11}

# attributes reached only under a TensorRT 10 branch (the fakes of 11 lack them, so a wrong branch fails there)
TRT10_ONLY = {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2"}
TRT10_ONLY_MEMBERS = {"Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8",
                      "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"}

# which expressions hold which TensorRT object, per module (written out: a rename here must be a decision)
TRT_OBJECTS = {
    PKG / "runtime" / "backends" / "tensorrt.py": {
        "self.runtime": "Runtime", "self.engine": "ICudaEngine", "engine": "ICudaEngine",
        "self.context": "IExecutionContext", "context": "IExecutionContext"},
    PKG / "export" / "tensorrt_build.py": {
        "builder": "Builder", "bc": "IBuilderConfig", "network": "INetworkDefinition", "parser": "OnnxParser",
        "profile": "IOptimizationProfile", "inp": "ITensor", "logger": "Logger"},  # not "cache": a Path there too
}
CUDART_OBJECTS = {PKG / "runtime" / "backends" / "tensorrt_api.py": {"props": "cudaDeviceProp"}}

CALLED = {"method", "staticmethod", "classmethod"}
READ = {"property", "readonly_property", "value", "class", "static_property"}
WRITTEN = {"property", "writeonly_property"}


def _kind_function():
    """The generator's own classifier, so fakes are judged exactly as the real wheels were."""
    spec = importlib.util.spec_from_file_location("make_tensorrt_api", FIXTURES.parent / "make_tensorrt_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ns: dict = {}
    exec(mod.KINDS_PY, ns)
    return ns["kind"]


KIND = _kind_function()


# ------------------------------------------------------------------------------------------ names


def _is_trt(node) -> bool:
    """``trt`` or ``self.trt``: the imported TensorRT module."""
    return (isinstance(node, ast.Name) and node.id == "trt") or (
        isinstance(node, ast.Attribute) and node.attr == "trt" and isinstance(node.value, ast.Name)
        and node.value.id == "self")


def _trt_chains(path: Path) -> set[str]:
    """Every ``trt.X`` / ``trt.X.Y`` attribute chain in a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute) and not _is_trt(cur):
                parts.append(cur.attr)
                cur = cur.value
            if _is_trt(cur) and parts:
                out.add(".".join(reversed(parts)))
    return {c for c in out if not any(o != c and o.startswith(c + ".") for o in out)}


def _cudart_names(path: Path) -> set[str]:
    return {n.attr for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "cudart"}


def _exists(api: dict, chain: str) -> bool:
    head, *rest = chain.split(".")
    if head not in api["module"]:
        return False
    if not rest:
        return True
    cls = api["classes"].get(head)
    return cls is not None and rest[0] in cls["members"]


def test_the_scan_finds_the_gpu_modules():
    assert {PKG / "export" / "tensorrt_build.py", PKG / "runtime" / "backends" / "tensorrt.py",
            PKG / "runtime" / "backends" / "tensorrt_api.py", PKG / "doctor.py"} <= set(TRT_MODULES)
    assert set(TRT_OBJECTS) <= set(TRT_MODULES)


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_every_trt_name_the_code_uses_exists_in_the_real_bindings(version):
    api = TRT_APIS[version]
    used = set().union(*(_trt_chains(p) for p in TRT_MODULES if p.exists()))
    assert {"BuilderFlag.TF32", "Runtime", "ExecutionContextAllocationStrategy.USER_MANAGED"} <= used  # scan works
    missing = sorted(c for c in used if not _exists(api, c) and not (MAJOR[version] >= 11 and c in TRT10_ONLY))
    assert not missing, f"TensorRT {api['version']} has no {missing}"


def test_trt10_only_names_are_really_gone_in_11():
    for chain in TRT10_ONLY | TRT10_ONLY_MEMBERS:
        for v in ("10.3", "10.16"):
            assert _exists(TRT_APIS[v], chain), (v, chain)
        assert not _exists(TRT_APIS["11.4"], chain), chain


@pytest.mark.parametrize("version", sorted(CUDART_APIS))
def test_every_cuda_runtime_function_the_code_uses_exists(version):
    api = CUDART_APIS[version]
    used = set().union(*(_cudart_names(p) for p in TRT_MODULES if p.exists()))
    known = set(api["functions"]) | set(api["enums"])
    assert {"cudaMalloc", "cudaStreamBeginCapture", "cudaGraphExecDestroy", "cudaSetDevice", "cudaGetDevice",
            "getLocalRuntimeVersion"} <= used
    assert not sorted(used - known), f"cuda-bindings {api['version']} lacks {sorted(used - known)}"
    assert "cudaStreamCaptureModeThreadLocal" in api["enums"]["cudaStreamCaptureMode"]


def _public(obj) -> set[str]:
    return {n for n in vars(obj) if not n.startswith("_")} if isinstance(obj, type) else set()


def _fake_trt(version: str):
    api = TRT_APIS[version]
    return fake_gpu.make_fake_tensorrt(MAJOR[version], fake_gpu.FakeCudart(), version=api["version"])


def _fake_classes(trt, api):
    """(name, fake class) for each fake class that stands for a recorded class; enums apart."""
    for name in sorted(n for n in vars(trt) if not n.startswith("_") and n != "fake_log"):
        obj = getattr(trt, name)
        if isinstance(obj, type) and name in api["classes"] and not issubclass(obj, int) and not issubclass(obj, bytes):
            yield name, obj


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_the_fake_tensorrt_exposes_only_real_names(version):
    """A fake that invents an API would let code pass here and fail on a GPU."""
    api = TRT_APIS[version]
    trt = _fake_trt(version)
    fake_only = {"fake_log"}
    for name in (n for n in vars(trt) if not n.startswith("_") and n not in fake_only):
        assert name in api["module"], f"fake tensorrt.{name} does not exist in {api['version']}"
        obj = getattr(trt, name)
        if isinstance(obj, type) and name in api["classes"]:
            members = set(api["classes"][name]["members"])
            mine = {m.name for m in obj} if issubclass(obj, int) else _public(obj)  # enum members / methods
            assert mine <= members, f"fake {name} has {sorted(mine - members)}, which TensorRT {api['version']} lacks"


@pytest.mark.parametrize("version", sorted(CUDART_APIS))
def test_the_fake_cudart_exposes_only_real_names(version):
    api = CUDART_APIS[version]
    assert set(fake_gpu.FakeCudart.FUNCTIONS) <= set(api["functions"])
    for enum_name in ("cudaMemcpyKind", "cudaStreamCaptureMode", "cudaError_t"):
        fake = {m.name for m in getattr(fake_gpu, enum_name)}
        assert fake <= set(api["enums"][enum_name]), (enum_name, fake - set(api["enums"][enum_name]))


# ------------------------------------------------------------------------------------------ kinds and values


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_the_fake_tensorrt_members_have_the_real_kinds(version):
    """Properties as properties (read-only where the real one is), methods as methods, constants as values."""
    api = TRT_APIS[version]
    trt = _fake_trt(version)
    checked = 0
    for name, cls in _fake_classes(trt, api):
        real = api["classes"][name]["kinds"]
        for member in _public(cls):
            assert KIND(cls, member) == real[member], (
                f"fake {name}.{member} is a {KIND(cls, member)}; in TensorRT {api['version']} it is a {real[member]}")
            checked += 1
    for name in ("nptype", "Runtime"):
        assert KIND(trt, name) == api["module_kinds"][name]
    assert checked > 40


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_the_fake_tensorrt_enums_have_the_real_values(version):
    """Values matter where the code makes bit masks (``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``)."""
    api = TRT_APIS[version]
    trt = _fake_trt(version)
    enums = [n for n in vars(trt) if isinstance(getattr(trt, n), type) and issubclass(getattr(trt, n), int)]
    assert {"BuilderFlag", "NetworkDefinitionCreationFlag", "ExecutionContextAllocationStrategy"} <= set(enums)
    for name in enums:
        assert {m.name: int(m) for m in getattr(trt, name)}.items() <= api["classes"][name]["values"].items(), name


@pytest.mark.parametrize("version", sorted(CUDART_APIS))
def test_the_fake_cudart_matches_kinds_values_and_parameters(version):
    api = CUDART_APIS[version]
    for enum_name in ("cudaMemcpyKind", "cudaStreamCaptureMode", "cudaError_t"):
        fake = {m.name: int(m) for m in getattr(fake_gpu, enum_name)}
        assert fake.items() <= api["enums"][enum_name].items(), enum_name
    for name in fake_gpu.FakeCudart.FUNCTIONS:
        assert api["kinds"][name] == "function"
        params = list(inspect.signature(getattr(fake_gpu.FakeCudart(), name)).parameters)
        assert params == api["parameters"][name]["params"], (name, params, api["parameters"][name])
    props = api["classes"]["cudaDeviceProp"]["kinds"]
    for field in _public(fake_gpu.cudaDeviceProp):
        assert "property" in KIND(fake_gpu.cudaDeviceProp, field) and props[field] == "property", field


def test_the_fake_refuses_what_a_pybind11_object_refuses():
    trt = _fake_trt("10.16")
    engine_cls, config = trt.ICudaEngine, trt.Builder(trt.Logger()).create_builder_config()
    assert isinstance(vars(engine_cls)["num_io_tensors"], property)
    builder = trt.Builder(trt.Logger())
    with pytest.raises(AttributeError):
        builder.num_DLA_cores = 2  # read-only in TensorRT
    with pytest.raises(AttributeError, match="has no attribute 'invented'"):
        config.invented = 1
    config.DLA_core = 1  # a read-write property
    assert config.DLA_core == 1


# ------------------------------------------------------------------------------------------ calling forms


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in out + [cur] if p.strip()]


def _signature(line: str) -> tuple[list[tuple[str, bool]], str]:
    """A pybind11 signature line -> ([(parameter, has default)] without self, return annotation)."""
    start = line.index("(")
    depth = 0
    for end in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        if depth == 0:
            break
    params = [(p.split(":")[0].split("=")[0].strip(), "=" in p) for p in _split_top(line[start + 1 : end])]
    return [p for p in params if p[0] != "self"], line[end + 1 :].split("->")[-1].strip()


def _overloads(api: dict, cls: str, member: str) -> list[str]:
    entry = api["classes"][cls]
    return entry.get("overloads", {}).get(member) or ([entry["signatures"][member]] if member in entry.get("signatures", {}) else [])


def _fits(call: ast.Call, params: list[tuple[str, bool]]) -> bool:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return True
    names = [p for p, _ in params]
    given = names[: len(call.args)] + [k.arg for k in call.keywords]
    return (len(call.args) <= len(params) and len(set(given)) == len(given) and set(given) <= set(names)
            and all(p in given for p, has_default in params if not has_default))


def _uses(tree, objects: dict, resolve_returns=None):
    """(class, member, how, node) for every attribute use on a known object; how: call / store / load / del."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def cls_of(expr):
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and resolve_returns:
            owner = cls_of(expr.func.value)
            return resolve_returns(owner, expr.func.attr) if owner else None
        return objects.get(ast.unparse(expr))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        cls = cls_of(node.value)
        if cls is None:
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node:
            how = "call"
        else:
            how = {ast.Store: "store", ast.Del: "del"}.get(type(node.ctx), "load")
        yield cls, node.attr, how, node, parent


def _check_calling_forms(source: str, objects: dict, api: dict, major: int) -> tuple[list[str], set]:
    def returns(cls, member):
        for line in _overloads(api, cls, member):
            ret = _signature(line)[1].rsplit(".", 1)[-1]
            if ret in api["classes"]:
                return ret
        return None

    problems, seen = [], set()
    for cls, member, how, node, parent in _uses(ast.parse(source), objects, returns):
        where = f"line {node.lineno}: {ast.unparse(node)}"
        seen.add((cls, member, how))
        kinds = api["classes"][cls]["kinds"]
        if member not in kinds:
            if not (major >= 11 and f"{cls}.{member}" in TRT10_ONLY_MEMBERS):
                problems.append(f"{where}: TensorRT {api['version']} {cls} has no {member}")
            continue
        kind = kinds[member]
        allowed = {"call": CALLED, "store": WRITTEN, "load": READ, "del": set()}[how]
        if kind not in allowed:
            problems.append(f"{where}: {cls}.{member} is a {kind} in TensorRT {api['version']}, used as a {how}")
        elif how == "call":
            sigs = [_signature(line)[0] for line in _overloads(api, cls, member)]
            if sigs and not any(_fits(parent, s) for s in sigs):
                problems.append(f"{where}: no {cls}.{member} overload of TensorRT {api['version']} takes "
                                f"{ast.unparse(parent)}: {_overloads(api, cls, member)}")
    return problems, seen


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_every_use_of_a_tensorrt_object_has_the_real_calling_form(version):
    """Each ``obj.attr`` on a TensorRT object: called if a method (with arguments one real overload takes),
    read if a readable property, assigned only if a writable one."""
    api = TRT_APIS[version]
    problems, seen = [], set()
    for path, objects in TRT_OBJECTS.items():
        p, s = _check_calling_forms(path.read_text(), objects, api, MAJOR[version])
        problems += [f"{path.name} {x}" for x in p]
        seen |= s
    assert not problems, "\n".join(problems)
    assert {("ICudaEngine", "num_io_tensors", "load"), ("ICudaEngine", "device_memory_size_v2", "load"),
            ("ICudaEngine", "create_execution_context", "call"), ("IExecutionContext", "set_device_memory", "call"),
            ("IExecutionContext", "set_input_shape", "call"), ("IExecutionContext", "execute_async_v3", "call"),
            ("IBuilderConfig", "default_device_type", "store"), ("IBuilderConfig", "DLA_core", "store"),
            ("Builder", "num_DLA_cores", "load"), ("OnnxParser", "num_errors", "load"),
            ("ITimingCache", "serialize", "call"), ("ITensor", "name", "load")} <= seen  # the walk found the code


def test_the_calling_form_check_catches_what_it_should():
    api = TRT_APIS["10.16"]
    objects = {"engine": "ICudaEngine", "context": "IExecutionContext", "bc": "IBuilderConfig"}
    bad = ("engine.num_io_tensors()\n"  # a property called
           "context.set_input_shape\n"  # a method never called
           "x = context.device_memory\n"  # a write-only property read
           "engine.device_memory_size_v2 = 1\n"  # a read-only property assigned
           "context.set_device_memory(1)\n"  # too few arguments
           "context.set_tensor_address('x', 1, 2)\n"  # too many
           "bc.set_timing_cache(c, ignore=True)\n"  # a keyword it does not have
           "engine.create_execution_context(strategy=1, runtime_config=None)\n")  # no overload takes both
    problems, _ = _check_calling_forms(bad, objects, api, 10)
    assert len(problems) == 8, "\n".join(problems)
    good = ("engine.num_io_tensors\ncontext.set_input_shape('x', (1, 2))\ncontext.device_memory = 1\n"
            "context.set_device_memory(1, 2)\nbc.set_timing_cache(c, ignore_mismatch=True)\n"
            "engine.create_execution_context(strategy=1)\nengine.create_execution_context(runtime_config=None)\n"
            "bc.get_timing_cache().serialize()\n")
    assert _check_calling_forms(good, objects, api, 10) == ([], _check_calling_forms(good, objects, api, 10)[1])


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_the_fake_tensorrt_methods_take_the_real_parameters(version):
    """A fake with other parameter names would accept keyword calls the real bindings refuse, and vice versa."""
    api = TRT_APIS[version]
    trt = _fake_trt(version)
    checked = 0
    for name, cls in _fake_classes(trt, api):
        for member in _public(cls):
            lines = _overloads(api, name, member)
            if KIND(cls, member) != "method" or not lines:
                continue
            fake = [(p.name, p.default is not p.empty)
                    for p in list(inspect.signature(vars(cls)[member]).parameters.values())[1:]]
            real = [_signature(line)[0] for line in lines]
            assert any(fake == r[: len(fake)] and all(d for _, d in r[len(fake):]) for r in real), (name, member, fake, real)
            checked += 1
    assert checked > 25


@pytest.mark.parametrize("version", sorted(CUDART_APIS))
def test_every_cuda_runtime_call_has_the_real_calling_form(version):
    """Functions are called with as many arguments as the real ones take; struct fields are read, not called."""
    api = CUDART_APIS[version]
    problems, calls = [], 0
    for path in TRT_MODULES:
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cudart"):
                continue
            parent = parents.get(node)
            called = isinstance(parent, ast.Call) and parent.func is node
            kind = api["kinds"].get(node.attr)
            if kind == "function":
                spec = api["parameters"][node.attr]
                ok = called and spec["required"] <= len(parent.args) + len(parent.keywords) <= len(spec["params"])
                calls += 1
            else:
                ok = not called  # an enum read for its members
            if not ok:
                problems.append(f"{path.name} line {node.lineno}: {ast.unparse(parent or node)} vs {kind} "
                                f"{api['parameters'].get(node.attr)}")
        for cls, member, how, node, _ in _uses(tree, CUDART_OBJECTS.get(path, {})):
            if member not in api["classes"][cls]["kinds"] or how != "load":
                problems.append(f"{path.name} line {node.lineno}: {cls}.{member} ({how})")
    assert not problems, "\n".join(problems)
    assert calls > 20


def test_recorded_signatures_match_how_the_code_calls_them():
    """Return-value conventions the code relies on, read from the real pybind11 signatures."""
    for version, api in TRT_APIS.items():
        sig = lambda cls, m, api=api: api["classes"][cls]["signatures"][m]
        assert sig("IBuilderConfig", "set_timing_cache").endswith("-> bool"), version
        assert sig("IExecutionContext", "set_tensor_address").endswith("-> bool"), version
        assert sig("IExecutionContext", "execute_async_v3").endswith("-> bool"), version
        assert sig("IExecutionContext", "set_device_memory").endswith("-> None"), version  # nothing to check
        assert "ignore_mismatch" in sig("IBuilderConfig", "set_timing_cache")
        assert sig("IBuilderConfig", "add_optimization_profile").endswith("-> int"), version
        assert "USER_MANAGED" in api["classes"]["ExecutionContextAllocationStrategy"]["values"]
        assert api["classes"]["ICudaEngine"]["kinds"]["device_memory_size_v2"] == "readonly_property"
        assert api["classes"]["IExecutionContext"]["kinds"]["device_memory"] == "writeonly_property"
