"""Engine-native Grad-CAM (NumPy, closed-form head gradient) against TensorFlow's GradientTape."""

import numpy as np
import pytest

pytestmark = pytest.mark.train


def _parity(a: np.ndarray, b: np.ndarray):
    from cxr_edge.runtime.gradcam import normalise

    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1] if a.std() > 0 and b.std() > 0 else 1.0
    return corr, float(np.abs(normalise(a) - normalise(b)).max())


@pytest.mark.parametrize("recipe, size", [("small_cnn", 48), pytest.param("resnet50_tl", 64, marks=pytest.mark.slow),
                                          pytest.param("resnet152v2_tl", 64, marks=pytest.mark.slow)])
def test_head_gradient_matches_tensorflow(recipe, size, tmp_path):
    keras = pytest.importorskip("keras")
    from cxr_edge.export.head_export import extract_head, save_head
    from cxr_edge.runtime.backends.keras import gradcam_tf
    from cxr_edge.runtime.gradcam import gradcam
    from cxr_edge.runtime.head import load_head
    from cxr_edge.train.recipes import RECIPES, build_model

    r = RECIPES[recipe]
    keras.utils.set_random_seed(1)
    m = build_model(r, r.spec(size), weights=None)
    rng = np.random.default_rng(0)
    for layer in m.layers:  # non-trivial batch-norm statistics in the head
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name.startswith("head"):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))
    ops, arrays = extract_head(m, r.last_conv_layer)
    head = load_head(ops, save_head(arrays, tmp_path / "h.npz"))
    from conftest import cxr_like

    x = np.stack([cxr_like(size, size, seed=s)[:, :, None] for s in range(3)])
    feats = keras.Model(m.input, m.get_layer(r.last_conv_layer).output).predict(x, verbose=0)
    for target in (0, 1):
        ours = gradcam(head, feats, target)
        ref_cam, _, ref_score = gradcam_tf(m, x, r.last_conv_layer, target)
        np.testing.assert_allclose(ours.score, ref_score, rtol=1e-3, atol=1e-4)
        for a, b in zip(ours.cam, ref_cam):
            corr, diff = _parity(a, b)
            assert corr >= 0.99 and diff <= 0.02, (recipe, target, corr, diff)


def test_onnx_features_give_the_tensorflow_heatmap(exported):
    """End to end: ORT features + NumPy head vs TensorFlow on the source model, per precision."""
    from cxr_edge.keras_layers import load_keras_model
    from cxr_edge.runtime import Screener
    from cxr_edge.runtime.backends.keras import gradcam_tf

    r, s, data = exported
    items = sorted((data / "COVID").iterdir())[:6]
    model = load_keras_model(r.model_path)
    stats = {}
    for a in s.artifacts:
        with Screener(a.path) as scr:
            res = scr.predict(items, explain=True)
        from cxr_edge.data.loading import load_images

        xb = load_images(items, scr.engine.spec).x
        targets = np.array([scr.classes.index(q.label) for q in res])
        ref = gradcam_tf(model, xb, "conv2", targets)[0]
        pars = [_parity(q.explanation.cam, rc) for q, rc in zip(res, ref)]
        stats[a.variant] = (min(p[0] for p in pars), max(p[1] for p in pars))
    assert stats["fp32"][0] >= 0.99 and stats["fp32"][1] <= 0.02, stats
    assert stats["fp16"][0] >= 0.95, stats  # reported, looser: features themselves are fp16
    assert stats["int8-trt"][0] >= 0.8 and stats["int8-cpu"][0] >= 0.8, stats


def test_tensorflow_fallback_when_the_head_is_not_engine_native(exported, tmp_path):
    import json
    import shutil

    from cxr_edge.manifest import manifest_path, write_manifest
    from cxr_edge.runtime import Screener

    r, s, data = exported
    art = tmp_path / "model.fp32.onnx"
    shutil.copy(s.artifacts[0].path, art)
    doc = json.loads(manifest_path(s.artifacts[0].path).read_text())
    doc["gradcam"] = {"layer": "conv2", "engine_native": False, "reason": "test"}
    fields = {k: v for k, v in doc.items() if k not in ("schema_version", "file", "sha256", "size_bytes", "created", "versions")}
    write_manifest(art, fields)
    with Screener(art) as scr:
        res = scr.predict(sorted((data / "COVID").iterdir())[:2], explain=True)
    assert res[0].explanation.method == "tensorflow" and res[0].explanation.cam.shape == (10, 10)
