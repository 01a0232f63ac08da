"""Child process of the LiteRT peer: Keras model -> full-integer LiteRT flatbuffer.

Usage: ``python -m cxr_edge.bench.litert_convert MODEL.keras CALIB.npy OUT.tflite``. In its own process
because TensorFlow never returns what the converter allocated (gigabytes for ResNet152V2).
"""

from __future__ import annotations

import sys

import numpy as np


def convert(model_path: str, calib_path: str, out_path: str) -> None:
    from ..extras import require
    from ..keras_layers import load_keras_model

    tf = require("tensorflow")
    model = load_keras_model(model_path)
    calib = np.load(calib_path)

    def representative():
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with open(out_path, "wb") as f:
        f.write(conv.convert())


if __name__ == "__main__":
    convert(*sys.argv[1:4])
