"""End-to-end training, manifest, and evaluation on synthetic data (and the real data when present)."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.train


def test_tiny_training_run_beats_chance(trained, tmp_path):
    from cxr_edge.train.evaluate import evaluate_model

    result, data = trained
    report, m = evaluate_model(result.model_path, data, tmp_path / "report", n_boot=100, progress=False)
    assert m["n"] >= 16
    assert m["roc_auc"]["COVID"] >= 0.8, m["roc_auc"]
    assert m["accuracy_argmax"] >= 0.7
    ctx = json.loads((tmp_path / "report" / "report.json").read_text())
    assert ctx["split"] == "test"
    assert (tmp_path / "report" / "training_curves.png").is_file()


def test_manifest_records_what_later_stages_need(trained):
    from cxr_edge.manifest import read_manifest

    result, _ = trained
    doc = read_manifest(result.model_path)
    assert doc.classes == ("COVID", "Normal") and doc.recipe == "small_cnn"
    spec = doc.preprocess
    assert (spec.height, spec.input_channels, spec.mode.value) == (32, 1, "rescale")
    assert doc.last_conv_layer == "conv2"
    assert doc.data.split_counts["train"]["COVID"] > 0 and len(doc.data.fingerprint) == 64
    assert any("Viral Pneumonia" in s for s in doc.data.ignored)
    op = doc.operating_point
    assert 0 <= op.threshold <= 1 and op.sensitivity >= 0.95 and op.chosen_on == "val"
    assert doc.recipe_config["learning_rate"] == 0.01
    assert "tensorflow" in doc.versions.packages


def test_evaluate_other_data_uses_all_images_and_refuses_unknown_split(trained, tmp_path):
    from cxr_edge.errors import DatasetError
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.evaluate import evaluate_model

    result, _ = trained
    other = write_synthetic_dataset(tmp_path / "other", per_class=8, sizes=(96,), seed=9)
    _, m = evaluate_model(result.model_path, other, tmp_path / "r", n_boot=20, progress=False)
    assert m["n"] == 16
    with pytest.raises(DatasetError, match="not the data the model was trained on"):
        evaluate_model(result.model_path, other, tmp_path / "r2", split="test", progress=False)


def test_evaluate_refuses_a_tampered_model(trained, tmp_path):
    import shutil

    from cxr_edge.errors import ManifestError
    from cxr_edge.manifest import manifest_path
    from cxr_edge.train.evaluate import evaluate_model

    result, data = trained
    copy = tmp_path / "model.keras"
    shutil.copy(result.model_path, copy)
    shutil.copy(manifest_path(result.model_path), manifest_path(copy))
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        evaluate_model(copy, data, tmp_path / "r", progress=False)


@pytest.mark.slow
def test_resnet152v2_recipe_end_to_end_with_featurewise_stats(tmp_path):
    pytest.importorskip("tensorflow")
    from cxr_edge.manifest import read_manifest
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.trainer import TrainConfig, train

    data = write_synthetic_dataset(tmp_path / "d", per_class=10, sizes=(64,), seed=3)
    cfg = TrainConfig(recipe="resnet152v2_tl", epochs=1, batch_size=8, image_size=32, weights="none", verbose=0)
    r = train(cfg, data, tmp_path / "m")
    doc = read_manifest(r.model_path)
    assert doc.classes == ("COVID", "Normal", "Viral Pneumonia")
    spec = doc.preprocess
    assert spec.mode.value == "tf" and spec.mean is not None and spec.std > 0
    assert doc.recipe_config["zoom"] == 0.07 and doc.training.phases[0].epochs == 1


@pytest.mark.slow
def test_resnet50_recipe_head_then_fine_tune(tmp_path):
    pytest.importorskip("tensorflow")
    from cxr_edge.evaluation.report import read_history
    from cxr_edge.manifest import read_manifest
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.trainer import TrainConfig, train

    data = write_synthetic_dataset(tmp_path / "d", per_class=8, sizes=(64,), seed=4)
    cfg = TrainConfig(recipe="resnet50_tl", epochs=1, fine_tune_epochs=1, batch_size=8, image_size=32,
                      weights="none", verbose=0)
    r = train(cfg, data, tmp_path / "m")
    phases = read_manifest(r.model_path).training.phases
    assert [p.phase for p in phases] == ["head", "fine_tune"]
    assert phases[1].layers_unfrozen > 0 and phases[1].learning_rate == 1e-5
    assert read_history(r.history_path)["epoch"] == [0.0, 1.0]


@pytest.mark.slow
def test_small_cnn_on_real_data(real_data, tmp_path):
    """The Done-when run, shortened: real images, published recipe, test-split report."""
    pytest.importorskip("tensorflow")
    from cxr_edge.train.evaluate import evaluate_model
    from cxr_edge.train.trainer import TrainConfig, train

    r = train(TrainConfig(recipe="small_cnn", epochs=2, verbose=0), real_data, tmp_path / "m")
    _, m = evaluate_model(r.model_path, real_data, tmp_path / "rep", n_boot=100, progress=False)
    assert m["n"] > 50 and set(m["per_source"]) >= {"GitKentC/lundis"}
    assert m["size_probe"]["accuracy_from_size_only"] > m["size_probe"]["majority_class_rate"]
    assert np.isfinite(m["roc_auc_macro"])


def test_precise_batchnorm_puts_population_statistics_in_place_before_validation():
    """Keras' 0.99-momentum averages still hold their init after a few steps; the callback fixes that."""
    keras = pytest.importorskip("keras")
    from cxr_edge.train.trainer import has_trainable_batchnorm, precise_batchnorm_callback

    rng = np.random.default_rng(0)
    x = (rng.normal(50.0, 10.0, (64, 4))).astype("float32")  # far from BN's initial mean 0 / variance 1
    y = np.eye(2)[rng.integers(0, 2, 64)]

    def run(callbacks):
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        bn = keras.layers.BatchNormalization()
        model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(bn(inp)))
        model.compile("sgd", "categorical_crossentropy")
        assert has_trainable_batchnorm(model)
        model.fit(x, y, batch_size=16, epochs=1, validation_data=(x, y), callbacks=callbacks, verbose=0)
        return np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)

    mean_plain, _ = run([])
    mean_precise, var_precise = run([precise_batchnorm_callback(x, 16, max_batches=4)])
    assert np.all(np.abs(mean_plain - 50) > 40)  # 4 steps of momentum 0.99: still near 0
    assert np.allclose(mean_precise, x.mean(0), atol=1.0) and np.allclose(var_precise, x.var(0), rtol=0.3)
