"""The Keras half of the one preprocessing definition: a layer built from a :class:`PreprocessSpec`.

Putting normalisation inside the model (input = packed uint8 bytes) means a saved ``.keras`` file,
the ONNX graph exported from it and any engine built from that graph all normalise identically;
there is no second implementation to drift.
"""

from __future__ import annotations

from typing import Any

from .extras import require
from .preprocess import PreprocessSpec

keras = require("keras")
#: the base class, bound to a name mypy accepts as a base: keras ships no type information, so it is Any
_Layer: Any = keras.layers.Layer


@keras.saving.register_keras_serializable(package="cxr_edge")
class CxrPreprocess(_Layer):
    """uint8 ``(N, H, W, C_in)`` -> float32 ``(N, H, W, C_model)`` per the spec."""

    def __init__(self, spec: dict, **kwargs):
        super().__init__(**kwargs)
        self.spec = PreprocessSpec.from_dict(dict(spec))
        scale, offset = self.spec.scale_offset()
        self._scale = scale.tolist()
        self._offset = offset.tolist()

    def call(self, x):
        ops = keras.ops
        x = ops.cast(x, "float32")
        if self.spec.input_channels == 1 and self.spec.model_channels == 3:
            x = ops.concatenate([x, x, x], axis=-1)
        elif self.spec.swap_rgb_to_bgr:
            x = ops.flip(x, axis=-1)
        return x * ops.convert_to_tensor(self._scale) + ops.convert_to_tensor(self._offset)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.spec.model_channels)

    def get_config(self):
        return {**super().get_config(), "spec": self.spec.to_dict()}


def load_keras_model(path):
    """Load a ``.keras`` model in safe mode (no arbitrary code from Lambda layers)."""
    return keras.models.load_model(path, safe_mode=True, custom_objects={"CxrPreprocess": CxrPreprocess})
