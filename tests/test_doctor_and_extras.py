"""cxr-edge doctor on this (GPU-less) machine, and the install extras: one ONNX Runtime per environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fake_gpu
import pytest
import tomllib

from cxr_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
BASE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _names(reqs):
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_doctor_says_truthfully_that_no_gpu_path_runs_here(capsys):
    from cxr_edge.doctor import run_doctor

    r = run_doctor()
    assert r.get("ORT CPU").ok
    if not os.path.exists("/dev/nvidia0"):  # this workplace: no GPU, no TensorRT, no cuda-python
        assert not r.get("CUDA").ok and not r.get("TensorRT").ok
        trt_rows = [m for m in r.matrix if m["backend"].startswith("TensorRT engine")]
        assert trt_rows and all(m["status"] != "will run" and "pip install" in m["status"] for m in trt_rows)
        assert main(["doctor"]) == 0
        assert "No GPU path can run here" in capsys.readouterr().out
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matrix"]


def test_doctor_sees_a_gpu_and_tensorrt_through_the_fakes(monkeypatch):
    from cxr_edge.doctor import probe_cuda, probe_tensorrt

    fake_gpu.install(monkeypatch, 11)
    monkeypatch.setattr(fake_gpu.FakeCudart, "cudaGetDeviceCount", lambda self: (0, 1), raising=False)
    monkeypatch.setattr("cxr_edge.runtime.backends.tensorrt_api.tensorrt_installed", lambda: True)
    assert probe_cuda().ok and "NVIDIA Fake GPU (sm 8.9)" in probe_cuda().detail
    t = probe_tensorrt()
    assert t.ok and "11.4.0.106 (strongly typed only)" in t.detail and "TensorRT EP needs TensorRT 10" in t.detail


def test_no_install_combination_brings_both_onnxruntime_packages():
    assert "onnxruntime" not in _names(BASE) and "onnxruntime-gpu" not in _names(BASE)
    with_ort = {name for name, reqs in EXTRAS.items() if _names(reqs) & {"onnxruntime", "onnxruntime-gpu"}}
    assert with_ort == {"cpu", "gpu-cu12", "gpu-cu13"}
    readme = (ROOT / "README.md").read_text()
    import re

    for extras in re.findall(r"pip install -e '\.\[([^\]]+)\]'", readme):
        chosen = set(extras.split(","))
        assert len(chosen & with_ort) <= 1, f"README installs {chosen & with_ort} together"


def test_gpu_extras_pin_the_majors_the_code_supports():
    from packaging.requirements import Requirement

    for extra, cuda in (("gpu-cu12", "12"), ("gpu-cu13", "13")):
        reqs = {Requirement(r).name: Requirement(r) for r in EXTRAS[extra]}
        trt = reqs[f"tensorrt-cu{cuda}"]
        assert trt.specifier.contains("10.16.1.11") and not trt.specifier.contains("11.4.0.106")  # ORT's EP: TRT 10
        assert not trt.specifier.contains("8.6.1")
        cp = reqs["cuda-python"]
        assert cp.specifier.contains(f"{cuda}.9.0" if cuda == "12" else "13.4.4")
        assert not cp.specifier.contains("13.0.0" if cuda == "12" else "12.9.0")
    assert Requirement(EXTRAS["gpu-cu12"][0]).specifier.contains("1.26.0")  # last onnxruntime-gpu for CUDA 12
    assert not Requirement(EXTRAS["gpu-cu12"][0]).specifier.contains("1.27.0")


@pytest.mark.network
@pytest.mark.slow  # asks the package index: ~5 s each
@pytest.mark.parametrize("extra", ["gpu-cu12", "gpu-cu13", "jetson", "cpu"])
def test_each_gpu_extra_resolves_against_the_index(extra):
    """Every requirement of the extra has a release on the index that its specifier accepts.

    (A full ``pip install --dry-run`` downloads ~1.4 GB of CUDA wheels and then stops at the
    tensorrt-cuXX metapackage, an sdist that fetches its libraries from NVIDIA's own index.)
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    for req in map(Requirement, EXTRAS[extra]):
        res = subprocess.run([sys.executable, "-m", "pip", "index", "versions", req.name], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            pytest.skip(f"package index not reachable: {res.stderr.strip()[:200]}")
        line = next(l for l in res.stdout.splitlines() if l.startswith("Available versions:"))
        versions = [Version(v.strip()) for v in line.split(":", 1)[1].split(",")]
        assert any(req.specifier.contains(v) for v in versions), f"{extra}: nothing on the index satisfies {req}"


# ---- issue 27: advice per platform, TensorRT EP libraries, Jetson pins

def _platform(tmp_path, kind: str):
    from cxr_edge.gpu_platform import detect

    root = tmp_path / kind
    (root / "etc").mkdir(parents=True)
    if kind == "jetson":
        (root / "etc" / "nv_tegra_release").write_text(
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n")
        return detect(root, lambda: 12060, machine="aarch64", kernel="5.15.148-tegra")
    version = {"x86-cuda12": 12040, "x86-cuda13": 13000, "x86-none": None, "x86-old": 11080}[kind]
    return detect(root, lambda: version, machine="x86_64", kernel="6.8.0-generic")


@pytest.mark.parametrize("kind, extra, cupy", [("x86-cuda12", "gpu-cu12", "cupy-cuda12x"),
                                               ("x86-cuda13", "gpu-cu13", "cupy-cuda13x"),
                                               ("jetson", "jetson", "cupy-cuda12x")])
def test_doctor_advice_follows_the_platform(tmp_path, kind, extra, cupy):
    """No CUDA bindings, TensorRT or CuPy installed (this machine): the fix names this platform's extra and wheel;
    on a Jetson never 'upgrade the driver'."""
    from cxr_edge.doctor import format_report, probe_cuda, probe_cupy, probe_tensorrt, run_doctor

    plat = _platform(tmp_path, kind)
    assert plat.gpu_extra() == f"cxr-edge[{extra}]"
    if kind != "jetson":
        assert f"cxr-edge[{extra}]" in probe_cuda(plat).fix and f"cxr-edge[{extra}]" in probe_tensorrt(plat).fix
    else:
        assert plat.jetpack == "6.2" and plat.jetpack_cuda == "12.6" and "JetPack 6.2" in plat.describe()
        assert "jetson" in probe_cuda(plat).fix and "--system-site-packages" in probe_tensorrt(plat).fix
        assert "cuda-python>=12.6,<12.7" in plat.driver_fix() and "R525" not in plat.driver_fix()
    assert probe_cupy(plat).fix == f"pip install {cupy}"
    text = format_report(run_doctor(plat))
    assert "No GPU path can run here" in text  # still true on this machine whatever the platform says
    wrong = {"x86-cuda12": "gpu-cu13]", "x86-cuda13": "gpu-cu12]", "jetson": "R525"}[kind]
    assert wrong not in text


def test_doctor_advice_without_a_driver_or_with_an_old_one(tmp_path):
    none, old = _platform(tmp_path, "x86-none"), _platform(tmp_path, "x86-old")
    assert none.gpu_extra() is None and "no NVIDIA driver here" in none.install_fix()
    assert old.gpu_extra() is None and "supports CUDA 11.8" in old.install_fix() and "upgrade" in old.install_fix()
    assert "R525" in none.driver_fix()
    assert "JetPack 6.1 or 6.2" in _old_jetson(tmp_path).install_fix()


def _old_jetson(tmp_path):
    from cxr_edge.gpu_platform import detect

    root = tmp_path / "jp5"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref\n")
    return detect(root, lambda: None, machine="aarch64", kernel="5.10.120-tegra")


def test_tensorrt_ep_libraries_are_loaded_before_the_session(monkeypatch, tmp_path):
    """pip's tensorrt-cuXX-libs puts libnvinfer.so.10 in site-packages/tensorrt_libs: ONNX Runtime's TensorRT EP only
    activates when something loaded it first. The fake onnxruntime-gpu runs the EP only if the (recording) loader
    saw libnvinfer.so.10 before the session was created, as the real dynamic loader would."""
    import ctypes

    import tiny_models as tiny
    from test_ort_gpu_providers import CUDA, TRT, fake_ort_gpu

    from cxr_edge.runtime.backends import onnxruntime as ort_backend
    from cxr_edge.runtime.backends import ort_providers
    from cxr_edge.runtime.backends.registry import open_backend

    pkg = tmp_path / "site" / "tensorrt_libs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for lib in ort_providers.TENSORRT_EP_LIBS:
        (pkg / lib).write_bytes(b"\x7fELF placeholder")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loaded, events = [], []

    def loader(path, mode=0):
        assert mode == ctypes.RTLD_GLOBAL  # the EP's own dlopen must find the symbols
        loaded.append(Path(path).name)
        events.append(("dlopen", Path(path).name))

    monkeypatch.setattr(ort_providers, "_dlopen", loader)
    monkeypatch.setattr(ort_providers, "_preloaded", None)
    mod, calls = fake_ort_gpu(True)
    base = mod.InferenceSession

    class Session(base):
        def __init__(self, path, so=None, providers=None, provider_options=None):
            events.append(("session", tuple(providers)))
            super().__init__(path, so, providers, provider_options)
            if TRT in providers and "libnvinfer.so.10" in loaded:
                self._used = [TRT]

    mod.InferenceSession = Session
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    tiny.write_artifact(tmp_path / "art", "fp32")
    b = open_backend(tmp_path / "art" / "model.fp32.onnx", device="auto")
    b.load()
    assert b.info.provider == TRT, b.info
    assert events[:3] == [("dlopen", n) for n in ort_providers.TENSORRT_EP_LIBS] and events[3][0] == "session"
    assert "loaded libnvinfer.so.10" in b.info.details["tensorrt_libraries"]
    # without the pip libraries: said plainly, and the session truthfully reports CUDA
    monkeypatch.setattr(ort_providers, "_preloaded", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    loaded.clear()
    b2 = open_backend(tmp_path / "art" / "model.fp32.onnx", device="auto")
    b2.load()
    assert b2.info.provider == CUDA and "system loader path" in b2.info.details["tensorrt_libraries"]


def test_jetson_extra_pins_what_jetpack_6_ships():
    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in EXTRAS["jetson"]}
    cp, np_ = reqs["cuda-python"], reqs["numpy"]
    assert cp.specifier.contains("12.6.2.post1") and cp.specifier.contains("12.6.0")
    assert not cp.specifier.contains("12.8.0") and not cp.specifier.contains("12.9.4")  # JetPack 6: CUDA 12.6
    assert np_.specifier.contains("1.26.4") and not np_.specifier.contains("2.0.0")  # Jetson ORT wheels: numpy 1.x


@pytest.mark.network
@pytest.mark.slow
def test_jetson_extra_resolves_to_aarch64_wheels_for_jetpacks_python(tmp_path):
    """What pip would install on JetPack 6 (aarch64, Python 3.10), from the index's metadata, without installing."""
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--only-binary=:all:",
                          "--platform", "manylinux2014_aarch64", "--python-version", "3.10", "--target",
                          str(tmp_path / "t"), "--report", str(report), *[r for r in EXTRAS["jetson"]]],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and ("connection" in res.stderr.lower() or "network" in res.stderr.lower()):
        pytest.skip(f"package index not reachable: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr[-2000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got["cuda-python"].startswith("12.6") and got["numpy"].startswith("1."), got
