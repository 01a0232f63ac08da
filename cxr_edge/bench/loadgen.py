"""``cxr-edge loadgen``: MLPerf Inference's own LoadGen (the ``mlcommons-loadgen`` package) driving one artifact.

SingleStream, MultiStream, Server and Offline, in performance and accuracy modes, against the engine called directly
(any backend and precision), the HTTP service, or the DICOM node over loopback. LoadGen writes its summary and detail
logs into one folder per run, untouched; we read its summary (and its accuracy log, scored against the labels and
the FP32 artifact's answers) into results.json and a table, so our numbers sit beside MLPerf's published ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingExtraError
from ..manifest import Manifest, read_manifest
from ..precision import Variant
from .loadgen_qsl import SampleLibrary, SampleSource, performance_count, sample_source
from .loadgen_settings import MODES, SCENARIOS, Estimate, RunSettings, make_test_settings, parse_summary
from .loadgen_sut import DirectSystem, Responder

log = logging.getLogger(__name__)

#: where the system under test is: the engine in this process, the HTTP service, the DICOM node
TARGETS = ("direct", "serve", "node")
#: the Server scenario's dynamic batcher when the engine is called directly (a service keeps its own defaults)
DIRECT_MAX_BATCH, DIRECT_MAX_DELAY_MS = 8, 2.0
#: the Server latency bound (p99) of a whole service, decode and transport included, unless --server-latency-ms: ours,
#: not MLPerf's (its ResNet-50 bound of 15 ms covers inference on a preprocessed tensor only); the node's includes its
#: durable store (fsync per instance) and our polling of its job list
SERVICE_LATENCY_MS: dict[str, float] = {"serve": 100.0, "node": 1000.0}
#: the FP32 artifact beside an export's others, the reference accuracy runs are compared with
FP32_FILE = "model.fp32.onnx"


@dataclass(frozen=True)
class LoadgenConfig:
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    mode: str = "performance"  # performance | accuracy | both
    target: str = "direct"  # direct | serve | node
    backend: str | None = None
    device: str = "auto"
    precision: str | None = None  # OpenVINO's inference-precision hint (direct only)
    threads: int | None = None
    self_check: str = "refuse"
    allow_failed_gate: bool = False
    data: str | None = None
    max_samples: int | None = None
    batch_size: int = 32  # Offline: samples per engine call
    max_batch: int | None = None  # Server: the batcher's (direct) or the started service's largest batch
    max_delay_ms: float | None = None  # Server: the longest wait for a batch to fill
    concurrency: int = 32  # serve: HTTP connections at most; node: associations = min(this, 4)
    url: str | None = None  # a running service (serve) or node (its HTTP port) instead of starting one
    dicom: str | None = None  # HOST:PORT of a running node's DICOM port (with url)
    ae_title: str = "CXREDGE"
    service_args: tuple[str, ...] = ()
    run: RunSettings = field(default_factory=RunSettings)


def require_loadgen():
    """The ``mlperf_loadgen`` module, or an error naming the extra that installs it."""
    try:
        import mlperf_loadgen
    except ImportError as exc:
        raise MissingExtraError(f"cxr-edge loadgen needs MLPerf's LoadGen (the mlcommons-loadgen package), which is not "
                                f"installed ({exc}). Install it with: pip install 'cxr-edge[loadgen]'") from exc
    return mlperf_loadgen


def loadgen_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlcommons-loadgen")
    except PackageNotFoundError:
        return None


def check_config(cfg: LoadgenConfig) -> None:
    """Refuse combinations that cannot mean anything, before an engine or a service starts."""
    for s in cfg.scenarios:
        if s not in SCENARIOS:
            raise ConfigError(f"Unknown LoadGen scenario {s!r}; choose from {', '.join(SCENARIOS)}.")
    if cfg.mode not in MODES:
        raise ConfigError(f"Unknown LoadGen mode {cfg.mode!r}; choose from {', '.join(MODES)}.")
    if cfg.target not in TARGETS:
        raise ConfigError(f"Unknown target {cfg.target!r}; choose from {', '.join(TARGETS)}.")
    if cfg.target != "direct" and cfg.precision:
        raise ConfigError("--precision is OpenVINO's inference hint for --target direct; the service and the node run "
                          "the artifact in its own precision. Drop --precision, or use --target direct.")
    if cfg.url and cfg.target == "direct":
        raise ConfigError("--url names a running service: use it with --target serve or node.")
    if cfg.target == "node" and cfg.url and not cfg.dicom:
        raise ConfigError("--target node with --url needs --dicom HOST:PORT, the node's DICOM port.")


def run_loadgen(artifact: str | Path, cfg: LoadgenConfig, out: str | Path) -> dict[str, Any]:
    """Every scenario x mode asked for, each one LoadGen run with its own log folder under ``out/logs``."""
    check_config(cfg)
    lg = require_loadgen()
    artifact, out = Path(artifact), Path(out)
    doc = read_manifest(artifact, verify=False)
    source = sample_source(doc, cfg.data, cfg.max_samples)
    rows: list[dict[str, Any]] = []
    if cfg.target != "direct" and cfg.run.server_latency_ms is None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, server_latency_ms=SERVICE_LATENCY_MS[cfg.target]))
    with _System(lg, artifact, doc, source, cfg) as sut:
        estimates: dict[str, Estimate] = {}
        for scenario in cfg.scenarios:
            for mode in MODES[cfg.mode]:
                rows.append(_one_run(lg, sut, scenario, mode, cfg, source, out, estimates))
        info, kind = sut.info, sut.system.kind
    if any(r["mode"] == "AccuracyOnly" for r in rows):
        _score_accuracy(rows, artifact, source, out, kind)
    from .machine import machine_info

    return {"artifact": _artifact_facts(artifact, doc), "target": cfg.target, "system": info, "data": source.info,
            "machine": machine_info(),
            "loadgen_version": loadgen_version(), "official": cfg.run.official,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items()}, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _artifact_facts(artifact: Path, doc: Manifest) -> dict[str, Any]:
    return {"file": artifact.name, "path": str(artifact), "recipe": doc.recipe,
            "precision": Variant(doc.precision, doc.int8_target).tag, "sha256": doc.sha256}


class _System:
    """The system under test for the whole command: the engine loaded, or the service started, once."""

    def __init__(self, lg, artifact: Path, doc: Manifest, source: SampleSource, cfg: LoadgenConfig):
        self.lg, self.artifact, self.doc, self.source, self.cfg = lg, artifact, doc, source, cfg
        self.service: Any = None  # loadgen_net.Service, imported only for the network targets
        self.engine: Any = None
        self.info: dict[str, Any] = {"target": cfg.target}

    def __enter__(self):
        cfg = self.cfg
        self.respond = Responder(self.lg, len(self.doc.classes))
        self.system: Any = None
        try:
            self.system = self._direct() if cfg.target == "direct" else self._network()
        except BaseException:  # a service started before the failure is stopped, not left running
            self.__exit__()
            raise
        return self

    def _direct(self) -> DirectSystem:
        from ..runtime.backends.registry import open_backend

        cfg = self.cfg
        options = {k: v for k, v in (("device", cfg.device), ("threads", cfg.threads), ("precision", cfg.precision),
                                     ("self_check", cfg.self_check)) if v is not None}
        self.engine = open_backend(self.artifact, backend=cfg.backend, verify=True,
                                   allow_failed_gate=cfg.allow_failed_gate, **options).load()
        i = self.engine.info
        self.info.update({"backend": i.backend, "provider": i.provider, "precision": i.precision, "device": i.device,
                          "threads": cfg.threads, "server_batcher": {"max_batch": cfg.max_batch or DIRECT_MAX_BATCH,
                                                                      "max_delay_ms": cfg.max_delay_ms or DIRECT_MAX_DELAY_MS}})
        return DirectSystem(self.engine, SampleLibrary(self.source, "tensor"), self.respond, cfg.batch_size,
                            cfg.max_batch or DIRECT_MAX_BATCH,
                            cfg.max_delay_ms if cfg.max_delay_ms is not None else DIRECT_MAX_DELAY_MS)

    def _network(self):
        from .loadgen_net import DicomSystem, HttpSystem, start_node, start_serve, wait_ready

        cfg = self.cfg
        url = cfg.url
        if url is None:
            start = start_serve if cfg.target == "serve" else start_node
            self.service = start(str(self.artifact), self._engine_flags() + self._batch_flags(), cfg.service_args)
            url = self.service.url
        else:
            wait_ready(url, timeout=30)
        self.info.update({"url": url, "started_here": self.service is not None,
                          "command": self.service.cmd if self.service else None, "backend": cfg.backend,
                          "threads": cfg.threads})
        if cfg.target == "serve":
            return HttpSystem(url, SampleLibrary(self.source, "encoded"), self.respond, self.doc.classes, cfg.concurrency)
        host, port = self._dicom_address()
        n = min(cfg.concurrency, 4)
        self.info["associations"] = n
        return DicomSystem(url, (host, port), cfg.ae_title, SampleLibrary(self.source, "dicom"), self.respond,
                           self.doc.classes, n)

    def _dicom_address(self) -> tuple[str, int]:
        if self.service is not None:
            return "127.0.0.1", int(self.service.dicom_port or 0)
        host, _, port = (self.cfg.dicom or "").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--dicom must be HOST:PORT, got {self.cfg.dicom!r}.")
        return host, int(port)

    def _engine_flags(self) -> list[str]:
        cfg = self.cfg
        flags = ["--device", cfg.device, "--self-check", cfg.self_check]
        flags += ["--backend", cfg.backend] if cfg.backend else []
        flags += ["--threads", str(cfg.threads)] if cfg.threads else []
        return flags + (["--allow-failed-gate"] if cfg.allow_failed_gate else [])

    def _batch_flags(self) -> list[str]:
        cfg = self.cfg
        flags = ["--max-batch", str(cfg.max_batch)] if cfg.max_batch else []
        return flags + (["--max-delay-ms", f"{cfg.max_delay_ms:g}"] if cfg.max_delay_ms is not None else [])

    def __exit__(self, *exc) -> None:
        try:
            if self.system is not None:
                self.system.close()
        finally:
            if self.engine is not None:
                self.engine.close()
            if self.service is not None:
                self.service.stop()


def _one_run(lg, sut: _System, scenario: str, mode: str, cfg: LoadgenConfig, source: SampleSource, out: Path,
             estimates: dict[str, Estimate]) -> dict[str, Any]:
    """One LoadGen test: settings, QSL, SUT, its logs in their own folder, and the summary read back."""
    name = SCENARIOS[scenario]
    system = sut.system
    key = name if cfg.target == "direct" else "network"
    if key not in estimates:
        estimates[key] = system.estimate(name, estimate_budget(cfg.run))
    est = estimates[key]
    ts, used = make_test_settings(lg, scenario, mode, cfg.run, est)
    logs = out / "logs" / f"{cfg.target}-{scenario}-{'accuracy' if mode == 'AccuracyOnly' else 'performance'}"
    logs.mkdir(parents=True, exist_ok=True)
    library = system.library
    library.unload(list(library.loaded))
    problems: list[Exception] = []
    qsl = lg.ConstructQSL(len(source), performance_count(source, library.kind), _guarded(library.load, problems),
                          _guarded(library.unload, problems))
    lsut = lg.ConstructSUT(system.issue_for(name), lambda: None)
    failures0, load0 = sut.respond.failures, _load_average()
    log.info("LoadGen %s %s on %s: min %g s ...", name, mode, cfg.target, ts.min_duration_ms / 1e3)
    t0 = time.perf_counter()
    try:
        lg.StartTestWithLogSettings(lsut, qsl, ts, _log_settings(lg, logs), str(logs / "audit.config"))
    finally:
        extra = system.end_scenario()
        lg.DestroySUT(lsut)
        lg.DestroyQSL(qsl)
        library.unload(list(library.loaded))
    if problems:  # samples that could not be loaded were answered as failed; the run means nothing
        raise problems[0]
    summary = parse_summary((logs / "mlperf_log_summary.txt").read_text(errors="replace"))
    failed = sut.respond.failures - failures0
    row = {"scenario": name, "mode": mode, "target": cfg.target, "backend": sut.info.get("backend"),
           "provider": sut.info.get("provider"), "precision": _precision(sut), "wall_s": round(time.perf_counter() - t0, 1),
           "estimate": est.to_dict(), "settings": used, "summary": summary, "failed_samples": failed,
           "first_failure": sut.respond.first_failure if failed else None, "logs": str(logs.relative_to(out)),
           "load_average_1m": {"before": load0, "after": _load_average()}, **extra}
    row["verdict"] = verdict(row)
    return row


def _guarded(fn, problems: list[Exception]):
    """A LoadGen callback that never raises into LoadGen (an exception there ends the process): it is kept, and
    raised once the test is over."""
    def call(indices) -> None:
        try:
            fn(indices)
        except Exception as exc:
            problems.append(exc)

    return call


def _load_average() -> float | None:
    """The machine's 1-minute load average: on a shared machine, whether something else ran beside the test."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def estimate_budget(run: RunSettings) -> float:
    """Seconds of timing before a run, from which LoadGen sizes it: a tenth of the run, 0.05 to 1 s."""
    return min(1.0, max(0.05, run.duration_s / 10))


