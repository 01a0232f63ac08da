"""A fake TensorRT (10.x or 11.x API shape) and a fake CUDA runtime that run on the CPU.

They exist so that ``build_engine`` and ``TensorRTBackend`` are driven end to end where no GPU is:
every attribute they expose exists in the real bindings of that TensorRT major / cuda-bindings
(checked by ``test_tensorrt_api.py`` against the fixtures read from the real wheels), return values
follow the real conventions (``(err, value)`` tuples from CUDA, ``bool`` from ``set_*``), and they
are strict where the real ones are: TensorRT 11 has no FP16/INT8 builder flags, weak typing or
calibrators; the parser rejects DequantizeLinear on int32 biases; a shape outside the profile is
refused with ``False``; copies are checked against the allocations they touch; freeing memory while
work is pending on a stream, or capturing a graph in global mode, are recorded as violations.

The "engine" is the parsed ONNX model plus the build settings; executing it runs ONNX Runtime on
the bytes held in the fake device memory, so outputs are real model outputs.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

# ------------------------------------------------------------------------------------------ CUDA runtime


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Props:
    def __init__(self, name: bytes, major: int, minor: int):
        self.name, self.major, self.minor = name, major, minor


class FakeCudart(types.SimpleNamespace):
    """``cuda.bindings.runtime`` as far as cxr-edge uses it; state lives on the instance."""

    FUNCTIONS = ("cudaGetDeviceProperties", "cudaDriverGetVersion", "cudaRuntimeGetVersion", "cudaMalloc",
                 "cudaMallocHost", "cudaFree", "cudaFreeHost", "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamCreate",
                 "cudaStreamDestroy", "cudaStreamSynchronize", "cudaStreamBeginCapture", "cudaStreamEndCapture",
                 "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy", "cudaGraphDestroy")

    def __init__(self, gpu: str = "NVIDIA Fake GPU", cc=(8, 9), driver: int = 12060):
        super().__init__(cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind,
                         cudaStreamCaptureMode=cudaStreamCaptureMode)
        self.gpu, self.cc, self.driver = gpu, cc, driver
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.streams: dict[int, dict] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.violations: list[str] = []
        self.capture_modes: list = []
        self.calls: list[str] = []
        self._next = 1

    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _record(self, name):
        self.calls.append(name)

    # device
    def cudaGetDeviceProperties(self, dev):
        self._record("cudaGetDeviceProperties")
        if dev != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return cudaError_t.cudaSuccess, _Props(self.gpu.encode() + b"\x00" * 8, *self.cc)

    def cudaDriverGetVersion(self):
        return cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self):
        return cudaError_t.cudaSuccess, 12060

    # memory
    def _alloc(self, table, nbytes):
        if nbytes <= 0:
            return cudaError_t.cudaErrorInvalidValue, 0
        arr = np.zeros(nbytes, np.uint8)
        table[arr.ctypes.data] = arr
        return cudaError_t.cudaSuccess, arr.ctypes.data

    def cudaMalloc(self, nbytes):
        self._record("cudaMalloc")
        return self._alloc(self.device, int(nbytes))

    def cudaMallocHost(self, nbytes):
        return self._alloc(self.pinned, int(nbytes))

    def _pending(self) -> bool:
        return any(s["pending"] for s in self.streams.values())

    def cudaFree(self, ptr):
        self._record("cudaFree")
        if self._pending():
            self.violations.append("cudaFree while work is pending on a stream (no synchronise first)")
        return (cudaError_t.cudaSuccess if self.device.pop(int(ptr), None) is not None
                else cudaError_t.cudaErrorInvalidDevicePointer)

    def cudaFreeHost(self, ptr):
        if self._pending():
            self.violations.append("cudaFreeHost while work is pending on a stream")
        return cudaError_t.cudaSuccess if self.pinned.pop(int(ptr), None) is not None else cudaError_t.cudaErrorInvalidValue

    def _inside(self, table, ptr, n) -> bool:
        return any(base <= ptr and ptr + n <= base + arr.nbytes for base, arr in table.items())

    def _host_ok(self, ptr, n) -> bool:
        return self._inside(self.pinned, ptr, n) or ptr not in self.device  # pageable host memory is allowed

    def _copy(self, dst, src, n, kind) -> cudaError_t:
        dst, src, n = int(dst), int(src), int(n)
        want_dst = self.device if kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice) else None
        want_src = self.device if kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice) else None
        if want_dst is not None and not self._inside(want_dst, dst, n):
            return cudaError_t.cudaErrorInvalidValue
        if want_src is not None and not self._inside(want_src, src, n):
            return cudaError_t.cudaErrorInvalidValue
        if want_dst is None and self._inside(self.device, dst, n):
            return cudaError_t.cudaErrorInvalidValue  # device pointer given as host destination
        ctypes.memmove(dst, src, n)
        return cudaError_t.cudaSuccess

    def cudaMemcpy(self, dst, src, n, kind):
        return (self._copy(dst, src, n, kind),)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        s = self.streams.get(int(stream))
        if s is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        if s["capture"] is not None:
            s["capture"].append(lambda: self._copy(dst, src, n, kind))
            return (cudaError_t.cudaSuccess,)
        s["pending"] = True
        return (self._copy(dst, src, n, kind),)

    # streams and graphs
    def cudaStreamCreate(self):
        h = self._handle()
        self.streams[h] = {"pending": False, "capture": None}
        return cudaError_t.cudaSuccess, h

    def cudaStreamDestroy(self, stream):
        return (cudaError_t.cudaSuccess if self.streams.pop(int(stream), None) is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamSynchronize(self, stream):
        s = self.streams.get(int(stream))
        if s is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        s["pending"] = False
        return (cudaError_t.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture_modes.append(cudaStreamCaptureMode(int(mode)))
        if mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal:
            self.violations.append("global-mode stream capture: any other thread's CUDA call invalidates it")
        self.streams[int(stream)]["capture"] = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        s = self.streams[int(stream)]
        ops, s["capture"] = s["capture"], None
        h = self._handle()
        self.graphs[h] = ops
        return cudaError_t.cudaSuccess, h

    def cudaGraphInstantiate(self, graph, flags):
        h = self._handle()
        self.execs[h] = self.graphs[int(graph)]
        return cudaError_t.cudaSuccess, h

    def cudaGraphLaunch(self, exe, stream):
        self._record("cudaGraphLaunch")
        for op in self.execs[int(exe)]:
            op()
        self.streams[int(stream)]["pending"] = True
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, exe):
        return (cudaError_t.cudaSuccess if self.execs.pop(int(exe), None) is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaGraphDestroy(self, graph):
        return (cudaError_t.cudaSuccess if self.graphs.pop(int(graph), None) is not None else cudaError_t.cudaErrorInvalidValue,)

    def enqueue(self, stream, fn) -> None:
        """What a kernel launch does: run now, or record into the stream's capture."""
        s = self.streams[int(stream)]
        if s["capture"] is not None:
            s["capture"].append(fn)
        else:
            fn()
            s["pending"] = True


