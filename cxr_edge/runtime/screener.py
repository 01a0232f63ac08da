"""``Screener``: images in, screening results (label, probabilities, where it looked) out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..decode_workers import DecodeIsolation
from ..errors import ConfigError
from .backends.registry import open_backend
from .batching import BatchPacker
from .result import ScreeningResult
from .screening_step import ScreeningStep

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
                 isolation: DecodeIsolation | None = DecodeIsolation(), preprocess: str = "auto",
                 tuning: str = "cached", **options):
        if batch_size < 1:  # checked before anything is loaded, so a bad value leaks no engine
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if preprocess not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"preprocess must be auto, cpu or gpu, got {preprocess!r}.")
        options.setdefault("max_batch", batch_size)  # profile of engines compiled at load (ORT's TensorRT EP)
        if isinstance(artifact, (str, Path)) and "://" not in str(artifact):
            from ..bundle import resolve

            artifact = resolve(artifact)  # a bundle (folder, its model file, an archive) is checked whole first
        from .tuning import apply_tuning

        # this machine's measured winner, where the caller named no backend (batch 1: the kiosk's latency)
        backend, options, self.tuned = apply_tuning(artifact, backend, device, options,
                                                    "single" if batch_size == 1 else "batched", tuning)
        if self.tuned:
            log.info("tuned for this machine: %s", self.tuned)
        self.engine = open_backend(artifact, backend=backend, verify=verify, device=device, **options).load()
        self.manifest = self.engine.manifest
        self.classes = self.engine.classes
        from .decode_gate import decode_mode

        # reduced-resolution JPEG decoding only where this artifact's decode gate passed; every result says which ran
        self.reduced_decode, self.decode_note = decode_mode(self.manifest)
        self.step = ScreeningStep(self.engine, threshold, tf_cam=self._tf_cam)  # decides, as every front end does
        self.threshold = self.step.threshold
        self.batch_size = batch_size  # the engine fits any size to its profile (Backend.infer)
        self.workers = workers
        self.isolation = isolation  # None: decode in threads of this process (trusted files only)
        try:
            self.preprocess, self.preprocess_note = choose_preprocess(preprocess, self.engine)
        except BaseException:
            self.engine.close()  # a refused GPU path must not keep the engine
            raise

    # --------------------------------------------------------------- explanations
    def _tf_cam(self, x, targets):
        """Fallback: Grad-CAM on the source Keras model (needs the train extra and the .keras file)."""
        from ..keras_layers import load_keras_model
        from .backends.keras import gradcam_tf

        if not hasattr(self, "_keras"):
            self._keras = load_keras_model(self._source_model_path())
        layer = (self.manifest.gradcam.layer if self.manifest.gradcam else None) or self.manifest.last_conv_layer
        return gradcam_tf(self._keras, x, layer, targets)[0]

    def _source_model_path(self) -> Path:
        """The Keras model an artifact came from: beside it, else where export recorded it (hash-checked)."""
        from ..manifest import read_manifest

        if self.manifest.kind == "keras-model":
            return self.engine.artifact
        src = self.manifest.source_model
        for cand in (self.engine.artifact.parent / (src.file or ""), Path(src.path or "")):
            if src.file and cand.is_file() and read_manifest(cand).sha256 == src.sha256:
                return cand
        raise ConfigError("Engine-native Grad-CAM is not available for this artifact, and its source Keras model "
                          f"({src.file}) was not found beside it or at {src.path} for the TensorFlow fallback.")

    # --------------------------------------------------------------- screening
    def _packer(self, path: str, explain: bool) -> BatchPacker:
        if path == "gpu":
            from .gpu_preprocess import GpuBatchPacker

            return GpuBatchPacker(self.engine.spec, self.batch_size, self.workers, keep_originals=explain,
                                  isolation=self.isolation, reduce=self.reduced_decode)
        return BatchPacker(self.engine.spec, self.batch_size, self.workers, keep_originals=explain,
                           isolation=self.isolation, reduce=self.reduced_decode)

    def predict(self, items, explain: bool = False, out_dir: str | Path | None = None,
                cam_scale: float | None = None, on_result=None) -> list[ScreeningResult]:
        """One result per item, in order; bad items get ``ok=False`` and an error, never an exception.

        ``on_result(result)`` is called as each result is made (in completion order), so a caller can stream
        results and keep what was done when interrupted.

        With GPU preprocessing, a failure of the device path (not of an image) re-runs the remaining
        items on the CPU path and logs why; each result says which path prepared it."""
        items = list(items)
        results: list[ScreeningResult | None] = [None] * len(items)
        try:
            return self._predict_all(items, results, explain, out_dir, cam_scale, on_result)
        except _ConsumerError as exc:  # the caller's own failure (a full disk, a closed pipe), not the engine's
            raise exc.__cause__ from None  # type: ignore[misc]

    def _predict_all(self, items, results, explain, out_dir, cam_scale, on_result) -> list[ScreeningResult]:
        if self.preprocess == "gpu":
            try:
                self._predict(items, list(range(len(items))), results, "gpu", explain, out_dir, cam_scale, on_result)
                return results
            except _ConsumerError:
                raise
            except Exception as exc:  # the device path failed: the CPU path answers what is left
                log.warning("GPU preprocessing failed (%s: %s); the remaining images run on the CPU path",
                            type(exc).__name__, exc)
        todo = [k for k, r in enumerate(results) if r is None]
        self._predict([items[k] for k in todo], todo, results, "cpu", explain, out_dir, cam_scale, on_result)
        return results

    def _predict(self, items, positions, results, path, explain, out_dir, cam_scale, on_result=None) -> None:
        def done(i: int, r: ScreeningResult) -> None:
            results[i] = r
            if on_result is not None:
                try:
                    on_result(r)
                except Exception as exc:
                    raise _ConsumerError() from exc

        packer = self._packer(path, explain)
        info = self.engine.info
        outputs = self.step.outputs(explain)
        try:
            for pb in packer.iter_batches(items):
                pb = _renumber(pb, positions)
                for i, err in pb.errors.items():
                    done(i, ScreeningResult.unusable(i, pb.names[i], err.reason))
                if not pb.indices:
                    continue
                t0 = time.perf_counter()
                out = self.engine.infer_device(pb.x, outputs) if path == "gpu" else self.engine.infer(pb.x, outputs)
                infer_s = time.perf_counter() - t0
                per = len(pb.indices)
                timing = {"decode": 1e3 * pb.decode_s / per, "infer": 1e3 * infer_s / per, "batch": per}
                batch = self.step.results(pb.indices, [pb.names[i] for i in pb.indices], out["probs"],
                                          [timing] * per, path, explain, out.get("features"),
                                          _host(pb.x) if explain else None)
                for r in batch:
                    i = r.index
                    if r.explanation is not None and r.explanation.cam is not None and out_dir is not None:
                        from .overlay import save_explanation

                        stem = f"{i:05d}_{Path(pb.names[i]).stem}"
                        caption = [r.decision.text() if r.decision else str(r.label),
                                   f"Grad-CAM of {r.label} ({r.explanation.method}), {info.precision} on {info.backend}"]
                        r.explanation.files = save_explanation(out_dir, stem, pb.originals[i], r.explanation.cam,
                                                               cam_scale, caption)
                    r.decode = self.decode_note
                    done(i, r)
        finally:
            packer.close()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ConsumerError(Exception):
    """Carries an exception of ``on_result`` past the GPU path's fallback, which must only catch the device's."""


def choose_preprocess(requested: str, engine) -> tuple[str, str]:
    """'cpu' or 'gpu', and why. ``auto`` picks the GPU only for an engine running on CUDA, and only after the
    device resize reproduced the CPU reference (:func:`.gpu_preprocess.self_test`); ``gpu`` insists."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"preprocess must be auto, cpu or gpu, got {requested!r}.")
    if requested == "cpu":
        return "cpu", "asked for"
    on_cuda = getattr(engine.info, "device", "cpu") == "cuda"
    if requested == "auto" and not on_cuda:
        return "cpu", "the engine runs on the CPU"
    why: str | None  # None: the GPU path can run
    try:
        import cupy as cp
    except ImportError:
        from ..gpu_platform import detect

        why = f"CuPy is not installed (pip install {detect().cupy_wheel()})"
    else:
        from .gpu_preprocess import self_test

        why = self_test(cp)
    if why is None:
        return "gpu", "the device resize matched the CPU reference at load"
    if requested == "gpu":
        raise ConfigError(f"GPU preprocessing was asked for but cannot run here: {why}. Use preprocess='auto' or 'cpu'.")
    return "cpu", f"GPU preprocessing unavailable: {why}"


def _host(x):
    return x.get() if hasattr(x, "get") else x


def _renumber(pb, positions):
    """A PackedBatch of a sub-list, with its indices mapped back to the caller's positions."""
    if positions == list(range(len(positions))):
        return pb
    m = positions.__getitem__
    pb.indices = [m(i) for i in pb.indices]
    pb.errors = {m(i): e for i, e in pb.errors.items()}
    pb.originals = {m(i): o for i, o in pb.originals.items()}
    pb.names = {m(i): n for i, n in pb.names.items()}
    return pb