def _precision(sut: _System) -> str:
    tag = Variant(sut.doc.precision, sut.doc.int8_target).tag
    hint = sut.cfg.precision
    return f"{tag} (OpenVINO hint {hint})" if hint else tag


def verdict(row: dict[str, Any]) -> str:
    """LoadGen's VALID/INVALID, unless samples failed (LoadGen counts a failed answer as an answer; we do not)."""
    if row["mode"] == "AccuracyOnly":
        return "accuracy run" if not row.get("failed_samples") else f"accuracy run, {row['failed_samples']} failed"
    result = row["summary"].get("result") or "no result"
    if row.get("failed_samples"):
        return f"INVALID ({row['failed_samples']} samples failed; LoadGen said {result})"
    return result


def _log_settings(lg, folder: Path):
    """LoadGen's logs into ``folder`` under their own names (mlperf_log_summary.txt, _detail.txt, _accuracy.json)."""
    lo = lg.LogOutputSettings()
    lo.outdir = str(folder)
    lo.copy_summary_to_stdout = False
    ls = lg.LogSettings()
    ls.log_output = lo
    ls.enable_trace = False
    return ls


# ------------------------------------------------------------------ accuracy

def read_accuracy_log(path: Path, n_classes: int) -> dict[int, np.ndarray]:
    """LoadGen's ``mlperf_log_accuracy.json``: each QSL index's response (our float32 probabilities), first one kept."""
    entries = json.loads(path.read_text() or "[]")
    out: dict[int, np.ndarray] = {}
    for e in entries:
        idx = int(e["qsl_idx"])
        if idx not in out:
            v = np.frombuffer(bytes.fromhex(e["data"]), np.float32)
            out[idx] = v if v.size == n_classes else np.full(n_classes, np.nan, np.float32)
    return out


