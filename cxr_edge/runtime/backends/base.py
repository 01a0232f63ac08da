"""The backend protocol: ``load`` / ``infer`` / ``close``, usable as a context manager.

Inputs are checked against the manifest in one place (``Backend.infer``) before any engine sees
them, so every backend rejects a wrong batch with the same message; subclasses implement only
``_load`` / ``_infer`` / ``_close``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError, EngineError
from ...manifest import Manifest
from ...preprocess import PreprocessSpec
from ...self_check import DEFAULT_POLICY, POLICIES, SelfCheckOutcome

log = logging.getLogger(__name__)


@dataclass
class BackendInfo:
    """Where inference actually runs: reported in every result, never guessed."""

    backend: str  # "onnxruntime", "tensorrt", "keras", "openvino"
    provider: str  # the provider / device actually in use, read back after loading
    precision: str  # what the artifact computes in (fp32 / fp16 / int8 / bf16)
    device: str  # "cpu" | "cuda" | ...
    details: dict = field(default_factory=dict)
    self_check: SelfCheckOutcome | None = None  # the load-time check against the FP32 reference answers


class SelfCheckError(EngineError):
    """The artifact answers its reference images differently here than its FP32 model beyond its tolerance:
    this backend or machine computes something other than what was gated."""


#: options every front end may pass to any backend; a backend that has no use for one ignores it (``threads`` on a
#: remote Triton model, ``cuda_graph`` on ONNX Runtime, ``precision``: an inference-precision hint only OpenVINO
#: takes), so the same flags work whichever backend runs
COMMON_OPTIONS = frozenset({"device", "max_batch", "threads", "spin", "trusted", "cuda_graph", "self_check",
                            "precision"})


class Backend(abc.ABC):
    name: str = "base"  # which formats a backend runs is said once, in the registry
    #: the options this backend reads beyond :data:`COMMON_OPTIONS`
    OPTIONS: frozenset[str] = frozenset()

    def __init__(self, artifact: str | Path, manifest: Mapping, **options):
        unknown = sorted(set(options) - COMMON_OPTIONS - self.OPTIONS)
        if unknown:  # a misspelt option (``thread=2``) was silently ignored
            raise ConfigError(f"{self.name} backend has no option {', '.join(map(repr, unknown))}; valid: "
                              f"{', '.join(sorted(COMMON_OPTIONS | self.OPTIONS))}.")
        self.artifact = Path(artifact)
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.self_check_policy = options.pop("self_check", None) or DEFAULT_POLICY
        if self.self_check_policy not in POLICIES:
            raise ConfigError(f"self_check must be one of {', '.join(POLICIES)}, got {self.self_check_policy!r}.")
        self.options = options
        self.spec = PreprocessSpec.from_dict(self.manifest.preprocess)
        self.classes = self.manifest.classes
        self.outputs = self.manifest.output_names
        self.info: BackendInfo | None = None
        self.trust: dict = {"signed_by": None}  # set by open_backend's load policy
        # the artifact's bytes as hashed by open_backend's load policy: engines load these, not the path again
        self.model_bytes: bytes | None = None
        self._loaded = False

    # ---- public template -------------------------------------------------
    def load(self) -> Backend:
        """Open the engine, then answer the manifest's reference images (:mod:`cxr_edge.self_check`); a drift
        beyond the artifact's tolerance closes the engine and raises :class:`SelfCheckError` under the
        ``refuse`` policy, and is recorded in ``info.self_check`` (so in every result) under ``warn``."""
        if not self._loaded:
            self.info = self._load()
            self._loaded = True
            self.model_bytes = None  # the engine holds the model now; a ResNet152V2 FP32 file is 230 MB of RSS
            try:
                self.info.self_check = self._self_check()
            except BaseException:
                self.close()
                raise
        return self

    def where(self) -> str:
        """``<backend>/<ISA>`` on a CPU, ``<backend>/<GPU>`` on a device: what the self-check ran on."""
        from ...cpu_isa import isa_name

        info = self.info
        if info is None:
            return self.name
        if info.device == "cpu":
            return f"{info.backend}/{isa_name()}"
        return f"{info.backend}/{info.details.get('gpu_name') or info.device}"

    def _self_check(self) -> SelfCheckOutcome:
        from ... import self_check

        where = self.where()
        if self.self_check_policy == "off":
            return SelfCheckOutcome("off", where, reason="disabled by the caller")
        x, why = self_check.check_inputs(self.manifest, self.spec.input_shape)
        if x is None:
            log.warning("%s: no load-time self-check: %s", self.artifact.name, why)
            return SelfCheckOutcome("not available", where, reason=why)
        probs = self.infer(x, ["probs"], calibrated=False)["probs"]
        outcome = self_check.compare(self.manifest, probs, where)
        if outcome.failed:
            msg = (f"{self.artifact.name} ({self.manifest.get('precision')}) answers differently on {where} than "
                   f"its FP32 model: {outcome.text()}. This backend or CPU computes something other than what the "
                   "export gate measured (e.g. INT8 kernels without VNNI saturate). Use another backend or the "
                   "fp32/fp16 artifact, re-export on a machine like this one, or pass --self-check warn to run it "
                   "anyway with every result marked.")
            if self.self_check_policy == "refuse":
                raise SelfCheckError(msg)
            log.warning("%s", msg)
        else:
            log.info("%s: %s", self.artifact.name, outcome.text())
        return outcome

    def infer(self, batch: np.ndarray, outputs: list[str] | None = None, calibrated: bool = True) -> dict[str, np.ndarray]:
        """Run one packed uint8 batch of any size; returns output name -> array.

        Engines with a fixed optimisation profile (TensorRT, DLA's static shapes) take only batches
        inside ``batch_range()``. Every caller (Screener, service batcher, bench) goes through here, so
        the fit is made once: a batch below the minimum is padded with copies of its last image and
        the padding sliced off the outputs; one above the maximum runs in chunks.
        """
        if not self._loaded:
            self.load()
        self._check(batch)
        wanted = outputs or self.outputs
        unknown = [o for o in wanted if o not in self.outputs]
        if unknown:
            raise ConfigError(f"Output(s) {unknown} are not produced by {self.artifact.name}; it has {self.outputs}.")
        batch = np.ascontiguousarray(batch)
        out = self._fitted(batch, wanted)
        return self._temperature(out) if calibrated else out

    def _temperature(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Probabilities re-calibrated by a site's temperature when the manifest has one (cxr-edge calibrate)."""
        t = self.manifest.get("probability_temperature")
        if t and "probs" in out:
            from ...decision import calibrated

            out = {**out, "probs": calibrated(out["probs"], float(t)).astype(np.float32)}
        return out

    def _fitted(self, batch: np.ndarray, wanted: list[str]) -> dict[str, np.ndarray]:
        lo, hi = self.batch_range()
        n = len(batch)
        if lo <= n <= hi:
            return self._infer(batch, wanted)
        if n == 0:
            raise ConfigError("Cannot run an empty batch.")
        parts = []
        for i in range(0, n, hi):
            chunk = batch[i : i + hi]
            k = len(chunk)
            if k < lo:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - k, axis=0)])
            res = self._infer(np.ascontiguousarray(chunk), wanted)
            parts.append({name: arr[:k] for name, arr in res.items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in wanted}

    def infer_all(self, x: np.ndarray, batch_size: int = 32, output: str = "probs", calibrated: bool = True) -> np.ndarray:
        """One output for a whole packed set, run ``batch_size`` images at a time (bounded engine memory)."""
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate([self.infer(x[i : i + batch_size], [output], calibrated)[output]
                               for i in range(0, len(x), batch_size)])

    def infer_device(self, batch, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run a batch already on the GPU (a CuPy array from GPU preprocessing). Engines that can read device
        memory override this (TensorRT copies device to device into its fixed input buffer); the default
        copies the batch to the host and runs :meth:`infer`."""
        return self.infer(batch.get() if hasattr(batch, "get") else np.asarray(batch), outputs)

    def fit_note(self, n: int) -> str | None:
        """How a batch of ``n`` is fitted to the profile (for reports), or None when it fits as it is."""
        lo, hi = self.batch_range()
        if n < lo:
            return f"padded to the engine's minimum batch {lo}"
        if n > hi:
            return f"run in chunks of the engine's maximum batch {hi}"
        return None

    def close(self) -> None:
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc) -> None:  # never swallows exceptions
        self.close()

    def batch_range(self) -> tuple[int, int]:
        """Smallest and largest batch one engine call takes (``infer`` fits any other size to it)."""
        return (1, 1 << 30)

    # ---- for subclasses --------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> BackendInfo: ...

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:  # noqa: B027 (optional hook: most backends have nothing to release)
        pass

    def _check(self, batch: np.ndarray) -> None:
        expected = (None, *self.spec.input_shape)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != expected[1:]:
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise ConfigError(
                f"Input tensor: image | Received incompatible input: {got}. Expected uint8 with a shape "
                f"compatible with: {expected}. Pack images with cxr_edge.preprocess.pack_image."
            )
