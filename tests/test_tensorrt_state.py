"""TensorRTBackend against fakes that keep the state a GPU keeps (tests/fake_gpu.py): CUDA graphs belong to the
context state they were captured with, and every allocation, stream, graph, engine and context belongs to the
GPU that was current in the creating thread (CUDA's current device is per host thread).

Issue 27: graphs were cached per batch size on one context that was reshaped between replays (a batch of 4
after a batch of 2 replayed the 4-graph on a context now shaped for 2), and ``device_index`` chose only the GPU
the compatibility check looked at: nothing called ``cudaSetDevice``, so engines loaded and ran on device 0, and
a service thread ran on device 0 whatever the engine. The manifest's ``cuda_runtime`` was the version
cuda-python was built for, not the runtime loaded.
"""

import threading

import fake_gpu
import numpy as np
import pytest
import tiny_models as tiny

from cxr_edge.errors import ManifestError
from cxr_edge.export.tensorrt_build import BuildConfig, build_engine
from cxr_edge.manifest import manifest_path, read_manifest
from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched
from cxr_edge.runtime.backends.registry import open_backend


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny.write_artifact(d, "fp32")
    return d


def _plan(monkeypatch, onnx_dir, tmp_path, major=10, batch=(1, 4, 8), **kw):
    trt, cudart = fake_gpu.install(monkeypatch, major, **kw)
    for f in (onnx_dir / "model.fp32.onnx", manifest_path(onnx_dir / "model.fp32.onnx")):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    plan = build_engine(tmp_path / "model.fp32.onnx", BuildConfig("fp32", *batch, gate=False))
    return plan, trt, cudart


def _reference(onnx_dir, x):
    return run_batched(cpu_session(onnx_dir / "model.fp32.onnx", numerics="tensorrt"), x, ["probs"])["probs"]