def score(responses: dict[int, np.ndarray], source: SampleSource, reference: np.ndarray | None) -> dict[str, Any]:
    """Top-1 accuracy against the labels and top-class agreement with the FP32 answers, over the samples answered."""
    n = len(source)
    idx = np.array(sorted(responses), dtype=np.int64)
    probs = np.stack([responses[i] for i in idx]) if len(idx) else np.zeros((0, len(source.classes)), np.float32)
    ok = ~np.isnan(probs).any(axis=1) if len(idx) else np.zeros(0, bool)
    top = probs.argmax(axis=1) if len(idx) else np.zeros(0, np.int64)
    out: dict[str, Any] = {"samples": n, "answered": int(len(idx)), "failed": int((~ok).sum()),
                           "missing": int(n - len(idx))}
    if source.labelled:
        out["top1_accuracy"] = float(((top == source.labels[idx]) & ok).sum() / n)
    if reference is not None and len(idx):
        ref = reference[idx]
        out["top1_agreement_vs_fp32"] = float(((top == ref.argmax(axis=1)) & ok).sum() / n)
        out["max_abs_dprob_vs_fp32"] = float(np.abs(probs[ok] - ref[ok]).max()) if ok.any() else None
    return out


def fp32_reference(artifact: Path, source: SampleSource, kind: str) -> tuple[np.ndarray | None, str]:
    """The FP32 artifact's answers on every sample as it was sent (ONNX Runtime, CPU), or None and why not."""
    fp32 = artifact.parent / FP32_FILE
    if not fp32.is_file():
        return None, f"no {FP32_FILE} beside the artifact (a bundle holds one model): agreement not computed"
    from ..runtime.backends.registry import open_backend

    x = SampleLibrary(source, kind).reference_tensors(range(len(source)))
    with open_backend(fp32, backend="onnxruntime", device="cpu", self_check="off").load() as eng:
        probs = eng.infer_all(x, 32)
    sent = " (the DICOM instances sent, decoded as a receiver decodes them)" if kind == "dicom" else ""
    return probs, f"{FP32_FILE} on ONNX Runtime CPU{sent}"


def _score_accuracy(rows: list[dict[str, Any]], artifact: Path, source: SampleSource, out: Path, kind: str) -> None:
    reference, how = fp32_reference(artifact, source, kind)
    for r in rows:
        if r["mode"] != "AccuracyOnly":
            continue
        responses = read_accuracy_log(out / r["logs"] / "mlperf_log_accuracy.json", len(source.classes))
        a = score(responses, source, reference)
        r["accuracy"] = {**a, "reference": how, "labels": "class folders" if source.labelled else "none (synthetic images)"}
        if a["failed"] or a["missing"]:
            r["verdict"] = f"accuracy run: {a['failed']} failed, {a['missing']} never answered"


def scenario_rows(res: dict[str, Any], mode: str | None = None) -> Sequence[dict[str, Any]]:
    return [r for r in res.get("rows", []) if mode is None or r["mode"] == mode]
