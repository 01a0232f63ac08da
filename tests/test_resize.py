"""The array-module INTER_AREA resize against cv2.resize (the CPU path): hypothesis over sizes, aspect ratios,
channels and 8/16-bit. The GPU kit runs the same function with CuPy against this NumPy result."""

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cxr_edge.runtime.resize import area_resize, gray_to_rgb

DTYPES = st.sampled_from([np.uint8, np.uint16])
CHANNELS = st.sampled_from([None, 1, 3])


def _image(draw_seed, h, w, ch, dtype):
    rng = np.random.default_rng(draw_seed)
    top = 256 if dtype == np.uint8 else 65536
    return rng.integers(0, top, (h, w) if ch is None else (h, w, ch), dtype=dtype)


def _cv2(img, oh, ow):
    ref = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_AREA)
    return ref[..., None] if img.ndim == 3 and ref.ndim == 2 else ref


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), oh=st.integers(2, 90), ow=st.integers(2, 90), fy=st.integers(1, 6),
       fx=st.integers(1, 6), ch=CHANNELS, dtype=DTYPES)
def test_integer_factors_are_bit_exact(seed, oh, ow, fy, fx, ch, dtype):
    img = _image(seed, oh * fy, ow * fx, ch, dtype)
    got, ref = area_resize(img, oh, ow), _cv2(img, oh, ow)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.array_equal(got, ref)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), h=st.integers(8, 300), w=st.integers(8, 300), oh=st.integers(2, 260),
       ow=st.integers(2, 260), ch=CHANNELS, dtype=DTYPES)
def test_any_other_size_is_within_one_level(seed, h, w, oh, ow, ch, dtype):
    img = _image(seed, h, w, ch, dtype)
    got, ref = area_resize(img, oh, ow), _cv2(img, oh, ow)
    assert got.shape == ref.shape
    d = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    assert d.max() <= 1
    if oh <= h and ow <= w and dtype == np.uint8:
        assert (d != 0).sum() <= max(2, 0.01 * d.size)  # downscales: nearly every pixel identical


def test_the_size_radiographs_see_matches_the_cpu_path():
    """A 2000 x 1600 radiograph-sized image to 224 x 224, as pack_image would do it."""
    img = _image(7, 2000, 1600, None, np.uint8)
    d = np.abs(area_resize(img, 224, 224).astype(int) - _cv2(img, 224, 224).astype(int))
    assert d.max() <= 1 and (d == 0).mean() > 0.999


def test_gray_to_rgb_replicates():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = gray_to_rgb(g)
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[..., k], g) for k in range(3))
