"""The three published recipes: architecture, freezing, one training step, save/load round trip."""

import numpy as np
import pytest

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def test_small_cnn_is_the_published_architecture(keras):
    from cxr_edge.train.recipes import RECIPES, build_model

    r = RECIPES["small_cnn"]
    m = build_model(r, r.spec())
    assert m.input.shape[1:] == (128, 128, 1) and m.input.dtype == "uint8"
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size, c.activation.__name__) for c in convs] == [(32, (5, 5), "relu"), (64, (5, 5), "relu")]
    dense = [l for l in m.layers if isinstance(l, keras.layers.Dense)]
    assert [(d.units, d.activation.__name__) for d in dense] == [(512, "relu"), (2, "softmax")]
    assert sum(isinstance(l, keras.layers.MaxPooling2D) for l in m.layers) == 2
    assert (r.optimizer, r.learning_rate, r.epochs, r.classes) == ("sgd", 1e-3, 10, ("COVID", "Normal"))


@pytest.mark.parametrize(
    "name, n_classes, head_units",
    [pytest.param("resnet50_tl", 2, [1024, 1024, 1024, 512, 2], marks=pytest.mark.slow),  # ~13 s on 2 cores
     pytest.param("resnet152v2_tl", 3, [512, 256, 64, 3], marks=pytest.mark.slow)],  # ~1 min on 2 cores
)
def test_backbone_recipe_trains_one_step_and_round_trips(keras, tmp_path, name, n_classes, head_units):
    from cxr_edge.keras_layers import load_keras_model
    from cxr_edge.train.recipes import RECIPES, build_model, make_optimizer

    r = RECIPES[name]
    spec = r.spec(64)
    m = build_model(r, spec, weights=None)
    assert [l.units for l in m.layers if isinstance(l, keras.layers.Dense)] == head_units
    assert r.last_conv_layer in {l.name for l in m.layers}
    ref = getattr(keras.applications, r.backbone)(include_top=False, weights=None, input_shape=(64, 64, 3))
    n_frozen = len(ref.layers) if r.frozen_layers is None else r.frozen_layers
    expected_frozen = {l.name for l in ref.layers[:n_frozen] if l.weights}
    assert {l.name for l in m.layers if l.weights and not l.trainable} == expected_frozen
    assert all(l.trainable for l in m.layers if l.name.startswith("head_") or l.name == "probs")
    m.compile(optimizer=make_optimizer(r.optimizer, r.learning_rate), loss="categorical_crossentropy")
    x = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8)
    y = np.eye(n_classes)[[0, 1, 0, 1]]
    head = m.get_layer("probs").get_weights()[0].copy()
    frozen = m.get_layer("conv1_conv").get_weights()[0].copy()
    loss = m.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert not np.allclose(head, m.get_layer("probs").get_weights()[0])
    assert np.array_equal(frozen, m.get_layer("conv1_conv").get_weights()[0])
    path = tmp_path / f"{name}.keras"
    m.save(path)
    again = load_keras_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5)


def test_local_weights_file_is_loaded(keras, tmp_path):
    from cxr_edge.train.recipes import RECIPES, build_model

    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    base.save_weights(path)
    r = RECIPES["resnet50_tl"]
    m = build_model(r, r.spec(64), weights=str(path))
    np.testing.assert_array_equal(m.get_layer("conv1_conv").get_weights()[0], base.get_layer("conv1_conv").get_weights()[0])


def test_bad_weights_argument(keras):
    from cxr_edge.errors import ConfigError
    from cxr_edge.train.recipes import RECIPES, build_model, get_recipe, resolve_weights

    assert resolve_weights("none") is None and resolve_weights(None) is None and resolve_weights("imagenet") == "imagenet"
    with pytest.raises(ConfigError, match="neither 'imagenet', 'none', nor an existing file"):
        build_model(RECIPES["resnet50_tl"], RECIPES["resnet50_tl"].spec(64), weights="/no/such.h5")
    with pytest.raises(ConfigError, match="Unknown recipe 'vgg'"):
        get_recipe("vgg")

