"""The TensorRT/CUDA code and the fakes, checked against the real API surfaces of TensorRT 10.3, 10.16, 11.4
and cuda-bindings 12/13 (fixtures read from the real wheels by tests/fixtures/make_tensorrt_api.py)."""

import ast
import json
from pathlib import Path

import fake_gpu
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt_api"
PKG = Path(__file__).resolve().parents[1] / "cxr_edge"
TRT_MODULES = [PKG / "export" / "tensorrt_build.py", PKG / "runtime" / "backends" / "tensorrt.py",
               PKG / "runtime" / "tensorrt_api.py", PKG / "doctor.py"]
TRT_APIS = {v: json.loads((FIXTURES / f"tensorrt-{v}.json").read_text()) for v in ("10.3", "10.16", "11.4")}
CUDART_APIS = {v: json.loads((FIXTURES / f"cudart-{v}.json").read_text()) for v in ("12", "13")}
MAJOR = {"10.3": 10, "10.16": 10, "11.4": 11}

# attributes reached only under a TensorRT 10 branch (the fakes of 11 lack them, so a wrong branch fails there)
TRT10_ONLY = {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2"}


def _trt_chains(path: Path) -> set[str]:
    """Every ``trt.X`` / ``trt.X.Y`` attribute chain in a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
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


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_every_trt_name_the_code_uses_exists_in_the_real_bindings(version):
    api = TRT_APIS[version]
    used = set().union(*(_trt_chains(p) for p in TRT_MODULES if p.exists()))
    assert "BuilderFlag.TF32" in used and "Runtime" in used  # the scan found the code
    missing = sorted(c for c in used if not _exists(api, c) and not (MAJOR[version] >= 11 and c in TRT10_ONLY))
    assert not missing, f"TensorRT {api['version']} has no {missing}"


def test_trt10_only_names_are_really_gone_in_11():
    for chain in TRT10_ONLY:
        assert _exists(TRT_APIS["10.3"], chain) and not _exists(TRT_APIS["11.4"], chain), chain
    assert "platform_has_fast_fp16" in TRT_APIS["10.16"]["classes"]["Builder"]["members"]
    assert "platform_has_fast_fp16" not in TRT_APIS["11.4"]["classes"]["Builder"]["members"]


@pytest.mark.parametrize("version", sorted(CUDART_APIS))
def test_every_cuda_runtime_function_the_code_uses_exists(version):
    api = CUDART_APIS[version]
    used = set().union(*(_cudart_names(p) for p in TRT_MODULES if p.exists()))
    known = set(api["functions"]) | set(api["enums"])
    assert {"cudaMalloc", "cudaStreamBeginCapture", "cudaGraphExecDestroy"} <= used
    assert not sorted(used - known), f"cuda-bindings {api['version']} lacks {sorted(used - known)}"
    assert "cudaStreamCaptureModeThreadLocal" in api["enums"]["cudaStreamCaptureMode"]


def _public(obj) -> set[str]:
    return {n for n in vars(obj) if not n.startswith("_")} if isinstance(obj, type) else set()


@pytest.mark.parametrize("version", sorted(TRT_APIS))
def test_the_fake_tensorrt_exposes_only_real_names(version):
    """A fake that invents an API would let code pass here and fail on a GPU."""
    api = TRT_APIS[version]
    trt = fake_gpu.make_fake_tensorrt(MAJOR[version], fake_gpu.FakeCudart(), version=api["version"])
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


def test_recorded_signatures_match_how_the_code_calls_them():
    """Return-value conventions the code relies on, read from the real pybind11 signatures."""
    for version, api in TRT_APIS.items():
        sig = lambda cls, m, api=api: api["classes"][cls]["signatures"][m]
        assert sig("IBuilderConfig", "set_timing_cache").endswith("-> bool"), version
        assert sig("IExecutionContext", "set_tensor_address").endswith("-> bool"), version
        assert sig("IExecutionContext", "execute_async_v3").endswith("-> bool"), version
        assert "ignore_mismatch" in sig("IBuilderConfig", "set_timing_cache")
        assert sig("IBuilderConfig", "add_optimization_profile").endswith("-> int"), version
