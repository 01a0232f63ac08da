"""Keras reference backend (``train`` extra): parity checks, the baseline in benchmarks, and the
TensorFlow Grad-CAM that the runtime falls back to when an artifact has no engine-native head.

TensorFlow is imported only when a Keras model is loaded, so the runtime stays TensorFlow-free.
"""

from __future__ import annotations

import numpy as np

from .base import Backend, BackendInfo


class KerasBackend(Backend):
    name = "keras"
    OPTIONS = frozenset({"mode"})

    def __init__(self, artifact, manifest, **options):
        manifest = dict(manifest)
        layer = manifest.get("last_conv_layer")
        manifest.setdefault("outputs", [{"name": "probs"}] + ([{"name": "features"}] if layer else []))
        manifest.setdefault("precision", "fp32")
        super().__init__(artifact, manifest, **options)

    def _load(self) -> BackendInfo:
        from ...extras import require
        from ...keras_layers import load_keras_model

        keras = require("keras")
        self.model = load_keras_model(self.artifact)
        layer = self.manifest.get("last_conv_layer")
        outs = {"probs": self.model.output}
        if layer:
            outs["features"] = self.model.get_layer(layer).output
        self._both = keras.Model(self.model.input, outs)
        mode = self.options.get("mode", "call")  # "call": model(x, training=False); "predict": model.predict
        return BackendInfo("keras", f"keras-{keras.backend.backend()}", "fp32", "cpu", {"mode": mode})

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        if outputs == ["probs"]:
            if self.info.details["mode"] == "predict":
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
