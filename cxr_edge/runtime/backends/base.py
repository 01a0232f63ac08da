"""The backend protocol: ``load`` / ``infer`` / ``close``, usable as a context manager.

Inputs are checked against the manifest in one place (``Backend.infer``) before any engine sees
them, so every backend rejects a wrong batch with the same message; subclasses implement only
``_load`` / ``_infer`` / ``_close``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ...preprocess import PreprocessSpec


@dataclass
class BackendInfo:
    """Where inference actually runs: reported in every result, never guessed."""

    backend: str  # "onnxruntime", "tensorrt", "keras", "openvino"
    provider: str  # the provider / device actually in use, read back after loading
    precision: str  # what the artifact computes in (fp32 / fp16 / int8 / bf16)
    device: str  # "cpu" | "cuda" | ...
    details: dict = field(default_factory=dict)


class Backend(abc.ABC):
    #: artifact formats this backend can run (registry key)
    formats: tuple[str, ...] = ()
    name: str = "base"

    def __init__(self, artifact: str | Path, manifest: dict, **options):
        self.artifact = Path(artifact)
        self.manifest = manifest
        self.options = options
        self.spec = PreprocessSpec.from_dict(manifest["preprocess"])
        self.classes = list(manifest["classes"])
        self.outputs = [o["name"] for o in manifest.get("outputs", [{"name": "probs"}])]
        self.info: BackendInfo | None = None
        self.trust: dict = {"signed_by": None}  # set by open_backend's load policy
        self._loaded = False

    # ---- public template -------------------------------------------------
    def load(self) -> "Backend":
        if not self._loaded:
            self.info = self._load()
            self._loaded = True
        return self

    def infer(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one packed uint8 batch; returns output name -> array."""
        if not self._loaded:
            self.load()
        self._check(batch)
        wanted = outputs or self.outputs
        unknown = [o for o in wanted if o not in self.outputs]
        if unknown:
            raise ConfigError(f"Output(s) {unknown} are not produced by {self.artifact.name}; it has {self.outputs}.")
        return self._infer(np.ascontiguousarray(batch), wanted)

    def close(self) -> None:
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> "Backend":
        return self.load()

    def __exit__(self, *exc) -> None:  # never swallows exceptions
        self.close()

    def batch_range(self) -> tuple[int, int]:
        """Smallest and largest batch the engine takes (ONNX: any)."""
        return (1, 1 << 30)

    # ---- for subclasses --------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> BackendInfo: ...

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:
        pass

    def _check(self, batch: np.ndarray) -> None:
        expected = (None, *self.spec.input_shape)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != expected[1:]:
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise ConfigError(
                f"Input tensor: image | Received incompatible input: {got}. Expected uint8 with a shape "
                f"compatible with: {expected}. Pack images with cxr_edge.preprocess.pack_image."
            )
        lo, hi = self.batch_range()
        if not lo <= len(batch) <= hi:
            raise ConfigError(
                f"Batch of {len(batch)} is outside this engine's optimisation profile [{lo}, {hi}]; "
                f"split the batch or rebuild the engine with --batch MIN,OPT,MAX covering it."
            )
