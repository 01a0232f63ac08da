"""What a user would pick instead of cxr-edge, built from the same model and the same calibration images.

``cxr-edge bench --peers`` times these in the same interleaved rounds as cxr-edge's own rows, so "ours vs
theirs" is a ratio taken round by round on one machine, not two numbers from two runs:

- ``openvino-nncf``: ``nncf.quantize`` on the OpenVINO model read from the FP32 ONNX, compiled with the
  LATENCY hint (one request) and with the THROUGHPUT hint (the plugin's optimal number of requests,
  the batch split across them), as OpenVINO's own docs show;
- ``litert-int8``: LiteRT full-integer quantisation of the source Keras model (TFLiteConverter with a
  representative dataset; XNNPACK at run time);
- ``onnxruntime-defaults``: ``onnxruntime.quantization.quantize_static`` with every default.

The ONNX-based peers quantise the FP32 graph cut down to its ``probs`` output (a user's own classifier has
no Grad-CAM feature output), and cxr-edge's OpenVINO rows compile for ``probs`` only as well, as screening
does; the LiteRT peer converts the Keras classifier, which has only ``probs``.

Each peer is built once and cached under ``ARTIFACT_DIR/peers/`` keyed by the FP32 artifact's sha256 (the
LiteRT conversion of ResNet152V2 takes minutes). A peer whose toolkit is not installed is a "could not
run" row naming what to install, never an error.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest import sha256_file
from ..precision import Precision

log = logging.getLogger(__name__)

PEERS = ("openvino-nncf", "litert-int8", "onnxruntime-defaults")
INT8 = Precision.INT8.value  # every peer is a full-integer quantisation


@dataclass
class PeerEngine:
    """A peer as bench times it: a batch of packed uint8 images in, class probabilities out."""

    label: str
    backend: str
    precision: str
    provider: str
    artifact: Path
    infer: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None]
    load_s: float
    how: str  # one line: what this peer is, for the report

    @property
    def size_mb(self) -> float:
        """On disk, weights included (an OpenVINO IR keeps them in a .bin beside the .xml)."""
        files = [self.artifact, self.artifact.with_suffix(".bin")] if self.artifact.suffix == ".xml" else [self.artifact]
        return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 2)


def _missing(label: str, backend: str, why: str) -> dict:
    return {"label": label, "backend": backend, "precision": INT8, "peer": True, "status": f"could not run: {why}"}


def build_peers(artifact_dir: Path, fp32: Path, source: Path | None, calib_x: np.ndarray, threads: int,
                which: tuple[str, ...] = PEERS) -> tuple[list[PeerEngine], list[dict]]:
    """Peers that could be built and loaded, and rows for those that could not (with the reason)."""
    cache = artifact_dir / "peers"
    cache.mkdir(exist_ok=True)
    key = f"{sha256_file(fp32)[:16]}-probs-only"
    # what a user exporting the classifier would quantise: probabilities only, no Grad-CAM feature output
    fp32 = _cached(cache, "fp32_probs_only.onnx", key, lambda out: _probs_only(fp32, out))
    engines: list[PeerEngine] = []
    skipped: list[dict] = []
    makers: dict[str, Callable[[], list[PeerEngine]]] = {
        "openvino-nncf": lambda: _openvino_nncf(fp32, cache, key, calib_x, threads),
        "litert-int8": lambda: _litert(source, cache, key, calib_x, threads),
        "onnxruntime-defaults": lambda: _ort_defaults(fp32, cache, key, calib_x, threads),
    }
    for name in which:
        try:
            engines += makers[name]()
        except _CannotRun as exc:
            skipped += [_missing(label, name, str(exc)) for label in exc.labels]
        except Exception as exc:  # a peer that breaks is a row, not a failed benchmark
            log.warning("peer %s could not be built: %s", name, exc)
            skipped.append(_missing(name, name, f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
    return engines, skipped


def _probs_only(fp32: Path, out: Path) -> None:
    """The FP32 graph with only its ``probs`` output and the nodes that feed it."""
    import onnx

    model = onnx.load(str(fp32))
    g = model.graph
    keep = [o for o in g.output if o.name == "probs"]
    del g.output[:]
    g.output.extend(keep)
    needed = {"probs"}
    live = []
    for node in reversed(list(g.node)):
        if needed & set(node.output):
            live.append(node)
            needed |= set(node.input)
    del g.node[:]
    g.node.extend(reversed(live))
    used = {i for n in g.node for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


class _CannotRun(Exception):
    def __init__(self, why: str, labels: tuple[str, ...]):
        super().__init__(why)
        self.labels = labels


def _cached(cache: Path, name: str, key: str, build: Callable[[Path], None]) -> Path:
    """Build ``name`` once per FP32 artifact; a stamp file records which one it was built from."""
    out = cache / name
    stamp = cache / f"{name}.built-from.json"
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("fp32_sha256_16") == key:
        return out
    t0 = time.perf_counter()
    build(out)
    stamp.write_text(json.dumps({"fp32_sha256_16": key, "build_s": round(time.perf_counter() - t0, 1)}) + "\n")
    return out


# ---- OpenVINO + NNCF ---------------------------------------------------------------------------------

def _openvino_nncf(fp32: Path, cache: Path, key: str, calib_x: np.ndarray, threads: int) -> list[PeerEngine]:
    labels = ("openvino-nncf LATENCY", "openvino-nncf THROUGHPUT")
    try:
        import openvino as ov
    except ImportError:
        raise _CannotRun("openvino is not installed (pip install 'cxr-edge[peers]')", labels) from None
    core = ov.Core()

    def build(out: Path) -> None:
        try:
            import nncf
        except ImportError:
            raise _CannotRun("nncf is not installed (pip install 'cxr-edge[peers]')", labels) from None
        dataset = nncf.Dataset([calib_x[i : i + 1] for i in range(len(calib_x))])
        ov.save_model(nncf.quantize(core.read_model(str(fp32)), dataset, subset_size=len(calib_x)), str(out))

    t0 = time.perf_counter()
    xml = _cached(cache, "openvino_nncf.xml", key, build)
    latency = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = latency.create_infer_request()
    out_port = _probs_port(latency)
    load_lat = time.perf_counter() - t0

    def infer_latency(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[out_port].copy()

    t0 = time.perf_counter()
    tput = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    nreq = int(tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    # requests started and waited on from this thread, no Python callback on OpenVINO's threads (see
    # runtime/backends/openvino.py: _Compiled)
    tput_requests = [tput.create_infer_request() for _ in range(nreq)]
    tput_port = _probs_port(tput)
    load_tput = time.perf_counter() - t0

    def infer_throughput(x: np.ndarray) -> np.ndarray:
        chunks = [c for c in np.array_split(x, min(nreq, len(x))) if len(c)]
        running = list(zip(tput_requests, chunks))
        for request, c in running:
            request.start_async({0: c})
        for request, _ in running:
            request.wait()
        return np.concatenate([r.get_tensor(tput_port).data.copy() for r, _ in running])

    size_note = f"nncf.quantize defaults on {len(calib_x)} calibration images"
    return [
        PeerEngine(labels[0], "openvino-nncf", INT8, "OpenVINO CPU, LATENCY hint", xml, infer_latency,
                   lambda: None, load_lat, f"{size_note}; one infer request"),
        PeerEngine(labels[1], "openvino-nncf", INT8, f"OpenVINO CPU, THROUGHPUT hint ({nreq} requests)", xml,
                   infer_throughput, tput_requests.clear, load_tput,
                   f"{size_note}; the batch split over the plugin's optimal {nreq} requests"),
    ]


def _probs_port(compiled):
    for port in compiled.outputs:
        if "probs" in port.get_names():
            return port
    return compiled.outputs[0]


# ---- LiteRT full integer -------------------------------------------------------------------------------

def _litert(source: Path | None, cache: Path, key: str, calib_x: np.ndarray, threads: int) -> list[PeerEngine]:
    labels = ("litert-int8",)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise _CannotRun("ai-edge-litert is not installed (pip install 'cxr-edge[peers]')", labels) from None
    stamp_key = key if source is None else f"{key}-{sha256_file(source)[:8]}"

    def build(out: Path) -> None:
        if source is None or not source.is_file():
            raise _CannotRun("the source .keras model is not here (LiteRT converts from Keras)", labels)
        if importlib.util.find_spec("tensorflow") is None:
            raise _CannotRun("converting to LiteRT needs TensorFlow (pip install 'cxr-edge[train]')", labels)
        calib = cache / "litert_calibration.npy"
        np.save(calib, calib_x)
        # TensorFlow keeps what the converter allocated; a child process gives it back (ResNet152V2: GBs)
        res = subprocess.run([sys.executable, "-m", "cxr_edge.bench.litert_convert", str(source), str(calib), str(out)],
                             capture_output=True, text=True)
        calib.unlink(missing_ok=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"LiteRT conversion failed: {tail[0][:200]}")

    t0 = time.perf_counter()
    tflite = _cached(cache, "litert_int8.tflite", stamp_key, build)
    interpreters: dict[int, Interpreter] = {}

    def interpreter(batch: int) -> Interpreter:
        if batch not in interpreters:  # one per batch size: resizing re-plans the whole graph
            it = Interpreter(model_path=str(tflite), num_threads=threads)
            it.resize_tensor_input(it.get_input_details()[0]["index"], [batch, *calib_x.shape[1:]])
            it.allocate_tensors()
            interpreters[batch] = it
        return interpreters[batch]

    def infer(x: np.ndarray) -> np.ndarray:
        it = interpreter(len(x))
        it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x))
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"]).copy()

    interpreter(1)
    return [PeerEngine(labels[0], "litert", INT8, f"LiteRT XNNPACK, {threads} threads", tflite, infer,
                       interpreters.clear, time.perf_counter() - t0,
                       f"TFLiteConverter full-integer (TFLITE_BUILTINS_INT8) from the Keras model, "
                       f"{len(calib_x)} representative images")]


# ---- ONNX Runtime quantize_static with its defaults ---------------------------------------------------

def _ort_defaults(fp32: Path, cache: Path, key: str, calib_x: np.ndarray, threads: int) -> list[PeerEngine]:
    labels = ("onnxruntime-defaults",)
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, quantize_static
    except ImportError:
        raise _CannotRun("onnxruntime is not installed (pip install 'cxr-edge[cpu]')", labels) from None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_x[i : i + 1] for i in range(len(calib_x)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    def build(out: Path) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static warns through the root logger that defaults skip pre-processing
        try:
            quantize_static(str(fp32), str(out), Reader())
        finally:
            root.setLevel(level)

    t0 = time.perf_counter()
    path = _cached(cache, "onnxruntime_defaults.onnx", key, build)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [PeerEngine(labels[0], "onnxruntime-defaults", INT8, "CPUExecutionProvider", path,
                       lambda x: sess.run(["probs"], {"image": x})[0], lambda: None, time.perf_counter() - t0,
                       "onnxruntime.quantization.quantize_static with every default (QDQ, S8S8, per-tensor, MinMax)")]