def _in_thread(fn, *args):
    """Run ``fn`` in a new thread (CUDA's current device there is device 0) and return its result."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc

    t = threading.Thread(target=body, name="fresh-thread")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------------------------------ CUDA graphs


@pytest.mark.parametrize("major", [10, 11])
def test_graphs_replayed_after_other_batch_sizes_give_the_no_graph_answers(monkeypatch, onnx_dir, tmp_path, major):
    """Old code: batch 4 again replayed the graph captured for 4 on the one context, now shaped for 2: NaN."""
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path, major)
    x = tiny.images(4)
    with open_backend(plan, cuda_graph=False) as eng:
        plain = [eng.infer(x[:b])["probs"] for b in (4, 2, 4)]
    with open_backend(plan, cuda_graph=True) as eng:
        graphed = [eng.infer(x[:b])["probs"] for b in (4, 2, 4)]
        assert cudart.calls.count("cudaGraphLaunch") == 3  # two captures, and the third call a replay
    for a, b in zip(plain, graphed):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(plain[0], _reference(onnx_dir, x), atol=1e-6)
    assert not cudart.violations, cudart.violations


def test_each_captured_batch_size_has_its_own_context_sharing_one_memory_block(monkeypatch, onnx_dir, tmp_path):
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    shapes_set: dict[int, list] = {}
    real = trt.IExecutionContext.set_input_shape

    def counting(self, name, shape):
        shapes_set.setdefault(id(self), []).append(tuple(shape))
        return real(self, name, shape)

    monkeypatch.setattr(trt.IExecutionContext, "set_input_shape", counting)
    x = tiny.images(8)
    ref = _reference(onnx_dir, x)
    with open_backend(plan, cuda_graph=True) as eng:
        for b in (1, 3, 8, 3, 1, 8, 3):
            np.testing.assert_allclose(eng.infer(x[:b])["probs"], ref[:b], atol=1e-6)
        graphs = eng._graphs
        assert sorted(graphs) == [1, 3, 8]
        contexts = [g[0] for g in graphs.values()]
        assert len({id(c) for c in contexts}) == 3  # one context per captured batch size
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        assert all(c._strategy == strategy for c in contexts)
        blocks = {c._memory for c in contexts}
        assert len(blocks) == 1 and next(iter(blocks))[1] >= eng.engine.device_memory_size_v2  # one shared block
        for c in contexts:  # each context is shaped once, for its batch size, and never again
            assert shapes_set[id(c)] == [(c._shapes["image"][0], *tiny.images(1).shape[1:])]
            assert c._addresses == eng.buffers
        # the buffers plus one activation block on the device: contexts add no memory of their own
        assert len(cudart.device) == len(eng.buffers) + 1
    assert not cudart.violations, cudart.violations
    assert not cudart.device and not cudart.graphs and not cudart.execs and not cudart.streams


def test_without_graphs_one_context_is_reshaped_per_call(monkeypatch, onnx_dir, tmp_path):
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    x = tiny.images(8)
    with open_backend(plan) as eng:
        for b in (1, 8, 3):
            np.testing.assert_allclose(eng.infer(x[:b])["probs"], _reference(onnx_dir, x[:b]), atol=1e-6)
        assert len(eng.engine._contexts) == 1 and not eng._graphs
    assert not cudart.violations and not cudart.device


# ------------------------------------------------------------------------------------------ several GPUs


def _owners(cudart, eng) -> dict:
    return {"buffers": {cudart.owner[p] for p in eng.buffers.values()},
            "stream": cudart.owner[eng.stream],
            "graphs": {cudart.owner[g[2]] for g in eng._graphs.values()},
            "engine": eng.engine._device}


@pytest.mark.parametrize("graph", [False, True])
def test_an_engine_on_device_1_keeps_everything_there_and_runs_from_any_thread(monkeypatch, onnx_dir, tmp_path, graph):
    """Old code: the engine, its buffers and stream went to device 0 whatever device_index said."""
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    x = tiny.images(8)
    ref = _reference(onnx_dir, x)
    eng = _in_thread(lambda: open_backend(plan, cuda_graph=graph, device_index=1).load())  # loaded in one thread
    try:
        np.testing.assert_allclose(eng.infer(x[:3])["probs"], ref[:3], atol=1e-6)  # run in this one
        np.testing.assert_allclose(_in_thread(lambda: eng.infer(x[:5])["probs"]), ref[:5], atol=1e-6)  # and a third
        np.testing.assert_allclose(_in_thread(lambda: eng.infer(x[:3])["probs"]), ref[:3], atol=1e-6)
        owners = _owners(cudart, eng)
        assert owners == {"buffers": {1}, "stream": 1, "graphs": {1} if graph else set(), "engine": 1}, owners
        assert eng.info.details["device_index"] == 1
    finally:
        _in_thread(eng.close)  # closed from yet another thread (a service shutting down)
    assert not cudart.violations, cudart.violations
    assert not cudart.device and not cudart.streams and not cudart.graphs and not cudart.execs and not cudart.pinned


def test_two_engines_on_two_gpus_take_turns_in_one_thread(monkeypatch, onnx_dir, tmp_path):
    """The device check is made against the thread's real current device, not a per-engine memo."""
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    x = tiny.images(6)
    ref = _reference(onnx_dir, x)
    with open_backend(plan, device_index=0, cuda_graph=True) as e0, \
            open_backend(plan, device_index=1, cuda_graph=True) as e1:
        for b in (2, 6, 2):
            for eng in (e0, e1, e0):
                np.testing.assert_allclose(eng.infer(x[:b])["probs"], ref[:b], atol=1e-6)
            np.testing.assert_allclose(_in_thread(lambda b=b: e1.infer(x[:b])["probs"]), ref[:b], atol=1e-6)
        assert _owners(cudart, e0)["buffers"] == {0} and _owners(cudart, e1)["buffers"] == {1}
        sets = cudart.calls.count("cudaSetDevice")
        e1.infer(x[:2])
        e1.infer(x[:2])
        assert cudart.calls.count("cudaSetDevice") == sets + 1  # switched once, then already current
    assert not cudart.violations, cudart.violations


