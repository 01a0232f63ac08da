"""PreprocessSpec: validation, serialisation, and agreement with Keras' own preprocess_input."""

import numpy as np
import pytest

from cxr_edge.errors import ConfigError
from cxr_edge.preprocess import NormMode, PreprocessSpec, pack_image, to_uint8

RNG = np.random.default_rng(0)


def test_round_trip_and_unknown_fields():
    s = PreprocessSpec(224, 224, "caffe", mean=0.5, std=2.0, interpolation="linear")
    assert PreprocessSpec.from_dict(s.to_dict()) == s
    assert s.to_dict()["mode"] == "caffe"
    with pytest.raises(ConfigError, match="Unknown preprocessing fields"):
        PreprocessSpec.from_dict({**s.to_dict(), "gamma": 2})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=4, width=224, mode="tf"), "too small"),
        (dict(height=224, width=224, mode="tf", input_channels=2), "input_channels"),
        (dict(height=224, width=224, mode="tf", input_channels=3, model_channels=1), "RGB input"),
        (dict(height=224, width=224, mode="tf", mean=0.1), "both mean and std"),
        (dict(height=224, width=224, mode="tf", mean=0.1, std=0.0), "std must be > 0"),
        (dict(height=224, width=224, mode="bogus"), "bogus"),
    ],
)
def test_invalid_specs(kwargs, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        PreprocessSpec(**kwargs)


def test_rescale_and_tf_ranges():
    x = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)
    assert PreprocessSpec(8, 8, "rescale").normalize(x).reshape(-1, 3)[:, 0].tolist() == [0.0, 1.0]
    assert PreprocessSpec(8, 8, "tf").normalize(x).reshape(-1, 3)[:, 0].tolist() == [-1.0, 1.0]


def test_gray_is_replicated_to_three_channels():
    x = RNG.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    y = PreprocessSpec(8, 8, "caffe").normalize(x)
    assert y.shape == (2, 8, 8, 3)
    assert np.allclose(y[..., 0] + 103.939, y[..., 2] + 123.68)


def test_featurewise_stats_applied_after_mode():
    x = RNG.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    base = PreprocessSpec(8, 8, "tf")
    fw = base.with_stats(0.25, 0.5)
    assert np.allclose(fw.normalize(x), (base.normalize(x) - 0.25) / 0.5, atol=1e-6)


def test_batch_shape_checked():
    with pytest.raises(ConfigError, match=r"Expected a batch of shape \(N, 8, 8, 1\)"):
        PreprocessSpec(8, 8, "tf").normalize(np.zeros((8, 8, 1), np.uint8))


def test_to_uint8_windowing():
    assert to_uint8(np.array([[100, 4095]], np.uint16)).tolist() == [[0, 255]]
    assert to_uint8(np.full((2, 2), 7, np.uint16)).max() == 0
    u8 = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    assert to_uint8(u8) is u8  # 8-bit data is never re-stretched


def test_pack_image_resizes_with_spec_interpolation():
    img = np.zeros((100, 50), np.uint8)
    img[:, 25:] = 255
    area = pack_image(img, PreprocessSpec(10, 10, "raw"))
    nearest = pack_image(img, PreprocessSpec(10, 10, "raw", interpolation="nearest"))
    assert area.shape == (10, 10, 1) and set(np.unique(nearest)) <= {0, 255}


@pytest.mark.train
@pytest.mark.parametrize(
    "mode, keras_module",
    [("caffe", "resnet50"), ("tf", "resnet_v2"), ("caffe", "vgg16")],
)
def test_normalize_matches_keras_preprocess_input(mode, keras_module):
    import importlib

    keras_app = importlib.import_module(f"keras.applications.{keras_module}")
    rgb = RNG.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ours = PreprocessSpec(16, 16, mode, input_channels=3).normalize(rgb)
    theirs = keras_app.preprocess_input(rgb.astype(np.float32).copy())
    assert np.allclose(ours, np.asarray(theirs), atol=1e-4)


@pytest.mark.train
@pytest.mark.parametrize("mode", list(NormMode))
@pytest.mark.parametrize("channels", [1, 3])
def test_keras_layer_equals_numpy_reference(mode, channels):
    from cxr_edge.keras_layers import CxrPreprocess

    spec = PreprocessSpec(16, 16, mode, input_channels=channels, mean=0.1, std=1.7)
    x = RNG.integers(0, 256, (2, 16, 16, channels), dtype=np.uint8)
    layer = CxrPreprocess(spec.to_dict())
    assert np.allclose(np.asarray(layer(x)), spec.normalize(x), atol=1e-4)
    clone = CxrPreprocess.from_config(layer.get_config())
    assert clone.spec == spec
