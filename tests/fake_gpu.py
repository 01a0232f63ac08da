"""A fake TensorRT (10.x or 11.x API shape) and a fake CUDA runtime that run on the CPU, built from the records of
the real wheels and keeping the state the real libraries keep.

They exist so that ``build_engine`` and ``TensorRTBackend`` are driven end to end where no GPU is. Their surface
comes from the records read from the real bindings (``tests/fixtures/tensorrt_api/*.json``): every name they
expose exists there, enum values are the real values, properties are properties (read-only ones refuse
assignment) and methods are methods, and a public attribute the real class lacks cannot be set on an instance
(pybind11 classes have no ``__dict__``); ``test_tensorrt_api.py`` checks all of it. Return values follow the real
conventions (``(err, value)`` tuples from CUDA, ``bool`` from ``set_*``), and they are strict where the real ones
are: TensorRT 11 has no FP16/INT8 builder flags, weak typing or calibrators; the parser rejects DequantizeLinear
on int32 biases; a shape outside the profile is refused with ``False``; copies are checked against the
allocations they touch.

State kept as the real libraries keep it:

- **Devices.** Two GPUs by default and a current device per host thread (``cudaSetDevice`` / ``cudaGetDevice``;
  a new thread starts on device 0). Every allocation, stream, graph and graph executable belongs to the device
  current when it was made; using one while another device is current fails with an error code and a recorded
  violation. (CUDA lets copies cross devices through unified addressing; the fake refuses them too, because
  cxr-edge always works with its engine's device current, so any crossing is a bug. ``cudaStreamSynchronize``
  and ``cudaFreeHost`` stay allowed from anywhere, as in CUDA.)
- **Engines and contexts.** An engine belongs to the device current when it was deserialised, and creating or
  running its contexts with another device current fails. A context's input shape is state that
  ``set_input_shape`` changes. A ``USER_MANAGED`` context has no device memory until ``set_device_memory`` gives
  it a block of at least ``device_memory_size_v2`` bytes on its device; two contexts sharing a block while both
  have unfinished work on different streams is a violation (TensorRT: contexts may share memory only when they
  do not run in parallel).
- **CUDA graphs.** A launch captured into a graph records the context state it was captured with (input shape,
  tensor addresses, device memory). Replaying it after that context was reshaped or re-pointed writes NaN into
  the outputs and records a violation: on a GPU a stale graph runs kernels set up for another state (TensorRT's
  guidance: one context per captured shape, or re-capture after any change).
- Freeing memory while work is pending on a stream, or capturing a graph in global mode, are violations.

The "engine" is the parsed ONNX model plus the build settings; executing it runs ONNX Runtime on the bytes held
in the fake device memory, so outputs are real model outputs.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import types
from pathlib import Path

import numpy as np

RECORDS = Path(__file__).parent / "fixtures" / "tensorrt_api"

# ------------------------------------------------------------------------------------------ CUDA runtime
# the members cxr-edge meets; their values are checked against cuda-bindings 12 and 13 by test_tensorrt_api.py


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
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


class cudaDeviceProp:
    """The fields of ``cudaDeviceProp`` cxr-edge reads (properties in cuda-bindings)."""

    def __init__(self, name: bytes, major: int, minor: int):
        self._name, self._major, self._minor = name, major, minor

    name = property(lambda self: self._name)
    major = property(lambda self: self._major)
    minor = property(lambda self: self._minor)


class FakeCudart(types.SimpleNamespace):
    """``cuda.bindings.runtime`` as far as cxr-edge uses it; state lives on the instance.

    ``device`` maps every live device allocation's base address to its bytes (all devices); ``owner`` maps each
    allocation, stream, graph and executable graph to the device it belongs to.
    """

    FUNCTIONS = ("cudaGetDeviceProperties", "cudaGetDeviceCount", "cudaGetDevice", "cudaSetDevice",
                 "cudaDriverGetVersion", "cudaRuntimeGetVersion", "getLocalRuntimeVersion", "cudaMalloc",
                 "cudaMallocHost", "cudaFree", "cudaFreeHost", "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamCreate",
                 "cudaStreamDestroy", "cudaStreamSynchronize", "cudaStreamBeginCapture", "cudaStreamEndCapture",
                 "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy", "cudaGraphDestroy")

    def __init__(self, gpu: str = "NVIDIA Fake GPU", cc=(8, 9), driver: int = 12060, devices: int = 2,
                 runtime: int = 12060, bindings: int = 12090, models: dict | None = None):
        """``devices`` GPUs of the model ``gpu``/``cc``, except those ``models`` names: {index: (name, cc)}."""
        super().__init__(cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind,
                         cudaStreamCaptureMode=cudaStreamCaptureMode, cudaDeviceProp=cudaDeviceProp)
        self.gpu, self.cc, self.driver, self.n_devices = gpu, cc, driver, devices
        self.models = {i: (gpu, cc) for i in range(devices)} | (models or {})
        self.runtime, self.bindings = runtime, bindings  # the libcudart.so loaded / what the bindings were built for
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.streams: dict[int, dict] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.owner: dict[int, int] = {}
        self.violations: list[str] = []
        self.capture_modes: list = []
        self.calls: list[str] = []
        self._tls = threading.local()
        self._next = 1

    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _record(self, name):
        self.calls.append(name)

    # devices: one current device per host thread
    def current(self) -> int:
        return getattr(self._tls, "device", 0)

    def _mine(self, handle: int, what: str) -> bool:
        """True when ``handle`` belongs to the calling thread's current device; else a recorded violation."""
        dev = self.owner.get(int(handle))
        if dev is None or dev == self.current():
            return True
        self.violations.append(f"{what} of device {dev} used in thread {threading.current_thread().name!r} while "
                               f"device {self.current()} is current (no cudaSetDevice({dev}) in this thread)")
        return False

    def cudaGetDeviceCount(self):
        return cudaError_t.cudaSuccess, self.n_devices

    def cudaGetDevice(self):
        self._record("cudaGetDevice")
        return cudaError_t.cudaSuccess, self.current()

    def cudaSetDevice(self, device):
        self._record("cudaSetDevice")
        if not 0 <= int(device) < self.n_devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._tls.device = int(device)
        return (cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, device):
        self._record("cudaGetDeviceProperties")
        if not 0 <= int(device) < self.n_devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        name, cc = self.models[int(device)]
        return cudaError_t.cudaSuccess, cudaDeviceProp(name.encode() + b"\x00" * 8, *cc)

    def cudaDriverGetVersion(self):
        return cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self):
        """cuda-python returns the version its runtime bindings were compiled for, not the library loaded."""
        return cudaError_t.cudaSuccess, self.bindings

    def getLocalRuntimeVersion(self):
        return cudaError_t.cudaSuccess, self.runtime

    # memory
    def _alloc(self, table, nbytes, device: bool):
        if nbytes <= 0:
            return cudaError_t.cudaErrorInvalidValue, 0
        arr = np.zeros(nbytes, np.uint8)
        table[arr.ctypes.data] = arr
        if device:
            self.owner[arr.ctypes.data] = self.current()
        return cudaError_t.cudaSuccess, arr.ctypes.data

    def cudaMalloc(self, size):
        self._record("cudaMalloc")
        return self._alloc(self.device, int(size), True)

    def cudaMallocHost(self, size):
        return self._alloc(self.pinned, int(size), False)

    def _pending(self) -> bool:
        return any(s["pending"] for s in self.streams.values())

    def cudaFree(self, devPtr):
        self._record("cudaFree")
        ptr = int(devPtr)
        if self._pending():
            self.violations.append("cudaFree while work is pending on a stream (no synchronise first)")
        if ptr not in self.device:
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        if not self._mine(ptr, "cudaFree of memory"):
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        del self.device[ptr]
        self.owner.pop(ptr, None)
        return (cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, ptr):
        if self._pending():
            self.violations.append("cudaFreeHost while work is pending on a stream")
        return (cudaError_t.cudaSuccess if self.pinned.pop(int(ptr), None) is not None
                else cudaError_t.cudaErrorInvalidValue,)

    def allocation(self, ptr: int, n: int = 1) -> int | None:
        """The base address of the device allocation holding ``[ptr, ptr + n)``, or None."""
        return next((base for base, arr in self.device.items() if base <= ptr and ptr + n <= base + arr.nbytes), None)

    def _inside(self, table, ptr, n) -> bool:
        return any(base <= ptr and ptr + n <= base + arr.nbytes for base, arr in table.items())

    def _copy(self, dst, src, n, kind) -> cudaError_t:
        dst, src, n = int(dst), int(src), int(n)
        to_dev = kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        from_dev = kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        for ptr, is_dev in ((dst, to_dev), (src, from_dev)):
            base = self.allocation(ptr, n)
            if is_dev and (base is None or not self._mine(base, "device memory")):
                return cudaError_t.cudaErrorInvalidValue
            if not is_dev and self.allocation(ptr) is not None:
                return cudaError_t.cudaErrorInvalidValue  # a device pointer given as host memory
        ctypes.memmove(dst, src, n)
        return cudaError_t.cudaSuccess

    def cudaMemcpy(self, dst, src, count, kind):
        return (self._copy(dst, src, count, kind),)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        s = self.streams.get(int(stream))
        if s is None or not self._mine(int(stream), "stream"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if s["capture"] is not None:
            s["capture"].append(lambda: self._copy(dst, src, count, kind))
            return (cudaError_t.cudaSuccess,)
        s["pending"] = True
        return (self._copy(dst, src, count, kind),)

    # streams and graphs
    def cudaStreamCreate(self):
        h = self._handle()
        self.streams[h] = {"pending": False, "capture": None}
        self.owner[h] = self.current()
        return cudaError_t.cudaSuccess, h

    def cudaStreamDestroy(self, stream):
        if int(stream) not in self.streams or not self._mine(int(stream), "stream"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self.streams[int(stream)]
        self.owner.pop(int(stream), None)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):  # CUDA allows synchronising another device's stream
        s = self.streams.get(int(stream))
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        s["pending"] = False
        return (cudaError_t.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        if int(stream) not in self.streams or not self._mine(int(stream), "stream"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
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
        self.owner[h] = self.owner[int(stream)]
        return cudaError_t.cudaSuccess, h

    def cudaGraphInstantiate(self, graph, flags):
        if int(graph) not in self.graphs or not self._mine(int(graph), "graph"):
            return cudaError_t.cudaErrorInvalidResourceHandle, None
        h = self._handle()
        self.execs[h] = self.graphs[int(graph)]
        self.owner[h] = self.current()
        return cudaError_t.cudaSuccess, h

    def cudaGraphLaunch(self, graphExec, stream):
        self._record("cudaGraphLaunch")
        exe, stream = int(graphExec), int(stream)
        if exe not in self.execs or stream not in self.streams or not (
                self._mine(exe, "executable graph") and self._mine(stream, "stream")):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for op in self.execs[exe]:
            op()
        self.streams[stream]["pending"] = True
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graphExec):
        exe = int(graphExec)
        if exe not in self.execs or not self._mine(exe, "executable graph"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self.execs[exe]
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        if int(graph) not in self.graphs or not self._mine(int(graph), "graph"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self.graphs[int(graph)]
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, stream, fn) -> bool:
        """What a kernel launch does: run now, or record into the stream's capture. False (nothing launched) on a
        stream of another device than the current one, where CUDA refuses kernel launches."""
        if not self._mine(int(stream), "stream (kernel launch)"):
            return False
        s = self.streams[int(stream)]
        if s["capture"] is not None:
            s["capture"].append(fn)
        else:
            fn()
            s["pending"] = True
        return True


# ------------------------------------------------------------------------------------------ TensorRT


def trt_record(version: str) -> dict:
    """The recorded real API the fake of ``version`` is built from (10.3 for the JetPack line and older)."""
    key = "11.4" if int(version.split(".")[0]) >= 11 else "10.16" if version.startswith("10.16") else "10.3"
    return json.loads((RECORDS / f"tensorrt-{key}.json").read_text())


class _Pybind:
    """What an instance of a pybind11 class (no ``py::dynamic_attr``) allows: no public attribute but the class's
    own properties. Python subclasses (a calibrator the code defines) get a ``__dict__``, as with pybind11."""

    def __setattr__(self, name, value):
        cls = type(self)
        if not name.startswith("_") and cls.__module__ == __name__ and not isinstance(getattr(cls, name, None), property):
            raise AttributeError(f"'tensorrt.{cls.__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


def _field(kinds: dict, name: str, default=None):
    """A property stored in ``_<name>``, writable only where the real one is (its recorded kind)."""
    slot = f"_{name}"

    def get(self):
        return getattr(self, slot, default)

    def put(self, value):
        object.__setattr__(self, slot, value)

    kind = kinds.get(name)
    if kind == "property":
        return property(get, put)
    if kind == "readonly_property":
        return property(get)
    raise AssertionError(f"fake: {name} is {kind} in the record, not a property")


def make_fake_tensorrt(major: int, cudart: FakeCudart, fast_fp16: bool = True, fast_int8: bool = True,
                       dla_cores: int = 0, version: str | None = None):
    """A ``tensorrt`` module of the given major (10: weakly typed API; 11: strongly typed only)."""
    version = version or {10: "10.3.0", 11: "11.4.0.106"}.get(major, f"{major}.0.0")
    rec = trt_record(version)
    kinds = {name: cls["kinds"] for name, cls in rec["classes"].items()}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log: dict = {"flags_set": [], "flags_cleared": [], "network_flags": None, "builds": 0}
    trt.fake_log = log

    def real_enum(name):  # every member with its real value: TensorRT 11's BuilderFlag has no FP16/INT8
        return enum.IntEnum(name, rec["classes"][name]["values"])

    DataType, BuilderFlag = real_enum("DataType"), real_enum("BuilderFlag")
    NetworkDefinitionCreationFlag, TensorIOMode = real_enum("NetworkDefinitionCreationFlag"), real_enum("TensorIOMode")
    MemoryPoolType, DeviceType = real_enum("MemoryPoolType"), real_enum("DeviceType")
    ExecutionContextAllocationStrategy = real_enum("ExecutionContextAllocationStrategy")
    USER_MANAGED = ExecutionContextAllocationStrategy.USER_MANAGED

    class Logger(_Pybind):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
        min_severity = _field(kinds["Logger"], "min_severity")

        def __init__(self, min_severity=WARNING):
            self.min_severity = min_severity

    def nptype(t):
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.UINT8: np.uint8}[t]

    class ITensor(_Pybind):
        name = _field(kinds["ITensor"], "name")
        shape = _field(kinds["ITensor"], "shape")
        dtype = _field(kinds["ITensor"], "dtype")

        def __init__(self, name, shape, dtype):
            self._name, self._shape, self._dtype = name, shape, dtype

    class INetworkDefinition(_Pybind):
        num_inputs = _field(kinds["INetworkDefinition"], "num_inputs", 0)

        def __init__(self, flags):
            self._flags = flags
            self._model = None

        def get_input(self, index):
            return self._inputs[index]

    class OnnxParser(_Pybind):
        def __init__(self, network, logger):
            self._network = network
            self._errors: list[str] = []

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

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
            self._network._model = bytes(model)
            self._network._inputs = [ITensor(inp.name, dims, DataType.UINT8)]
            self._network._num_inputs = 1
            return True

    class IOptimizationProfile(_Pybind):
        def __init__(self):
            self._shapes = {}

        def set_shape(self, input, min, opt, max):  # the real parameter names
            self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache(_Pybind):
        def __init__(self, blob: bytes):
            self._blob = blob

        def serialize(self):
            return memoryview(json.dumps({"device": cudart.gpu, "version": version}).encode())

    class IBuilderConfig(_Pybind):
        default_device_type = _field(kinds["IBuilderConfig"], "default_device_type", DeviceType.GPU)
        DLA_core = _field(kinds["IBuilderConfig"], "DLA_core", -1)
        if major < 11:
            int8_calibrator = _field(kinds["IBuilderConfig"], "int8_calibrator")

        def __init__(self):
            self._flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
            self._profiles = []
            self._cache = None
            self._calibration_profile = None

        def set_memory_pool_limit(self, pool, pool_size):
            self._workspace = pool_size

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

    class Builder(_Pybind):
        num_DLA_cores = _field(kinds["Builder"], "num_DLA_cores", dla_cores)
        if major < 11:
            platform_has_fast_fp16 = _field(kinds["Builder"], "platform_has_fast_fp16", fast_fp16)
            platform_has_fast_int8 = _field(kinds["Builder"], "platform_has_fast_int8", fast_int8)

        def __init__(self, logger):
            self._logger = logger

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
            strong = bool(network._flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if major < 11 else True
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

    class ICudaEngine(_Pybind):
        _MEMORY = 4096  # the activation memory a context needs (any size will do: the stand-in keeps none)

        def __init__(self, meta, model: bytes):
            import onnxruntime as ort

            self._meta = meta
            self._device = cudart.current()  # an engine lives on the device current when it is deserialised
            # TensorRT computes a QDQ graph with exact int32 accumulation, not with this CPU's INT8 kernels
            # (which saturate on x86 without VNNI): the stand-in keeps every Q/DQ a float op, as the int8-trt
            # export gate does (runtime/backends/ort_session.py, numerics="tensorrt")
            so = ort.SessionOptions()
            so.add_session_config_entry("session.disable_quant_qdq", "1")
            self._session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            self._inputs_ = [i.name for i in self._session.get_inputs()]
            self._outputs = [o.name for o in self._session.get_outputs()]
            self._contexts: list = []

        @property
        def num_io_tensors(self):
            return len(self._inputs_) + len(self._outputs)

        @property
        def device_memory_size_v2(self):
            return self._MEMORY

        def get_tensor_name(self, index):
            return (self._inputs_ + self._outputs)[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self._inputs_ else TensorIOMode.OUTPUT

        def _info(self, name):
            return next(x for x in self._session.get_inputs() + self._session.get_outputs() if x.name == name)

        def get_tensor_shape(self, name):
            return [d if isinstance(d, int) else -1 for d in self._info(name).shape]

        def get_tensor_dtype(self, name):
            return {"tensor(uint8)": DataType.UINT8, "tensor(float)": DataType.FLOAT,
                    "tensor(float16)": DataType.HALF}[self._info(name).type]

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            if cudart.current() != self._device:
                cudart.violations.append(f"create_execution_context with device {cudart.current()} current; the "
                                         f"engine lives on device {self._device}")
                return None
            ctx = IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))
            self._contexts.append(ctx)
            return ctx

    class IExecutionContext(_Pybind):
        def __init__(self, engine, strategy):
            self._engine = engine
            self._strategy = strategy
            self._memory: tuple[int, int] | None = None if strategy == USER_MANAGED else (0, 0)  # 0: TensorRT's own
            self._addresses: dict[str, int] = {}
            self._shapes: dict[str, tuple] = {}
            self._epoch = 0  # bumped by every change of the state a captured graph depends on
            self._runs = 0

        @property
        def engine(self):
            return self._engine

        def _changed(self):
            self._epoch += 1

        def set_device_memory(self, memory, size):
            memory, size = int(memory), int(size)
            base = cudart.allocation(memory, max(size, 1)) if memory else None
            if self._strategy != USER_MANAGED:
                cudart.violations.append("set_device_memory on a context TensorRT allocates for (not USER_MANAGED)")
            elif size < self._engine.device_memory_size_v2 or (size and base is None):
                cudart.violations.append(f"set_device_memory({memory:#x}, {size}): needs a device block of at least "
                                         f"{self._engine.device_memory_size_v2} bytes")
            elif base is not None and cudart.owner[base] != self._engine._device:
                cudart.violations.append(f"set_device_memory with memory of device {cudart.owner[base]} for an "
                                         f"engine on device {self._engine._device}")
            if self._memory != (memory, size):
                self._memory = (memory, size)
                self._changed()

        def set_tensor_address(self, name, memory):
            base = cudart.allocation(int(memory))
            if name not in self._engine._inputs_ + self._engine._outputs or base is None \
                    or cudart.owner[base] != self._engine._device:
                return False
            if self._addresses.get(name) != int(memory):
                self._addresses[name] = int(memory)
                self._changed()
            return True

        def set_input_shape(self, name, shape):
            mn, _, mx = self._engine._meta["profile"]
            if name not in self._engine._inputs_ or len(shape) != len(mn) or not all(
                    a <= s <= b for a, s, b in zip(mn, shape, mx)):
                return False
            if self._shapes.get(name) != tuple(shape):
                self._shapes[name] = tuple(shape)
                self._changed()
            return True

        def get_tensor_shape(self, name):
            if name in self._shapes:
                return self._shapes[name]
            n = self._shapes[self._engine._inputs_[0]][0]
            return tuple([n] + self._engine.get_tensor_shape(name)[1:])

        def execute_async_v3(self, stream_handle):
            eng = self._engine
            if cudart.current() != eng._device:
                cudart.violations.append(f"execute_async_v3 with device {cudart.current()} current; the engine "
                                         f"lives on device {eng._device}")
                return False
            if int(stream_handle) not in cudart.streams or set(self._addresses) != set(eng._inputs_ + eng._outputs):
                return False
            if self._memory is None:
                cudart.violations.append("execute_async_v3 on a USER_MANAGED context without set_device_memory")
                return False
            inp = eng._inputs_[0]
            if inp not in self._shapes:
                return False
            stream = int(stream_handle)
            for other in eng._contexts:  # a shared block is fine only while the contexts never run in parallel
                busy = getattr(other, "_busy_on", None)
                if other is not self and self._memory[0] and other._memory == self._memory and busy not in (
                        None, stream) and cudart.streams.get(busy, {}).get("pending"):
                    cudart.violations.append("two contexts sharing device memory ran in parallel on two streams")
            self._busy_on = stream
            # what a captured graph replays: the state of this moment
            epoch, shape, addresses = self._epoch, self._shapes[inp], dict(self._addresses)

            def kernel():
                if self._epoch != epoch:  # a graph replayed after its context changed
                    cudart.violations.append(f"a CUDA graph captured at input shape {shape} was replayed after its "
                                             f"context was reshaped/re-pointed (now {self._shapes[inp]})")
                    for name in eng._outputs:
                        cudart.device[cudart.allocation(addresses[name])][:] = 0xFF  # NaN
                    return
                self._runs += 1
                x = np.frombuffer(cudart.device[addresses[inp]], np.uint8)[: int(np.prod(shape))].reshape(shape)
                outs = eng._session.run(eng._outputs, {inp: x.copy()})
                for name, arr in zip(eng._outputs, outs):
                    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
                    cudart.device[addresses[name]][: raw.size] = raw

            return cudart.enqueue(stream_handle, kernel)

    class Runtime(_Pybind):
        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            blob = bytes(serialized_engine)
            if not blob.startswith(b"FAKEPLAN"):
                return None
            head, model = blob[8:].split(b"\n", 1)
            return ICudaEngine(json.loads(head), model)

    for name, obj in dict(Logger=Logger, Builder=Builder, Runtime=Runtime, OnnxParser=OnnxParser, DataType=DataType,
                          BuilderFlag=BuilderFlag, NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
                          TensorIOMode=TensorIOMode, MemoryPoolType=MemoryPoolType, DeviceType=DeviceType,
                          ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
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

    cudart = FakeCudart(**{k: kw.pop(k) for k in ("gpu", "cc", "devices", "runtime", "bindings", "driver", "models") if k in kw})
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
