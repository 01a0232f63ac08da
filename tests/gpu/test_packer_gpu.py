"""GpuBatchPacker with CuPy for real: per-item errors, inputs equal to the CPU packer's within one level,
and the batch on the device at a fixed address across batches."""

import cv2
import numpy as np
import pytest
from gpu_env import cupy_or_skip

from cxr_edge.preprocess import PreprocessSpec

pytestmark = pytest.mark.gpu


def _items(n=10):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = (rng.random((400 + 37 * k, 300 + 23 * k)) * 255).astype(np.uint8)
        ok, buf = cv2.imencode(".png" if k % 2 else ".jpg", img)
        out.append(buf.tobytes())
    out.insert(3, b"this is not an image")
    return out


def test_gpu_packer_batches_match_the_cpu_packer():
    cp = cupy_or_skip()
    from cxr_edge.runtime.batching import BatchPacker
    from cxr_edge.runtime.gpu_preprocess import GpuBatchPacker

    spec = PreprocessSpec(128, 128, "rescale")
    items = _items()
    cpu, gpu = BatchPacker(spec, 4), GpuBatchPacker(spec, 4, xp=cp)
    try:
        a = list(cpu.iter_batches(items))
        b = []
        for pb in gpu.iter_batches(items):
            assert isinstance(pb.x, cp.ndarray)
            b.append((pb.indices, dict(pb.errors), cp.asnumpy(pb.x)))
        addresses = {buf.data.ptr for buf in gpu.buffers}
        assert len(addresses) == 3  # three fixed device batches, reused
    finally:
        cpu.close()
        gpu.close()
    assert [p.indices for p in a] == [x[0] for x in b]
    assert [sorted(p.errors) for p in a] == [sorted(x[1]) for x in b] and 3 in b[0][1]
    for p, (_, _, x) in zip(a, b):
        d = np.abs(p.x.astype(int) - x.astype(int))
        assert d.max() <= 1 and (d == 0).mean() > 0.99


def test_self_test_passes_on_the_device():
    cp = cupy_or_skip()
    from cxr_edge.runtime.gpu_preprocess import self_test

    assert self_test(cp) is None
