"""Extract the layers after the Grad-CAM layer into the NumPy head format of :mod:`cxr_edge.runtime.head`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..extras import require


class UnsupportedHead(Exception):
    """The head has a layer the NumPy head cannot reproduce; Grad-CAM then falls back to TensorFlow."""


def _chain_after(model, layer_name: str):
    keras = require("keras")
    names = [l.name for l in model.layers]
    if layer_name not in names:
        raise UnsupportedHead(f"layer {layer_name!r} is not in the model")
    chain = model.layers[names.index(layer_name) + 1 :]
    prev = model.get_layer(layer_name).output
    for layer in chain:
        if isinstance(layer, keras.layers.InputLayer) or layer.input is not prev:
            raise UnsupportedHead(f"the head is not a simple chain after {layer_name!r} (at {layer.name!r})")
        prev = layer.output
    return chain


def extract_head(model, layer_name: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(ops, arrays) for the layers after ``layer_name``; raises :class:`UnsupportedHead`."""
    keras = require("keras")
    L = keras.layers
    ops: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    for layer in _chain_after(model, layer_name):
        i = len(ops)
        if isinstance(layer, L.MaxPooling2D):
            if layer.padding != "valid" or layer.pool_size[0] != layer.pool_size[1] or layer.strides[0] != layer.strides[1]:
                raise UnsupportedHead(f"{layer.name}: only square, 'valid' max pooling is supported")
            ops.append({"kind": "maxpool", "layer": layer.name,
                        "params": {"pool": int(layer.pool_size[0]), "stride": int(layer.strides[0])}})
        elif isinstance(layer, L.GlobalAveragePooling2D):
            ops.append({"kind": "gap", "layer": layer.name, "params": {}})
        elif isinstance(layer, L.GlobalMaxPooling2D):
            ops.append({"kind": "gmp", "layer": layer.name, "params": {}})
        elif isinstance(layer, L.Flatten):
            ops.append({"kind": "flatten", "layer": layer.name, "params": {}})
        elif isinstance(layer, L.Dropout):
            ops.append({"kind": "identity", "layer": layer.name, "params": {}})
        elif isinstance(layer, L.ReLU) or (isinstance(layer, L.Activation) and layer.activation.__name__ == "relu"):
            ops.append({"kind": "relu", "layer": layer.name, "params": {}})
        elif isinstance(layer, L.Dense):
            act = layer.activation.__name__
            if act not in ("relu", "linear", "softmax"):
                raise UnsupportedHead(f"{layer.name}: activation {act!r} is not supported")
            k, b = layer.get_weights() if layer.use_bias else (layer.get_weights()[0], None)
            arrays[f"{i}/kernel"] = k.astype(np.float32)
            if b is not None:
                arrays[f"{i}/bias"] = b.astype(np.float32)
            ops.append({"kind": "dense", "layer": layer.name, "params": {"activation": act, "units": int(layer.units)}})
        elif isinstance(layer, L.BatchNormalization):
            w = {v.path.split("/")[-1]: np.asarray(v) for v in layer.weights}
            gamma = w.get("gamma", np.ones_like(w["moving_mean"]))
            beta = w.get("beta", np.zeros_like(w["moving_mean"]))
            scale = gamma / np.sqrt(w["moving_variance"] + layer.epsilon)
            arrays[f"{i}/scale"] = scale.astype(np.float32)
            arrays[f"{i}/shift"] = (beta - w["moving_mean"] * scale).astype(np.float32)
            ops.append({"kind": "batchnorm", "layer": layer.name, "params": {}})
        else:
            raise UnsupportedHead(f"{layer.name}: layer type {type(layer).__name__} is not supported")
    if not ops or ops[-1]["kind"] != "dense" or ops[-1]["params"]["activation"] != "softmax":
        raise UnsupportedHead("the head must end in a softmax Dense layer")
    return ops, arrays


def save_head(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    path = Path(path)
    # numpy's stub lets **kwds fill the allow_pickle flag; the names here are "<op>/<array>", never that
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path
