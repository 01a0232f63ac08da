import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXR_DEV_DATA", REPO.parent / "shared" / "data" / "cxr-dev"))

HAS_TF = importlib.util.find_spec("tensorflow") is not None

#: prepended to subprocess test code: makes importing TensorFlow/Keras/tf2onnx fail, as on a kiosk
BLOCK_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""
HAS_PYDICOM = importlib.util.find_spec("pydicom") is not None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tuning records go to a folder of each test's own, never into the user's ~/.cache: no test reads a
    tuning another test (or an earlier run on this machine) left, so "no backend named" means the default."""
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path_factory.mktemp("cxr_edge_cache")))


def _has_cuda() -> bool:
    """A CUDA device: /dev/nvidia0 on x86 servers, /dev/nvhost-* and /etc/nv_tegra_release on Jetson
    (which has no /dev/nvidia0), or whatever the CUDA runtime says where cuda-python is installed."""
    from cxr_edge.doctor import is_jetson

    if os.path.exists("/dev/nvidia0") or is_jetson() or os.path.exists("/dev/nvhost-ctrl-gpu"):
        return True
    try:
        from cxr_edge.runtime.backends.tensorrt_api import require_cudart

        err, n = require_cudart().cudaGetDeviceCount()
        return int(err) == 0 and n > 0
    except Exception:
        return False


def _has_tensorrt() -> bool:
    from cxr_edge.runtime.backends.tensorrt_api import tensorrt_installed

    return tensorrt_installed()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (pip install 'cxr-edge[gpu-cu12]' on a GPU machine)")
    skip_tf = pytest.mark.skip(reason="needs the train extra (TensorFlow)")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not _has_tensorrt():
            item.add_marker(skip_trt)
        if "train" in item.keywords and not HAS_TF:
            item.add_marker(skip_tf)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "SOURCES.csv").is_file():
        pytest.skip(f"real CXR data not found at {REAL_DATA}")
    return REAL_DATA


def cxr_like(h=96, w=96, seed=0) -> np.ndarray:
    from cxr_edge.synthetic import synth_cxr

    img = synth_cxr("Normal", max(h, w), np.random.default_rng(seed))
    return (img[:h, :w] * 255).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from cxr_edge.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), per_class=40, sizes=(96, 128, 160), seed=1)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A Grad-CAM-capable export directory built with onnx.helper in about a second, no TensorFlow:
    what runtime, serve, bench, trust, fault and Triton tests run on (see tests/tiny_models.py)."""
    from tiny_models import write_artifact_set

    from cxr_edge.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_export")
    data = write_synthetic_dataset(root / "data", per_class=20, sizes=(64, 96), seed=5)
    return write_artifact_set(root / "art", data)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The one small CNN trained per session (Keras): training, evaluation and export tests share it."""
    pytest.importorskip("tensorflow")
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    data = write_synthetic_dataset(root / "data", per_class=60, sizes=(64, 96), seed=5)
    cfg = TrainConfig(recipe="small_cnn", epochs=10, learning_rate=0.01, image_size=32, verbose=0, seed=0)
    return train(cfg, data, root / "m"), data


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The session's small CNN exported by the real pipeline: for tests of export and the Keras baseline."""
    from cxr_edge.export.pipeline import ExportConfig, export_model

    r, data = trained
    summary = export_model(r.model_path, tmp_path_factory.mktemp("export") / "art", ExportConfig(calib_size=60))
    return r, summary, data


@pytest.fixture(autouse=True)
def _free_keras_memory(request):
    """Keras keeps every model built in a process alive; drop them after tests that build Keras models
    (big backbones add up). Only those: a full gc.collect over TensorFlow's heap costs ~4 s a test."""
    yield
    import sys

    if "keras" in sys.modules and (request.node.get_closest_marker("train") or request.node.get_closest_marker("slow")):
        import gc

        sys.modules["keras"].backend.clear_session()
        gc.collect()
