"""Reference Grad-CAM with ``tf.GradientTape`` on the Keras model: any layer, any head.

The engine-native Grad-CAM (:mod:`cxr_edge.runtime.gradcam`) is tested against this, and the
runtime falls back to it when the engine cannot serve (unsupported head, another layer).
"""

from __future__ import annotations

import numpy as np

from ..extras import require


def gradcam_tf(model, x: np.ndarray, layer_name: str, target=None):
    """(cam (N, h, w) raw, target indices, pre-softmax scores) for packed uint8 images ``x``."""
    tf = require("tensorflow")
    keras = require("keras")
    final = model.layers[-1]
    if not isinstance(final, keras.layers.Dense):
        raise ValueError("Grad-CAM needs the model to end in a Dense layer (its pre-softmax score is explained).")
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
