"""Keras reference backend (``train`` extra): parity checks, the baseline in benchmarks, and the
TensorFlow Grad-CAM that the runtime falls back to when an artifact has no engine-native head.

TensorFlow is imported only when a Keras model is loaded, so the runtime stays TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...manifest import Manifest
from ...manifest_schema import TensorSpec
from ...precision import Precision
from .base import Backend, BackendInfo, BackendOptions


@dataclass(frozen=True)
class KerasOptions(BackendOptions):
    """The Keras backend's own option beside the common ones."""

    mode: str = "call"  # "call": model(x, training=False); "predict": model.predict


class KerasBackend(Backend):
    name = "keras"
    Options = KerasOptions
    opts: KerasOptions

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """None: Keras is the reference the engines are checked against, never the engine screening is tuned to."""
        return []

    def __init__(self, artifact, manifest: Manifest, **options):
        if not manifest.outputs:  # the model's implicit outputs: its probabilities, and its Grad-CAM layer if it names one
            names = ("probs", "features") if manifest.last_conv_layer else ("probs",)
            manifest = dataclasses.replace(manifest, outputs=tuple(TensorSpec(n) for n in names))
        super().__init__(artifact, manifest, **options)

    def _load(self) -> BackendInfo:
        from ...extras import require
        from ...keras_layers import load_keras_model

        keras = require("keras")
        self.model = load_keras_model(self.artifact)
        layer = self.manifest.last_conv_layer
        outs = {"probs": self.model.output}
        if layer:
            outs["features"] = self.model.get_layer(layer).output
        self._both = keras.Model(self.model.input, outs)
        mode = self.opts.mode
        return BackendInfo("keras", f"keras-{keras.backend.backend()}", Precision.FP32.value, "cpu", {"mode": mode})

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        if outputs == ["probs"]:
            if self.opts.mode == "predict":
                return {"probs": self.model.predict(batch, verbose=0)}
            return {"probs": np.asarray(self.model(batch, training=False))}
        res = self._both(batch, training=False)
        return {k: np.asarray(res[k]) for k in outputs}


def gradcam_tf(model, x: np.ndarray, layer_name: str, target=None):
    """Reference Grad-CAM with ``tf.GradientTape`` on the Keras model: any layer, any head.

    The engine-native Grad-CAM (:mod:`cxr_edge.runtime.gradcam`) is tested against this. Returns
    (cam (N, h, w) raw, target indices, pre-softmax scores) for packed uint8 images ``x``.
    """
    from ...extras import require

    tf = require("tensorflow")
    keras = require("keras")
    final = model.layers[-1]
    if not isinstance(final, keras.layers.Dense):
        from ...errors import ConfigError

        raise ConfigError("Grad-CAM needs the model to end in a Dense layer (its pre-softmax score is explained).")
    grad_model = keras.Model(model.input, [model.get_layer(layer_name).output, final.input])
    with tf.GradientTape() as tape:
        feats, penult = grad_model(x, training=False)
        logits = tf.matmul(penult, final.kernel) + (final.bias if final.use_bias else 0.0)
        tgt = tf.argmax(logits, axis=1) if target is None else tf.broadcast_to(tf.constant(target, tf.int64), [len(x)])
        score = tf.gather(logits, tgt, axis=1, batch_dims=1)
    grads = tape.gradient(score, feats)
    alpha = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", feats, alpha))
    return cam.numpy(), tgt.numpy(), score.numpy()
