"""The one screening step: engine outputs of packed images -> :class:`ScreeningResult` s.

Every front end (``Screener`` for files and arrays, the HTTP service, and any later one such as a DICOM node)
packs images and runs the engine its own way (batches from a packer, a dynamic batcher), then calls
:meth:`ScreeningStep.results`, so a result carries the same decision rule, operating point, engine facts and
Grad-CAM wherever it was made. What stays in the front end is only its transport: files written by ``predict
--out``, the inline images of an HTTP answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..decision import borderline_band, describe_operating_point
from .overlay import WEAK_CAM_PEAK
from .result import Explanation, ScreeningResult

if TYPE_CHECKING:
    from .head import HeadOp


class ScreeningStep:
    """Decision, operating point and explanation for one loaded engine. ``threshold`` overrides the manifest's
    operating point (the results then say so); ``tf_cam(x, targets)`` is the TensorFlow Grad-CAM fallback for
    artifacts without an engine-native head (None: such artifacts cannot explain)."""

    def __init__(self, engine, threshold: float | None = None, tf_cam: Callable | None = None):
        manifest = engine.manifest
        self.engine, self.classes = engine, engine.classes
        self.threshold = threshold if threshold is not None else manifest.threshold
        self.operating_point = ("threshold given by the caller" if threshold is not None
                                else describe_operating_point(manifest.operating_point))
        self.band = borderline_band(manifest)
        self.tf_cam = tf_cam
        self._cam: tuple[str, list[HeadOp] | None] | None = None

    # ---- Grad-CAM
    def cam_engine(self) -> tuple[str, list[HeadOp] | None]:
        """("engine-native", head) when the artifact carries a Grad-CAM head, else ("tensorflow", None)."""
        if self._cam is None:
            head = None
            if "features" in self.engine.outputs and self.engine.artifact is not None:
                from .head import load_artifact_head

                head = load_artifact_head(self.engine.artifact, self.engine.manifest)
            self._cam = ("engine-native", head) if head is not None else ("tensorflow", None)
        return self._cam

    def can_explain(self) -> bool:
        return self.cam_engine()[0] == "engine-native" or self.tf_cam is not None

    def outputs(self, explain: bool) -> list[str]:
        """The engine outputs :meth:`results` needs."""
        return ["probs", "features"] if explain and self.cam_engine()[0] == "engine-native" else ["probs"]

    def _cams(self, labels: np.ndarray, features, images) -> tuple[np.ndarray, str]:
        method, head = self.cam_engine()
        if head is not None:  # engine-native
            from .gradcam import gradcam

            return gradcam(head, features, labels).cam, method
        if self.tf_cam is None:
            raise RuntimeError("this artifact has no engine-native Grad-CAM head and no TensorFlow fallback was given")
        return self.tf_cam(images, labels), method

    # ---- the step
    def results(self, indices: Sequence[int], names: Sequence[str], probs: np.ndarray, timings: Sequence[dict],
                preprocess: str, explain: bool = False, features: np.ndarray | None = None,
                images: np.ndarray | None = None) -> list[ScreeningResult]:
        """One result per row of ``probs`` (item ``indices[k]`` named ``names[k]``, with its own ``timings`` in
        ms). ``explain`` adds Grad-CAM of the decided class from ``features`` (engine-native) or ``images``
        (the packed batch, for the TensorFlow fallback)."""
        info = self.engine.info
        out = []
        for k, i in enumerate(indices):
            r = ScreeningResult.from_probabilities(i, names[k], probs[k], self.classes, self.threshold, info,
                                                   dict(timings[k]), self.operating_point, self.band)
            r.preprocess = preprocess
            out.append(r)
        if explain and out:
            labels = np.array([self.classes.index(r.label) for r in out])  # the label each result was decided as
            t = time.perf_counter()
            cams, method = self._cams(labels, features, images)
            per = (time.perf_counter() - t) / len(out)
            for k, r in enumerate(out):
                peak = float(cams[k].max())
                r.explanation = Explanation(self.classes[labels[k]], method, peak, per, cam=cams[k],
                                            weak=bool(peak < WEAK_CAM_PEAK))
                r.timings_ms["explain"] = 1e3 * per
        return out
