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
    monkeypatch.setattr("cxr_edge.runtime.tensorrt_api.tensorrt_installed", lambda: True)
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
