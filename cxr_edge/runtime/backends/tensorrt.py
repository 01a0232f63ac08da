"""Native TensorRT engines: device buffers, pinned host buffers, one CUDA stream, optional CUDA graphs, on a chosen GPU.

Needs a GPU, ``tensorrt`` (10.x or 11.x) and ``cuda-python``, imported only when an engine is loaded.
The engine's manifest is checked against this GPU and TensorRT version before deserialising: engines
are not portable, and a mismatch says how to rebuild.

Every TensorRT call that reports failure by its return value and every CUDA call is checked
(:func:`check_trt`, :func:`check_cuda`): an unchecked ``set_input_shape`` would run the previous
shape and return another batch's answers.

**Which GPU.** ``device_index`` (default: the loading thread's current device) is the GPU the engine is checked
against, deserialised on, and run on. CUDA's current device is a property of each host thread, and every
allocation, stream, graph and TensorRT object belongs to the device current when it was made; the service calls
``infer``/``infer_device``/``close`` from its batcher thread or a thread pool, which start on device 0. So every
entry point first makes the engine's device current in the calling thread (:meth:`_bind`): one
``cudaGetDevice``, and ``cudaSetDevice`` only when it differs. The check asks CUDA rather than remembering what
this engine set in a ``threading.local``: two engines on two GPUs may take turns in one thread, and other code
(CuPy preprocessing) may switch the thread's device between calls; a per-engine memo would then run on the
wrong GPU. The device is left current afterwards, so the caller's next GPU work lands on the same GPU.

**CUDA graphs** (``cuda_graph=True``). A captured graph replays the kernels of the context state it was
captured with: input shape, tensor addresses, device memory. TensorRT's guidance is one execution context per
captured shape, or a re-capture after any change. Re-capturing whenever the batch size changes would put a
capture (several milliseconds) in front of most calls of a service whose batches vary, so this backend keeps
**one execution context per captured batch size**: each is created once, given the tensor addresses and its
input shape once, captured once, and never reshaped, so its graph stays valid for the engine's life. The
contexts share one block of activation memory: they are created with
``ExecutionContextAllocationStrategy.USER_MANAGED`` and given ``set_device_memory(ptr, size)`` with
``engine.device_memory_size_v2`` bytes (all three exist, with these calling forms, in TensorRT 10.3, 10.16 and
11.4; ``context.device_memory`` is a write-only property there and ``get_device_memory_size_for_profile_v2``
is not needed for a one-profile engine). Sharing is safe because the contexts never run in parallel: every
launch goes to the engine's one stream, under one lock, and each call waits for its stream before returning;
TensorRT forbids sharing memory, like using one optimisation profile (every new context gets profile 0), only
between contexts executing in parallel. Without graphs one context is reshaped per call, as TensorRT intends.
Graphs are captured in thread-local mode (a global capture is invalidated by any CUDA call another thread makes
meanwhile, e.g. the service's decoders), destroyed on close, and the stream is synchronised before any memory is
freed.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError, EngineError
from ...manifest import Manifest
from .base import Backend, BackendInfo, BackendOptions
from .tensorrt_api import (
    check_cuda,
    check_engine_compat,
    check_trt,
    current_device,
    current_device_index,
    require_cudart,
    require_tensorrt,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import tensorrt


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """TensorRT's own option beside the common ones (``cuda_graph``: replay each batch size as a CUDA graph)."""

    device_index: int | None = None  # the GPU; None: the loading thread's current CUDA device


