"""``Screener``: images in, screening results (label, probabilities, where it looked) out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..decision import borderline_band, decide, describe_operating_point
from ..decode_workers import DecodeIsolation
from ..errors import ConfigError
from .backends.registry import open_backend
from .batching import BatchPacker
from .overlay import WEAK_CAM_PEAK
from .result import Explanation, ScreeningResult

log = logging.getLogger(__name__)


class Screener:
    """Load an artifact on the best available backend and screen images in batches.

    ``device``: 'auto' (best available, reported truthfully), 'cpu', or 'cuda' (raise rather than fall
    back). ``backend`` picks one of the registered backends for the artifact's format. ``isolation``:
    files and bytes are decoded in worker processes with a deadline and memory ceiling per image
    (:class:`~cxr_edge.decode_workers.DecodeIsolation`); None decodes in threads, for trusted data.
    """

    def __init__(self, artifact, *, backend: str | None = None, device: str = "auto", batch_size: int = 8,
                 workers: int | None = None, threshold: float | None = None, verify: bool = True,
                 isolation: DecodeIsolation | None = DecodeIsolation(), **options):
        if batch_size < 1:  # checked before anything is loaded, so a bad value leaks no engine
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        options.setdefault("max_batch", batch_size)  # profile of engines compiled at load (ORT's TensorRT EP)
        self.engine = open_backend(artifact, backend=backend, verify=verify, device=device, **options).load()
        self.manifest = self.engine.manifest
        self.classes = self.engine.classes
        self.threshold = threshold if threshold is not None else self.manifest.threshold
        op = self.manifest.operating_point
        self.operating_point = ("threshold given by the caller" if threshold is not None
                                else describe_operating_point(op))
        self.band = borderline_band(self.manifest)
        self.batch_size = batch_size  # the engine fits any size to its profile (Backend.infer)
        self.workers = workers
        self.isolation = isolation  # None: decode in threads of this process (trusted files only)
        self._cam = None

    # --------------------------------------------------------------- explanations
    def _cam_engine(self):
        if self._cam is None:
            head = None
            if "features" in self.engine.outputs:
                from .head import load_artifact_head

                head = load_artifact_head(self.engine.artifact, self.manifest)
            if head is not None:
                self._cam = ("engine-native", head)
            else:
                self._cam = ("tensorflow", None)
        return self._cam

    def _explain(self, x: np.ndarray, features: np.ndarray | None, targets: np.ndarray) -> tuple[np.ndarray, str]:
        method, head = self._cam_engine()
        if method == "engine-native":
            from .gradcam import gradcam

            return gradcam(head, features, targets).cam, method
        return self._tf_cam(x, targets), method

    def _tf_cam(self, x, targets):
        """Fallback: Grad-CAM on the source Keras model (needs the train extra and the .keras file)."""
        from ..keras_layers import load_keras_model
        from .backends.keras import gradcam_tf

        if not hasattr(self, "_keras"):
            self._keras = load_keras_model(self._source_model_path())
        layer = self.manifest.gradcam.get("layer") or self.manifest.get("last_conv_layer")
        return gradcam_tf(self._keras, x, layer, targets)[0]

    def _source_model_path(self) -> Path:
        """The Keras model an artifact came from: beside it, else where export recorded it (hash-checked)."""
        from ..manifest import read_manifest

        if self.manifest.kind == "keras-model":
            return self.engine.artifact
        src = self.manifest.source_model
        for cand in (self.engine.artifact.parent / src.get("file", ""), Path(src.get("path", ""))):
            if src.get("file") and cand.is_file() and read_manifest(cand)["sha256"] == src.get("sha256"):
                return cand
        raise ConfigError("Engine-native Grad-CAM is not available for this artifact, and its source Keras model "
                          f"({src.get('file')}) was not found beside it or at {src.get('path')} for the TensorFlow fallback.")

    # --------------------------------------------------------------- screening
    def predict(self, items, explain: bool = False, out_dir: str | Path | None = None,
                cam_scale: float | None = None) -> list[ScreeningResult]:
        """One result per item, in order; bad items get ``ok=False`` and an error, never an exception."""
        items = list(items)
        results: list[ScreeningResult | None] = [None] * len(items)
        packer = BatchPacker(self.engine.spec, self.batch_size, self.workers, keep_originals=explain,
                             isolation=self.isolation)
        info = self.engine.info
        outputs = ["probs", "features"] if explain and self._cam_engine()[0] == "engine-native" else ["probs"]
        try:
            for pb in packer.iter_batches(items):
                for i, err in pb.errors.items():
                    results[i] = ScreeningResult.unusable(i, pb.names[i], err.reason)
                if not pb.indices:
                    continue
                t0 = time.perf_counter()
                out = self.engine.infer(pb.x, outputs)
                infer_s = time.perf_counter() - t0
                probs = out["probs"]
                labels = decide(probs, self.classes, self.threshold)
                per = len(pb.indices)
                cams, method, cam_s = None, None, 0.0
                if explain:
                    t1 = time.perf_counter()
                    cams, method = self._explain(pb.x, out.get("features"), labels)
                    cam_s = time.perf_counter() - t1
                for k, i in enumerate(pb.indices):
                    r = ScreeningResult.from_probabilities(
                        i, pb.names[i], probs[k], self.classes, self.threshold, info,
                        {"decode": 1e3 * pb.decode_s / per, "infer": 1e3 * infer_s / per, "batch": per},
                        self.operating_point, self.band)
                    if cams is not None:
                        r.explanation = Explanation(self.classes[labels[k]], method, float(cams[k].max()), cam_s / per,
                                                    cam=cams[k], weak=bool(cams[k].max() < WEAK_CAM_PEAK))
                        r.timings_ms["explain"] = 1e3 * cam_s / per
                        if out_dir is not None:
                            from .overlay import save_explanation

                            stem = f"{i:05d}_{Path(pb.names[i]).stem}"
                            caption = [r.decision.text() if r.decision else str(r.label),
                                       f"Grad-CAM of {r.label} ({method}), {info.precision} on {info.backend}"]
                            r.explanation.files = save_explanation(out_dir, stem, pb.originals[i], cams[k], cam_scale,
                                                                   caption)
                    results[i] = r
        finally:
            packer.close()
        return results

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