class _DeviceArray:
    """What TensorRTBackend.infer_device reads of a CuPy array, over fake device memory."""

    def __init__(self, cudart, x: np.ndarray, device: int):
        prev = cudart.current()
        cudart.cudaSetDevice(device)
        _, ptr = cudart.cudaMalloc(x.nbytes)
        cudart.cudaSetDevice(prev)
        cudart.device[ptr][:] = x.reshape(-1).view(np.uint8)
        self.data = type("Mem", (), {"ptr": ptr})()
        self.device = type("Dev", (), {"id": device})()
        self.shape, self.dtype, self.nbytes, self._x = x.shape, x.dtype, x.nbytes, x

    def __len__(self):
        return len(self._x)

    def get(self):
        return self._x.copy()


def test_device_batches_run_on_the_engines_gpu_from_a_fresh_thread(monkeypatch, onnx_dir, tmp_path):
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    x = tiny.images(4)
    ref = _reference(onnx_dir, x)
    batch = _DeviceArray(cudart, x, device=1)
    with open_backend(plan, device_index=1, cuda_graph=True) as eng:
        for _ in range(2):
            np.testing.assert_allclose(_in_thread(lambda: eng.infer_device(batch)["probs"]), ref, atol=1e-6)
        assert cudart.owner[eng.buffers["image"]] == 1
        other = _DeviceArray(cudart, x, device=0)  # a batch left on another GPU goes through the host
        np.testing.assert_allclose(eng.infer_device(other)["probs"], ref, atol=1e-6)
    assert not cudart.violations, cudart.violations


def test_device_index_that_does_not_exist_is_a_clear_error(monkeypatch, onnx_dir, tmp_path):
    from cxr_edge.errors import EngineError

    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path)
    with pytest.raises(EngineError, match=r"cudaGetDeviceProperties\(2\).*cudaErrorInvalidDevice"):
        open_backend(plan, device_index=2).load()


def test_the_compatibility_check_and_the_build_see_the_gpu_in_use(monkeypatch, onnx_dir, tmp_path):
    """device_index names the GPU checked and used; a build records the thread's current GPU (old code: device 0)."""
    from cxr_edge.runtime.backends.tensorrt_api import current_device

    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path, models={1: ("NVIDIA Other GPU", (8, 6))})
    with pytest.raises(ManifestError, match=r"built on NVIDIA Fake GPU \(sm 8.9\), this is NVIDIA Other GPU"):
        open_backend(plan, device_index=1).load()

    def build_on_device_1():
        cudart.cudaSetDevice(1)
        assert current_device().gpu_name == "NVIDIA Other GPU"  # the calling thread's current device
        out = build_engine(tmp_path / "model.fp32.onnx", BuildConfig("fp32", 1, 4, 8),
                           out_path=tmp_path / "other.plan")
        assert cudart.current() == 1  # the build and its gate left the caller's device as it was
        return out

    other = _in_thread(build_on_device_1)
    doc = read_manifest(other)
    assert doc.device.gpu_name == "NVIDIA Other GPU" and doc.gate.passed is True
    with open_backend(other, device_index=1) as eng:
        assert eng.engine._device == 1
    assert not cudart.violations, cudart.violations


# ------------------------------------------------------------------------------------------ versions recorded


def test_the_manifest_records_the_cuda_runtime_loaded_not_the_bindings_build(monkeypatch, onnx_dir, tmp_path):
    """cuda-python's cudaRuntimeGetVersion() is the version its bindings were built for (12.9 here); the runtime
    library loaded is what getLocalRuntimeVersion() reports (12.6, JetPack 6)."""
    plan, trt, cudart = _plan(monkeypatch, onnx_dir, tmp_path, runtime=12060, bindings=12090, driver=12060)
    dev = read_manifest(plan).device
    assert dev.cuda_runtime == "12.6" and dev.cuda_bindings == "12.9" and dev.cuda_driver == "12.6"


def test_no_loadable_runtime_library_records_none(monkeypatch):
    from cxr_edge.runtime.backends.tensorrt_api import cuda_device

    trt, cudart = fake_gpu.install(monkeypatch, 10)

    def no_library():
        raise RuntimeError("Failed to dlopen libcudart.so.12")

    monkeypatch.setattr(cudart, "getLocalRuntimeVersion", no_library)
    gpu = cuda_device(0)
    assert gpu.runtime is None and gpu.bindings_runtime == "12.9" and gpu.driver == "12.6"
