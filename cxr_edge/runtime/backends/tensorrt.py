"""Native TensorRT engines: device buffers, pinned host buffers, one CUDA stream, optional CUDA graph.

Needs a GPU, ``tensorrt`` and ``cuda-python`` (``cxr-edge[gpu]``), imported only when an engine is
loaded. The engine's manifest is checked against this GPU and TensorRT version before deserialising:
engines are not portable, and a mismatch says how to rebuild.
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from .base import Backend, BackendInfo


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            from ...errors import MissingExtraError

            raise MissingExtraError("The TensorRT backend needs cuda-python: pip install 'cxr-edge[gpu]'.") from exc
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend(Backend):
    formats = ("tensorrt",)
    name = "tensorrt"

    def batch_range(self) -> tuple[int, int]:
        prof = self.manifest.get("profile", {})
        return (prof.get("min", [1])[0], prof.get("max", [1])[0])

    def _load(self) -> BackendInfo:
        from ...export.tensorrt_build import check_engine_compat, current_device, require_tensorrt

        trt = require_tensorrt()
        cudart = _cudart()
        dev = current_device()
        check_engine_compat(self.manifest, dev, self.artifact)
        self.cudart = cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if self.engine is None:
            raise ConfigError(f"TensorRT could not deserialise {self.artifact}; rebuild it with cxr-edge build.")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        max_b = self.batch_range()[1]
        self.buffers, self.host = {}, {}
        for n in self.names:
            shape = list(self.engine.get_tensor_shape(n))
            shape[0] = max_b
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.buffers[n] = _check(cudart.cudaMalloc(nbytes))
            ptr = _check(cudart.cudaMallocHost(nbytes))  # pinned: async copies need page-locked memory
            self.host[n] = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_byte * nbytes).from_address(ptr)).view(dtype).reshape(shape)
            self.context.set_tensor_address(n, int(self.buffers[n]))
        self.use_graph = bool(self.options.get("cuda_graph", False))
        self._graphs: dict[int, object] = {}
        return BackendInfo("tensorrt", f"TensorRT {trt.__version__} on {dev.gpu_name}", self.manifest.get("precision", "fp32"),
                           "cuda", {"compute_capability": dev.compute_capability, "cuda_graph": self.use_graph})

    def _run(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        n = len(batch)
        self.host[self.input_name][:n] = batch
        self.context.set_input_shape(self.input_name, batch.shape)
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self.buffers[self.input_name], self.host[self.input_name].ctypes.data,
                                      batch.nbytes, kind_h2d, self.stream))
        if self.use_graph:
            graph = self._graphs.get(n)
            if graph is None:  # capture once per batch size, replay afterwards
                self._run()  # a first run outside capture lets TensorRT finish lazy initialisation
                _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
                self._run()
                g = _check(cudart.cudaStreamEndCapture(self.stream))
                graph = self._graphs[n] = _check(cudart.cudaGraphInstantiate(g, 0))
            _check(cudart.cudaGraphLaunch(graph, self.stream))
        else:
            self._run()
        out = {}
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self.host[name].dtype.itemsize
            _check(cudart.cudaMemcpyAsync(self.host[name].ctypes.data, self.buffers[name], nbytes, kind_d2h, self.stream))
            out[name] = shape
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {name: self.host[name][: shape[0]].reshape(shape).copy() for name, shape in out.items()}

    def _close(self) -> None:
        for ptr in self.buffers.values():
            self.cudart.cudaFree(ptr)
        for arr in self.host.values():
            self.cudart.cudaFreeHost(arr.ctypes.data)
        self.cudart.cudaStreamDestroy(self.stream)
        self.context = self.engine = self.runtime = None
