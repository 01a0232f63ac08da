"""Keras reference backend (``train`` extra): parity checks and the baseline in benchmarks."""

from __future__ import annotations

import numpy as np

from .base import Backend, BackendInfo


class KerasBackend(Backend):
    formats = ("keras",)
    name = "keras"

    def __init__(self, artifact, manifest, **options):
        manifest = dict(manifest)
        layer = manifest.get("last_conv_layer")
        manifest.setdefault("outputs", [{"name": "probs"}] + ([{"name": "features"}] if layer else []))
        manifest.setdefault("precision", "fp32")
        super().__init__(artifact, manifest, **options)

    def _load(self) -> BackendInfo:
        from ...extras import require
        from ...train.layers import load_keras_model

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
