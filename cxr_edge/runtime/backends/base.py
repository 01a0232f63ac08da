"""The backend protocol: ``load`` / ``infer`` / ``close``, usable as a context manager.

Inputs are checked against the manifest in one place (``Backend.infer``) before any engine sees
them, so every backend rejects a wrong batch with the same message; subclasses implement only
``_load`` / ``_infer`` / ``_close``.
"""

from __future__ import annotations

import abc
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ...errors import ConfigError, EngineError
from ...manifest import Manifest
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


_Opts = TypeVar("_Opts", bound="BackendOptions")


@dataclass(frozen=True)
class BackendOptions:
    """The options every front end may pass to any backend, typed once; a backend that has no use for one ignores it
    (``threads`` on a remote Triton model, ``cuda_graph`` on ONNX Runtime, ``precision``: an inference-precision hint
    only OpenVINO takes), so the same flags work whichever backend runs. Each backend's ``Options`` adds its own."""

    device: str = "auto"  # "auto" | "cpu" | "cuda"
    max_batch: int | None = None  # largest batch of engines compiled at load (ONNX Runtime's TensorRT EP profile)
    threads: int | None = None  # None (or 0): the runtime's default
    spin: bool | None = None  # False: ONNX Runtime's threads do not busy-wait between calls
    trusted: bool = False  # a signed-only deployment: no natively compiled engine caches are loaded
    cuda_graph: bool = False
    self_check: str | None = None  # None: DEFAULT_POLICY
    precision: str | None = None  # an inference-precision hint (OpenVINO), not the artifact's precision

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def build(cls: type[_Opts], backend: str, options: Mapping[str, Any]) -> _Opts:
        """The typed options from keyword arguments: a misspelt name (``thread=2``, once silently ignored) or an integer
        option that is no integer is a ConfigError naming the backend, before anything is loaded."""
        valid = cls.names()
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"{backend} backend has no option {', '.join(map(repr, unknown))}; valid: "
                              f"{', '.join(sorted(valid))}.")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(backend, k, v, hints[k]) for k, v in options.items()})


def _typed(backend: str, name: str, value: Any, hint: Any) -> Any:
    """An integer option as an int (engines were handed ``int(value)`` anyway); others as given, so a tri-state
    such as ``spin`` keeps its None."""
    if value is None or not (hint is int or int in typing.get_args(hint)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{backend} backend option {name} must be an integer, got {value!r}.") from None


#: the names of :class:`BackendOptions`: what every backend accepts
COMMON_OPTIONS = BackendOptions.names()


class Backend(abc.ABC):
    name: str = "base"  # which formats a backend runs is said once, in the registry
    #: the typed options this backend takes: :class:`BackendOptions` and its own fields
    Options: type[BackendOptions] = BackendOptions

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """The option sets worth timing for ``artifact`` on this machine (``cores`` usable, batches up to ``batch``)
        for :func:`cxr_edge.runtime.tuning.tune`: only the defaults unless a backend knows a setting whose best
        value differs by machine."""
        return [{}]

    @staticmethod
    def _thread_counts(cores: int) -> list[int]:
        """All usable cores, and half of them: with decoding beside inference, fewer threads can win."""
        return sorted({cores, max(1, cores // 2)}, reverse=True)

    def __init__(self, artifact: str | Path, manifest: Manifest | Mapping[str, Any], **options):
        self.opts = self.Options.build(self.name, options)
        self.artifact = Path(artifact)
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
        self.self_check_policy = self.opts.self_check or DEFAULT_POLICY
        if self.self_check_policy not in POLICIES:
            raise ConfigError(f"self_check must be one of {', '.join(POLICIES)}, got {self.self_check_policy!r}.")
        self.spec = self.manifest.preprocess
        self.classes = list(self.manifest.classes)
        self.outputs = list(self.manifest.output_names)
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
            self.model_bytes = None  # the engine holds the model now; a large FP32 model is hundreds of MB of RSS
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
            msg = (f"{self.artifact.name} ({self.manifest.precision.value}) answers differently on {where} than "
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
        t = self.manifest.probability_temperature
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
