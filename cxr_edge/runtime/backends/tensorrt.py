"""Native TensorRT engines: device buffers, pinned host buffers, one CUDA stream, optional CUDA graphs.

Needs a GPU, ``tensorrt`` (10.x or 11.x) and ``cuda-python``, imported only when an engine is loaded.
The engine's manifest is checked against this GPU and TensorRT version before deserialising: engines
are not portable, and a mismatch says how to rebuild.

Every TensorRT call that reports failure by its return value and every CUDA call is checked
(:func:`check_trt`, :func:`check_cuda`): an unchecked ``set_input_shape`` would run the previous
shape and return another batch's answers. CUDA graphs (``cuda_graph=True``) are captured once per
batch size in thread-local capture mode (a global capture is invalidated by any CUDA call another
thread makes meanwhile, e.g. the service's decoders), destroyed on close, and the stream is
synchronised before any memory is freed.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ConfigError, EngineError
from ..tensorrt_api import check_cuda, check_engine_compat, check_trt, current_device, require_cudart, require_tensorrt
from .base import Backend, BackendInfo

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import tensorrt


class TensorRTBackend(Backend):
    """Options: cuda_graph (bool), device_index (int)."""

    name = "tensorrt"
    runtime: tensorrt.Runtime | None
    engine: tensorrt.ICudaEngine
    context: tensorrt.IExecutionContext
    stream: int | None
    input_name: str

    def batch_range(self) -> tuple[int, int]:
        prof = self.manifest.get("profile", {})
        return (int(prof.get("min", [1])[0]), int(prof.get("max", [1])[0]))

    def _load(self) -> BackendInfo:
        _, flavor = require_tensorrt()
        import tensorrt as trt  # typed by tensorrt-stubs in CI's type check

        cudart = require_cudart()
        dev = current_device(int(self.options.get("device_index", 0)))
        check_engine_compat(self.manifest, dev, self.artifact)
        self.trt, self.cudart = trt, cudart
        self.buffers: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self._pinned: list[int] = []
        self._graphs: dict[int, tuple] = {}
        self.stream = None
        self.runtime = None
        try:
            self._open(cudart)
        except BaseException:
            self._release()
            raise
        self.use_graph = bool(self.options.get("cuda_graph", False))
        return BackendInfo("tensorrt", f"TensorRT {flavor.version} on {dev.gpu_name}", self.manifest.get("precision", "fp32"),
                           "cuda", {"gpu_name": dev.gpu_name, "compute_capability": dev.compute_capability,
                                    "cuda_graph": self.use_graph,
                                    "tensorrt_typing": flavor.to_dict()["typing"],
                                    "profile": list(self.batch_range())})

    def _open(self, cudart) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        blob = self.model_bytes if self.model_bytes is not None else self.artifact.read_bytes()
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialise {self.artifact}; rebuild it with cxr-edge build.")
        self.engine = engine
        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?).")
        self.context = context
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise EngineError(f"{self.artifact.name} has {len(inputs)} inputs; cxr-edge engines have exactly one.")
        self.input_name = inputs[0]
        max_b = self.batch_range()[1]
        for n in self.names:
            shape = [max_b if d < 0 or i == 0 else int(d) for i, d in enumerate(self.engine.get_tensor_shape(n))]
            if any(d < 0 for d in shape[1:]):
                raise EngineError(f"Tensor {n!r} has a dynamic non-batch dimension {shape}; cxr-edge engines have "
                                  "fixed image sizes.")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.buffers[n] = int(check_cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {n!r}"))
            ptr = int(check_cuda(cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))  # pinned: async copies
            self._pinned.append(ptr)
            raw = (ctypes.c_byte * nbytes).from_address(ptr)
            self.host[n] = np.ctypeslib.as_array(raw).view(dtype).reshape(shape)
            check_trt(self.context.set_tensor_address(n, self.buffers[n]), f"the device address of {n!r}")

    def _enqueue(self) -> None:
        check_trt(self.context.execute_async_v3(int(self.stream or 0)), "execute_async_v3 (engine execution)")

    def _launch(self, n: int) -> None:
        if not self.use_graph:
            self._enqueue()
            return
        graph = self._graphs.get(n)
        if graph is None:
            graph = self._graphs[n] = self._capture()
        check_cuda(self.cudart.cudaGraphLaunch(graph[1], self.stream), "cudaGraphLaunch")

    def _capture(self) -> tuple:
        """Record one execution of the current shape as a CUDA graph (TensorRT's documented recipe)."""
        cudart = self.cudart
        self._enqueue()  # a first run outside capture lets TensorRT finish its lazy initialisation
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue()
        finally:
            graph = check_cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            exe = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EngineError:
            cudart.cudaGraphDestroy(graph)
            raise
        return (graph, exe)

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        n = len(batch)
        self.host[self.input_name][:n] = batch
        check_trt(self.context.set_input_shape(self.input_name, tuple(batch.shape)), f"input shape {tuple(batch.shape)}")
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(cudart.cudaMemcpyAsync(self.buffers[self.input_name], self.host[self.input_name].ctypes.data,
                                          batch.nbytes, kind_h2d, self.stream), "cudaMemcpyAsync (input)")
        self._launch(n)
        return self._fetch(outputs)

    def _fetch(self, outputs: list[str]) -> dict[str, np.ndarray]:
        """Copy the named outputs of the last launch to the host and wait for the stream."""
        cudart = self.cudart
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = {}
        for name in outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT gave output {name!r} the unresolved shape {shape}.")
            nbytes = int(np.prod(shape)) * self.host[name].dtype.itemsize
            check_cuda(cudart.cudaMemcpyAsync(self.host[name].ctypes.data, self.buffers[name], nbytes, kind_d2h,
                                              self.stream), f"cudaMemcpyAsync ({name})")
            shapes[name] = shape
        check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {name: self.host[name].reshape(-1)[: int(np.prod(s))].reshape(s).copy() for name, s in shapes.items()}

    def infer_device(self, batch, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """A CuPy batch from GPU preprocessing: copied device to device into the engine's fixed input buffer
        (so captured CUDA graphs stay valid), with no trip through the host."""
        lo, hi = self.batch_range()
        n = len(batch)
        if not hasattr(batch, "data") or not hasattr(batch.data, "ptr") or not lo <= n <= hi:
            return super().infer_device(batch, outputs)  # host arrays, or a batch the profile must pad or split
        if not self._loaded:
            self.load()
        if tuple(batch.shape[1:]) != self.spec.input_shape or str(batch.dtype) != "uint8":
            raise ConfigError(f"Expected a uint8 device batch of shape (N, {', '.join(map(str, self.spec.input_shape))}), "
                              f"got {str(batch.dtype)} {tuple(batch.shape)}.")
        wanted = outputs or self.outputs
        cudart = self.cudart
        check_trt(self.context.set_input_shape(self.input_name, tuple(batch.shape)), f"input shape {tuple(batch.shape)}")
        check_cuda(cudart.cudaMemcpyAsync(self.buffers[self.input_name], int(batch.data.ptr), int(batch.nbytes),
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream),
                   "cudaMemcpyAsync (device input)")
        self._launch(n)
        return self._temperature(self._fetch(wanted))

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free everything _open made, in dependency order; safe to call on a half-opened engine."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)  # nothing may still be reading the buffers
        for graph, exe in self._graphs.values():
            cudart.cudaGraphExecDestroy(exe)
            cudart.cudaGraphDestroy(graph)
        self._graphs.clear()
        # TensorRT objects go before the memory they point into
        self.context = self.engine = self.runtime = None  # type: ignore[assignment]
        for ptr in self.buffers.values():
            cudart.cudaFree(ptr)
        for ptr in self._pinned:
            cudart.cudaFreeHost(ptr)
        self.buffers, self.host, self._pinned = {}, {}, []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