class TensorRTBackend(Backend):
    """Options: :class:`TensorRTOptions`."""

    name = "tensorrt"
    Options = TensorRTOptions
    opts: TensorRTOptions
    runtime: tensorrt.Runtime | None
    engine: tensorrt.ICudaEngine | None
    context: tensorrt.IExecutionContext | None  # the context reshaped per call (graphs off); graphs on: the first one
    stream: int | None
    input_name: str
    device_index: int

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """The engine as built (its profile and tactics were chosen at build time); nothing when the CPU is asked for."""
        return [] if device == "cpu" else [{}]

    def batch_range(self) -> tuple[int, int]:
        prof = self.manifest.profile
        return prof.batch_range if prof is not None else (1, 1)

    def _load(self) -> BackendInfo:
        _, flavor = require_tensorrt()
        import tensorrt as trt  # typed by tensorrt-stubs in CI's type check

        cudart = require_cudart()
        self.trt, self.cudart = trt, cudart
        index = self.opts.device_index
        self.device_index = current_device_index() if index is None else index
        dev = current_device(self.device_index)
        check_engine_compat(self.manifest, dev, self.artifact)
        self.buffers: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self._pinned: list[int] = []
        # batch size -> (its own context, graph, executable graph)
        self._graphs: dict[int, tuple[tensorrt.IExecutionContext, Any, Any]] = {}
        self._memory: int | None = None  # TensorRT's activation memory, shared by every context
        self._memory_size = 0
        self._lock = threading.Lock()  # one stream, one set of buffers: calls run one at a time
        self.stream = None
        self.runtime = self.engine = self.context = None
        self.use_graph = bool(self.opts.cuda_graph)
        try:
            self._bind()
            self._open(cudart)
        except BaseException:
            self._release()
            raise
        return BackendInfo("tensorrt", f"TensorRT {flavor.version} on {dev.gpu_name}", self.manifest.precision.value,
                           "cuda", {"gpu_name": dev.gpu_name, "compute_capability": dev.compute_capability,
                                    "device_index": self.device_index, "cuda_graph": self.use_graph,
                                    "tensorrt_typing": flavor.to_dict()["typing"],
                                    "profile": list(self.batch_range())})

    def _bind(self) -> None:
        """Make the engine's GPU the calling thread's current device (CUDA keeps one per host thread)."""
        cudart = self.cudart
        if int(check_cuda(cudart.cudaGetDevice(), "cudaGetDevice")) != self.device_index:
            check_cuda(cudart.cudaSetDevice(self.device_index), f"cudaSetDevice({self.device_index})")

    def _open(self, cudart) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        blob = self.model_bytes if self.model_bytes is not None else self.artifact.read_bytes()
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialise {self.artifact}; rebuild it with cxr-edge build.")
        self.engine = engine
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise EngineError(f"{self.artifact.name} has {len(inputs)} inputs; cxr-edge engines have exactly one.")
        self.input_name = inputs[0]
        max_b = self.batch_range()[1]
        for n in self.names:
            shape = [max_b if d < 0 or i == 0 else int(d) for i, d in enumerate(engine.get_tensor_shape(n))]
            if any(d < 0 for d in shape[1:]):
                raise EngineError(f"Tensor {n!r} has a dynamic non-batch dimension {shape}; cxr-edge engines have "
                                  "fixed image sizes.")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.buffers[n] = int(check_cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {n!r}"))
            ptr = int(check_cuda(cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))  # pinned: async copies
            self._pinned.append(ptr)
            raw = (ctypes.c_byte * nbytes).from_address(ptr)
            self.host[n] = np.ctypeslib.as_array(raw).view(dtype).reshape(shape)
        self._memory_size = int(engine.device_memory_size_v2)  # the most any shape of any profile needs
        if self._memory_size:
            self._memory = int(check_cuda(cudart.cudaMalloc(self._memory_size),
                                          f"cudaMalloc({self._memory_size}) for TensorRT's activations"))
        self.context = self._new_context()

    def _new_context(self) -> tensorrt.IExecutionContext:
        """An execution context on the shared activation memory with every tensor address set (no shape yet)."""
        assert self.engine is not None
        context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?).")
        context.set_device_memory(self._memory or 0, self._memory_size)
        for n in self.names:
            check_trt(context.set_tensor_address(n, self.buffers[n]), f"the device address of {n!r}")
        return context

    def _enqueue(self, context: tensorrt.IExecutionContext) -> None:
        check_trt(context.execute_async_v3(int(self.stream or 0)), "execute_async_v3 (engine execution)")

    def _run(self, shape: tuple[int, ...]) -> tensorrt.IExecutionContext:
        """Run the engine on the first ``shape[0]`` images of the input buffer; returns the context that ran."""
        if not self.use_graph:
            context = self.context
            if context is None:
                raise EngineError("The TensorRT engine is closed.")
            check_trt(context.set_input_shape(self.input_name, shape), f"input shape {shape}")
            self._enqueue(context)
            return context
        entry = self._graphs.get(shape[0])
        if entry is None:
            entry = self._graphs[shape[0]] = self._capture(shape)
        check_cuda(self.cudart.cudaGraphLaunch(entry[2], self.stream), "cudaGraphLaunch")
        return entry[0]

    def _capture(self, shape: tuple[int, ...]) -> tuple[tensorrt.IExecutionContext, Any, Any]:
        """A context of its own for this batch size, shaped once, and one execution of it recorded as a CUDA graph
        (TensorRT's documented recipe)."""
        cudart = self.cudart
        taken = any(entry[0] is self.context for entry in self._graphs.values())
        context = self._new_context() if taken or self.context is None else self.context
        check_trt(context.set_input_shape(self.input_name, shape), f"input shape {shape}")
        self._enqueue(context)  # a first run outside capture lets TensorRT finish its lazy initialisation
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue(context)
        finally:
            graph = check_cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            exe = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EngineError:
            cudart.cudaGraphDestroy(graph)
            raise
        return (context, graph, exe)

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        n = len(batch)
        with self._lock:
            self._bind()
            self.host[self.input_name][:n] = batch
            kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check_cuda(cudart.cudaMemcpyAsync(self.buffers[self.input_name], self.host[self.input_name].ctypes.data,
                                              batch.nbytes, kind_h2d, self.stream), "cudaMemcpyAsync (input)")
            context = self._run(tuple(int(d) for d in batch.shape))
            return self._fetch(context, outputs)

    def _fetch(self, context: tensorrt.IExecutionContext, outputs: list[str]) -> dict[str, np.ndarray]:
        """Copy the named outputs of the last launch to the host and wait for the stream."""
        cudart = self.cudart
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = {}
        for name in outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
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
        (so captured CUDA graphs stay valid), with no trip through the host. A batch on another GPU than the
        engine's goes through the host."""
        lo, hi = self.batch_range()
        n = len(batch)
        if not hasattr(batch, "data") or not hasattr(batch.data, "ptr") or not lo <= n <= hi:
            return super().infer_device(batch, outputs)  # host arrays, or a batch the profile must pad or split
        if not self._loaded:
            self.load()
        if getattr(getattr(batch, "device", None), "id", self.device_index) != self.device_index:
            return super().infer_device(batch, outputs)
        if tuple(batch.shape[1:]) != self.spec.input_shape or str(batch.dtype) != "uint8":
            raise ConfigError(f"Expected a uint8 device batch of shape (N, {', '.join(map(str, self.spec.input_shape))}), "
                              f"got {str(batch.dtype)} {tuple(batch.shape)}.")
        wanted = outputs or self.outputs
        cudart = self.cudart
        with self._lock:
            self._bind()
            check_cuda(cudart.cudaMemcpyAsync(self.buffers[self.input_name], int(batch.data.ptr), int(batch.nbytes),
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream),
                       "cudaMemcpyAsync (device input)")
            context = self._run(tuple(int(d) for d in batch.shape))
            out = self._fetch(context, wanted)
        return self._temperature(out)

    def _close(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Free everything _open made, in dependency order, on the engine's GPU; safe on a half-opened engine."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        try:
            self._bind()  # TensorRT objects, streams, graphs and memory are released on the device they belong to
        except EngineError as exc:
            log.warning("releasing the TensorRT engine: %s", exc)
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)  # nothing may still be reading the buffers
        for _, graph, exe in self._graphs.values():
            cudart.cudaGraphExecDestroy(exe)
            cudart.cudaGraphDestroy(graph)
        self._graphs.clear()
        # TensorRT objects go before the memory they point into
        self.context = self.engine = self.runtime = None
        if self._memory is not None:
            cudart.cudaFree(self._memory)
            self._memory = None
        for ptr in self.buffers.values():
            cudart.cudaFree(ptr)
        for ptr in self._pinned:
            cudart.cudaFreeHost(ptr)
        self.buffers, self.host, self._pinned = {}, {}, []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
