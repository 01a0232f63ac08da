"""Keras -> ONNX with preprocessing fused and the Grad-CAM feature map as a second named output.

Path chosen: ``tf2onnx.convert.from_function`` on a ``tf.function`` with an explicit uint8 input
signature. ``tf2onnx.convert.from_keras`` fails on Keras 3 Sequential models, and Keras' own
``model.export(format="onnx")`` gives no control over input/output names; ``from_function`` worked
on all three recipes and lets us name the contract (``image`` in; ``probs`` and ``features`` out).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, EngineError
from ..extras import require
from ..preprocess import PreprocessSpec

INPUT_NAME = "image"
PROBS_OUTPUT = "probs"
FEATURES_OUTPUT = "features"
BATCH_DIM = "N"
DEFAULT_OPSET = 17


def _name_batch_dims(proto) -> None:
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def keras_to_onnx(model, spec: PreprocessSpec, feature_layer: str | None, out_path: str | Path,
                  opset: int = DEFAULT_OPSET):
    """Write ``out_path`` and return the checked ONNX ModelProto."""
    tf = require("tensorflow")
    keras = require("keras")
    tf2onnx = require("tf2onnx")
    onnx = require("onnx")
    if opset < 17:
        raise ConfigError(f"opset {opset} is too old; cxr-edge exports opset >= 17.")
    outputs = {PROBS_OUTPUT: model.output}
    if feature_layer:
        outputs[FEATURES_OUTPUT] = model.get_layer(feature_layer).output
    wrapped = keras.Model(model.input, outputs)
    sig = [tf.TensorSpec((None, *spec.input_shape), tf.uint8, name=INPUT_NAME)]

    @tf.function(input_signature=sig)
    def serve(image):
        return wrapped(image, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=sig, opset=opset)
    _name_batch_dims(proto)
    proto.doc_string = (f"cxr-edge export of {model.name}: input '{INPUT_NAME}' is raw uint8 NHWC pixels at "
                        f"{spec.height}x{spec.width}x{spec.input_channels}; normalisation ({spec.mode.value}) "
                        "is inside the graph.")
    onnx.checker.check_model(proto, full_check=True)
    out_path = Path(out_path)
    onnx.save(proto, str(out_path))
    return proto


def io_contract(proto) -> tuple[list[dict], list[dict]]:
    """Names, element types and shapes of graph inputs and outputs, for the manifest."""
    onnx = require("onnx")

    def describe(vi):
        t = vi.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return [describe(v) for v in proto.graph.input], [describe(v) for v in proto.graph.output]


def convert_in_subprocess(model_path: str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET):
    """Run the conversion in a child process and return the saved, checked ModelProto.

    tf2onnx needs many GB to convert a large model such as ResNet152V2 and TensorFlow never hands that memory
    back; in a child process it is returned the moment the conversion ends.
    """
    onnx = require("onnx")
    cmd = [sys.executable, "-m", "cxr_edge.export.onnx_export", str(model_path), str(out_path), "--opset", str(opset)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise EngineError(f"Keras -> ONNX conversion of {model_path} failed (exit {res.returncode}):\n{tail}")
    return onnx.load(str(out_path))


def _main(argv=None) -> int:
    import argparse
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ap = argparse.ArgumentParser(description="Convert a cxr-edge .keras model to ONNX (used by cxr-edge export).")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    a = ap.parse_args(argv)
    from ..keras_layers import load_keras_model
    from ..manifest import read_manifest

    doc = read_manifest(a.model)
    keras_to_onnx(load_keras_model(a.model), doc.preprocess, doc.last_conv_layer, a.out, a.opset)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