# ------------------------------------------------------------------------------------------ TensorRT


def make_fake_tensorrt(major: int, cudart: FakeCudart, fast_fp16: bool = True, fast_int8: bool = True,
                       dla_cores: int = 0, version: str | None = None):
    """A ``tensorrt`` module of the given major (10: weakly typed API; 11: strongly typed only)."""
    version = version or {10: "10.3.0", 11: "11.4.0.106"}.get(major, f"{major}.0.0")
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log: dict = {"flags_set": [], "flags_cleared": [], "network_flags": None, "builds": 0}
    trt.fake_log = log

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        UINT8 = 5

    flags = ["TF32", "GPU_FALLBACK", "REFIT", "DEBUG"] + (["FP16", "INT8", "BF16"] if major < 11 else [])
    BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(flags)})
    ncf = ["STRONGLY_TYPED"] + (["EXPLICIT_BATCH"] if major < 11 else [])
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {n: i for i, n in enumerate(ncf)})
    TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=WARNING):
            self.min_severity = min_severity

    def nptype(t):
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.UINT8: np.uint8}[t]

    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            self._model = None
            self.num_inputs = 0

        def get_input(self, i):
            return self._inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self._errors: list[str] = []

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

        def parse(self, model, path=None):
            import onnx
            from onnx import numpy_helper

            m = onnx.load_model_from_string(bytes(model))
            inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
            for n in m.graph.node:
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int32:
                    self._errors.append(f"{n.name}: only activation types allowed as input to this layer")
            if self._errors:
                return False
            inp = m.graph.input[0]
            dims = [d.dim_value if d.dim_value else -1 for d in inp.type.tensor_type.shape.dim]
            self.network._model = bytes(model)
            self.network._inputs = [ITensor(inp.name, dims, DataType.UINT8)]
            self.network.num_inputs = 1
            return True

    class IOptimizationProfile:
        def __init__(self):
            self._shapes = {}

        def set_shape(self, name, min, opt, max):
            self._shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache:
        def __init__(self, blob: bytes):
            self._blob = blob

        def serialize(self):
            return memoryview(json.dumps({"device": cudart.gpu, "version": version}).encode())

    class IBuilderConfig:
        def __init__(self):
            self._flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
            self._profiles = []
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1
            self._cache = None
            if major < 11:
                self.int8_calibrator = None
                self._calibration_profile = None

        def set_memory_pool_limit(self, pool, size):
            self._workspace = size

        def set_flag(self, flag):
            log["flags_set"].append(BuilderFlag(flag).name)
            self._flags.add(flag)

        def clear_flag(self, flag):
            log["flags_cleared"].append(BuilderFlag(flag).name)
            self._flags.discard(flag)

        def get_flag(self, flag):
            return flag in self._flags

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            return ITimingCache(bytes(serialized_timing_cache))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache._blob:
                made = json.loads(cache._blob)
                if (made.get("device"), made.get("version")) != (cudart.gpu, version) and not ignore_mismatch:
                    return False
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

        if major < 11:
            def set_calibration_profile(self, profile):
                self._calibration_profile = profile
                return True

    class IHostMemory(bytes):
        pass

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            self.num_DLA_cores = dla_cores

        if major < 11:
            platform_has_fast_fp16 = fast_fp16
            platform_has_fast_int8 = fast_int8

        def create_network(self, flags=0):
            log["network_flags"] = flags
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            log["builds"] += 1
            if config._cache is None:
                raise AssertionError("fake: build without a timing cache set")
            if network._model is None or not config._profiles:
                return None
            strong = bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if major < 11 else True
            if strong and any(f in config._flags for f in ("FP16", "INT8") if hasattr(BuilderFlag, f)):
                return None  # real TensorRT 10 refuses precision flags on strongly typed networks
            if major < 11 and config.int8_calibrator is not None:
                if config._calibration_profile is None:
                    return None
                cal = config.int8_calibrator
                names = [network.get_input(0).name]
                while cal.get_batch(names) is not None:
                    pass
                cal.write_calibration_cache(b"fake-calibration")
            name = network.get_input(0).name
            mn, opt, mx = config._profiles[0]._shapes[name]
            meta = {"profile": [mn, opt, mx], "input": name, "flags": sorted(BuilderFlag(f).name for f in config._flags),
                    "device": cudart.gpu, "dla": config.default_device_type == DeviceType.DLA}
            return IHostMemory(b"FAKEPLAN" + json.dumps(meta).encode() + b"\n" + network._model)

    class ICudaEngine:
        def __init__(self, meta, model: bytes):
            import onnxruntime as ort

            self._meta = meta
            # TensorRT computes a QDQ graph with exact int32 accumulation, not with this CPU's INT8 kernels
            # (which saturate on x86 without VNNI): the stand-in keeps every Q/DQ a float op, as the int8-trt
            # export gate does (runtime/ort_session.py, numerics="tensorrt")
            so = ort.SessionOptions()
            so.add_session_config_entry("session.disable_quant_qdq", "1")
            self._session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            self._inputs_ = [i.name for i in self._session.get_inputs()]
            self._outputs = [o.name for o in self._session.get_outputs()]
            self.num_io_tensors = len(self._inputs_) + len(self._outputs)

        def get_tensor_name(self, i):
            return (self._inputs_ + self._outputs)[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self._inputs_ else TensorIOMode.OUTPUT

        def _info(self, name):
            return next(x for x in self._session.get_inputs() + self._session.get_outputs() if x.name == name)

        def get_tensor_shape(self, name):
            return [d if isinstance(d, int) else -1 for d in self._info(name).shape]

        def get_tensor_dtype(self, name):
            return {"tensor(uint8)": DataType.UINT8, "tensor(float)": DataType.FLOAT,
                    "tensor(float16)": DataType.HALF}[self._info(name).type]

        def create_execution_context(self):
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine):
            self.engine = engine
            self._addresses: dict[str, int] = {}
            self._shapes: dict[str, tuple] = {}
            self._runs = 0

        def set_tensor_address(self, name, memory):
            if name not in self.engine._inputs_ + self.engine._outputs or int(memory) not in cudart.device:
                return False
            self._addresses[name] = int(memory)
            return True

        def set_input_shape(self, name, shape):
            mn, _, mx = self.engine._meta["profile"]
            if name not in self.engine._inputs_ or len(shape) != len(mn) or not all(
                    a <= s <= b for a, s, b in zip(mn, shape, mx)):
                return False
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if name in self._shapes:
                return self._shapes[name]
            n = self._shapes[self.engine._inputs_[0]][0]
            return tuple([n] + self.engine.get_tensor_shape(name)[1:])

        def execute_async_v3(self, stream_handle):
            if int(stream_handle) not in cudart.streams or set(self._addresses) != set(self.engine._inputs_ + self.engine._outputs):
                return False
            inp = self.engine._inputs_[0]
            shape = self._shapes[inp]  # the shape at enqueue time is what a captured graph replays

            def kernel():
                self._runs += 1
                x = np.frombuffer(cudart.device[self._addresses[inp]], np.uint8)[: int(np.prod(shape))].reshape(shape)
                outs = self.engine._session.run(self.engine._outputs, {inp: x.copy()})
                for name, arr in zip(self.engine._outputs, outs):
                    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
                    cudart.device[self._addresses[name]][: raw.size] = raw

            cudart.enqueue(stream_handle, kernel)
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            blob = bytes(serialized_engine)
            if not blob.startswith(b"FAKEPLAN"):
                return None
            head, model = blob[8:].split(b"\n", 1)
            return ICudaEngine(json.loads(head), model)

    for name, obj in dict(Logger=Logger, Builder=Builder, Runtime=Runtime, OnnxParser=OnnxParser, DataType=DataType,
                          BuilderFlag=BuilderFlag, NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
                          TensorIOMode=TensorIOMode, MemoryPoolType=MemoryPoolType, DeviceType=DeviceType,
                          nptype=nptype, IBuilderConfig=IBuilderConfig, INetworkDefinition=INetworkDefinition,
                          ICudaEngine=ICudaEngine, IExecutionContext=IExecutionContext, ITensor=ITensor,
                          IOptimizationProfile=IOptimizationProfile, ITimingCache=ITimingCache,
                          IHostMemory=IHostMemory).items():
        setattr(trt, name, obj)
    if major < 11:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


def install(monkeypatch, major: int = 10, **kw):
    """Put a fake ``tensorrt`` and ``cuda.bindings.runtime`` into ``sys.modules``; returns (trt, cudart)."""
    import sys

    cudart = FakeCudart(**{k: kw.pop(k) for k in ("gpu", "cc") if k in kw})
    trt = make_fake_tensorrt(major, cudart, **kw)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart
