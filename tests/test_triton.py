"""Triton: model repository export validated by Triton's protobuf; serve-triton + triton:// on loopback."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from cxr_edge.errors import ConfigError

pytest.importorskip("tritonclient.grpc")


def test_libpython_path_fix():
    from cxr_edge.serve.triton_server import fix_libpython_path

    env = {"LD_LIBRARY_PATH": "/opt/x"}
    libdir = fix_libpython_path(env)
    if libdir is None:
        pytest.skip("this interpreter has no shared libpython")
    assert env["LD_LIBRARY_PATH"].split(":") == [libdir, "/opt/x"]
    fix_libpython_path(env)
    assert env["LD_LIBRARY_PATH"].split(":").count(libdir) == 1


def test_config_validation_rejects_bad_configs():
    from cxr_edge.export.triton import TritonConfig, validate_config

    with pytest.raises(ConfigError, match="does not parse"):
        validate_config('name: "x"\nmax_batch_size: "lots"\n')
    with pytest.raises(ConfigError, match="without dynamic_batching"):
        validate_config('name: "x"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                        'input [ { name: "image" data_type: TYPE_UINT8 dims: [ 4, 4, 1 ] } ]')
    with pytest.raises(ConfigError, match="outside 1..8"):
        TritonConfig(max_batch_size=8, preferred_batch_sizes=(4, 16))


def test_export_triton_repository(tiny_export, tmp_path):
    from cxr_edge.export.triton import TritonConfig, export_triton, validate_config

    s = tiny_export
    dirs = export_triton([a.path for a in s.artifacts], tmp_path / "repo", TritonConfig(max_batch_size=16, preferred_batch_sizes=(4, 8, 32 // 2)))
    assert sorted(d.name for d in dirs) == ["cxr_tiny_fp16", "cxr_tiny_fp32", "cxr_tiny_int8_cpu", "cxr_tiny_int8_ov",
                                            "cxr_tiny_int8_trt"]
    ov = validate_config(next(d for d in dirs if d.name == "cxr_tiny_int8_ov").joinpath("config.pbtxt").read_text())
    assert (ov.backend, ov.platform, ov.default_model_filename) == ("openvino", "", "model.onnx")
    cfg = validate_config((dirs[0] / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("image", [32, 32, 1])]
    assert {t.name: list(t.dims) for t in cfg.output} == {"probs": [2], "features": [32, 32, 4]}
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    import json

    from cxr_edge.manifest import ArtifactManifest

    manifest = ArtifactManifest.from_dict(json.loads(cfg.parameters["cxr_edge_manifest"].string_value))
    assert manifest.classes == ("COVID", "Normal") and manifest.preprocess.height == 32
    assert (dirs[0] / "1" / "model.onnx").is_file() and (dirs[0] / "model.head.npz").is_file()


# ------------------------------------------------------------------ live Triton via PyTriton

def _triton_python(tmp_path_factory) -> str:
    """A Python with PyTriton (which pins numpy<2, so it cannot share our environment)."""
    given = os.environ.get("CXR_EDGE_TRITON_PYTHON")
    if given:
        return given
    venv = tmp_path_factory.mktemp("triton-venv")
    py = venv / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "numpy<2", "nvidia-pytriton", "onnxruntime",
              "opencv-python-headless", "tqdm", "onnx", "tritonclient[http,grpc]"],
             [str(py), "-m", "pip", "install", "-q", "--no-deps", str(REPO)]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"PyTriton could not be installed here: {r.stderr.strip().splitlines()[-1:]}")
    return str(py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.network  # installs PyTriton into its own environment unless CXR_EDGE_TRITON_PYTHON names one
def test_serve_triton_and_triton_backend_on_loopback(tiny_export, tmp_path_factory):
    pytest.importorskip("tritonclient.http")
    from cxr_edge.runtime import Screener

    s, data = tiny_export, tiny_export.data
    art = next(a.path for a in s.artifacts if a.variant == "int8-cpu")
    py = _triton_python(tmp_path_factory)
    ports = [_free_port() for _ in range(3)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LD_LIBRARY_PATH", None)  # serve-triton must set it itself
    proc = subprocess.Popen([py, "-m", "cxr_edge.cli", "serve-triton", str(art), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--name", "cxr"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"triton://127.0.0.1:{ports[0]}/cxr"
        deadline = time.time() + 180
        import httpx

        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("serve-triton exited: " + proc.stdout.read()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{ports[0]}/v2/models/cxr/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Triton did not become ready")
        items = sorted((data / "COVID").iterdir())[:4] + [b"not an image"]
        with Screener(url, batch_size=4) as remote, Screener(art) as local:
            r, l = remote.predict(items), local.predict(items)
            assert remote.engine.info.backend == "triton" and remote.classes == local.classes
        assert [x.ok for x in r] == [True] * 4 + [False]
        for a, b in zip(r[:4], l[:4]):
            assert a.label == b.label
            assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < 1e-5
        metrics = httpx.get(f"http://127.0.0.1:{ports[2]}/metrics").text
        assert 'nv_inference_request_success{model="cxr",version="1"}' in metrics
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
