"""The device resize (CuPy) against the NumPy reference and against cv2 results prepared on a CPU."""

import sys

import numpy as np
import pytest
from gpu_env import FIXTURES, ROOT, cupy_or_skip, resize_tolerance

from cxr_edge.runtime.resize import area_resize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape, out", [((2048, 1664), (224, 224)), ((3000, 2500), (128, 128)), ((512, 512), (256, 256)),
                                        ((300, 200, 3), (224, 224)), ((97, 131), (64, 40)), ((100, 80), (300, 240))])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_cupy_resize_equals_the_numpy_reference(shape, out, dtype):
    cp = cupy_or_skip()
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256 if dtype == np.uint8 else 65536, shape, dtype=dtype)
    ref = area_resize(img, *out)
    got = cp.asnumpy(area_resize(cp.asarray(img), *out, xp=cp))
    d = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    # float32 matrix products may sum in another order on the device: one level at most, on no more pixels than
    # 3x what other summation orders moved on a CPU (gpu_kit/resize_tolerance.py; uint16 moves more than uint8)
    share, step = resize_tolerance(shape, out, np.dtype(dtype).name)
    assert d.max() <= step and (d != 0).mean() <= share, (d.max(), (d != 0).mean(), share)
    if shape[0] % out[0] == 0 and shape[1] % out[1] == 0:
        assert d.max() == 0  # integer factors are exact everywhere


def test_cupy_resize_matches_cv2_results_prepared_on_a_cpu():
    cp = cupy_or_skip()
    path = FIXTURES / "resize_cases.npz"
    if not path.is_file():
        pytest.skip("run gpu_kit/prepare_fixtures.py on a CPU machine first")
    sys.path.insert(0, str(ROOT / "gpu_kit"))
    from prepare_fixtures import CASES, case_input

    cases = np.load(path)
    for k in range(len(CASES)):
        img, ref = case_input(k), cases[f"cv2_{k}"]
        got = cp.asnumpy(area_resize(cp.asarray(img), *ref.shape[:2], xp=cp))
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, k
