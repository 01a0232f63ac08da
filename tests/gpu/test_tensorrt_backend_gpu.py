"""TensorRTBackend's buffers, stream and CUDA graphs run for real on a GPU, with a stand-in TensorRT.

TensorRT itself cannot be installed where the kit runs, so ``tensorrt`` is a small module with the real
API's shape whose engine, on ``execute_async_v3(stream)``, launches a CUDA kernel (CuPy RawKernel) on that
stream: it reads the input from the device address TensorRTBackend set and writes the output to its device
address. Everything else is real: cuda-bindings' cudaMalloc/cudaMallocHost/cudaMemcpyAsync, the stream,
and the thread-local CUDA graph capture and replay, at batch 1, 3, 8 and 32, graphs off and on.
"""

import sys
import types

import numpy as np
import pytest
from gpu_env import cudart_or_skip, cupy_or_skip

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]

KERNEL = r"""
extern "C" __global__ void mean_probs(unsigned long long xp, unsigned long long op, int pixels) {
    const unsigned char* x = (const unsigned char*)xp;
    float* out = (float*)op;
    __shared__ float buf[256];
    int i = blockIdx.x;
    float s = 0.f;
    for (int p = threadIdx.x; p < pixels; p += blockDim.x) s += x[(size_t)i * pixels + p];
    buf[threadIdx.x] = s;
    __syncthreads();
    for (int k = 128; k > 0; k >>= 1) { if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k]; __syncthreads(); }
    if (threadIdx.x == 0) { float m = buf[0] / pixels / 255.f; out[2 * i] = m; out[2 * i + 1] = 1.f - m; }
}
"""
H = W = 32


def make_trt(cp):
    kernel = cp.RawKernel(KERNEL, "mean_probs")
    kernel.compile()  # before any capture: compiling inside a captured stream is not allowed

    class TensorIOMode:
        INPUT, OUTPUT = 0, 1

    class DataType:
        UINT8, FLOAT = "uint8", "float32"

    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = 0, 1, 2

    class Engine:
        num_io_tensors = 2
        launches = 0
        device_memory_size_v2 = 0  # the kernel needs no activation memory

        def get_tensor_name(self, i):
            return ("image", "probs")[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return [-1, H, W, 1] if name == "image" else [-1, 2]

        def get_tensor_dtype(self, name):
            return DataType.UINT8 if name == "image" else DataType.FLOAT

        def create_execution_context(self, strategy=0):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, None

        def set_device_memory(self, memory, size):
            self.memory = (int(memory), int(size))

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)
            return True

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= 32 or tuple(shape[1:]) != (H, W, 1):
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shape if name == "image" else (self.shape[0], 2)

        def execute_async_v3(self, stream):
            n = self.shape[0]
            with cp.cuda.ExternalStream(int(stream)):
                kernel((n,), (256,), (cp.uint64(self.addr["image"]), cp.uint64(self.addr["probs"]), cp.int32(H * W)))
            Engine.launches += 1
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if bytes(blob).startswith(b"CUPYPLAN") else None

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.Builder = object  # marks a real module for tensorrt_installed()
    trt.Logger, trt.Runtime, trt.TensorIOMode, trt.DataType = Logger, Runtime, TensorIOMode, DataType
    trt.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    trt.nptype = lambda t: np.dtype(t)
    trt.Engine = Engine
    return trt


@pytest.fixture
def plan(tmp_path, monkeypatch):
    cp = cupy_or_skip()
    cudart_or_skip()
    trt = make_trt(cp)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    from cxr_edge.manifest import write_manifest
    from cxr_edge.runtime.backends.tensorrt_api import current_device

    dev = current_device(0)
    path = tmp_path / "model.fp32.plan"
    path.write_bytes(b"CUPYPLAN")
    write_manifest(path, {"kind": "tensorrt-engine", "format": "tensorrt", "classes": ["COVID", "Normal"],
                          "precision": "fp32", "outputs": [{"name": "probs"}],
                          "preprocess": {"height": H, "width": W, "mode": "rescale", "input_channels": 1,
                                         "model_channels": 1},
                          "profile": {"min": [1, H, W, 1], "opt": [8, H, W, 1], "max": [32, H, W, 1]},
                          "device": {"gpu_name": dev.gpu_name, "compute_capability": dev.compute_capability,
                                     "tensorrt_version": dev.tensorrt_version}})
    return path, trt, cp


@pytest.mark.parametrize("graph", [False, True])
def test_buffers_streams_and_graphs_run_for_real(plan, graph):
    from cxr_edge.runtime.backends.registry import open_backend

    path, trt, cp = plan
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, H, W, 1), dtype=np.uint8)
    ref = x.reshape(32, -1).mean(1) / 255.0
    trt.Engine.launches = 0
    with open_backend(path, cuda_graph=graph) as eng:
        assert eng.info.device == "cuda" and eng.info.details["cuda_graph"] is graph
        for b in (1, 3, 8, 32, 3, 1):
            p = eng.infer(x[:b])["probs"]
            np.testing.assert_allclose(p[:, 0], ref[:b], atol=1e-5)
            np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        dev = eng.infer_device(cp.asarray(x[:8]))["probs"]  # a device batch: device-to-device, no host trip
        np.testing.assert_allclose(dev[:, 0], ref[:8], atol=1e-5)
        if graph:
            assert len(eng._graphs) == 4  # one graph per batch size, replayed afterwards
            assert trt.Engine.launches == 4 * 2  # each size: one warm-up run and one captured run
        else:
            assert trt.Engine.launches == 7
    assert not eng._graphs and not eng.buffers  # everything released
