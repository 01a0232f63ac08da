"""Coverage-guided fuzz target for the input path: bytes -> decode -> to uint8 -> resize -> pack.

Every input must end in packed pixels of the model's shape or a typed ImageError; anything else
(another exception, a crash, a hang past -timeout, memory past -rss_limit_mb) is a finding.
The first input byte picks the route: encoded file bytes (PNG/JPEG/BMP/TIFF/DICOM/garbage), or a
NumPy array whose dtype, shape and values come from the fuzzer (NaN/inf, 16-bit, float, RGBA...).

    python fuzz/fuzz_decode.py SCRATCH_CORPUS fuzz/corpus/decode -max_total_time=60 -rss_limit_mb=1536 -timeout=10

Keep new corpus entries out of the repository (pass a scratch corpus directory first).
"""

import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["cxr_edge"]):
    from cxr_edge.decode import DecodeLimits
    from cxr_edge.errors import ImageError
    from cxr_edge.preprocess import PreprocessSpec, pack_source

SPECS = [PreprocessSpec(height=32, width=32, mode="rescale", input_channels=1, model_channels=1),
         PreprocessSpec(height=48, width=40, mode="tf", input_channels=3, model_channels=3, interpolation="linear")]
LIMITS = DecodeLimits(max_pixels=4_000_000, max_bytes=8 * 1024 * 1024)
DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
          np.bool_, np.complex64, np.uint32, ">u2", ">f4", object]


def _array(fdp: atheris.FuzzedDataProvider):
    dtype = np.dtype(DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
    ndim = fdp.ConsumeIntInRange(0, 4)
    shape = tuple(fdp.ConsumeIntInRange(0, 300) for _ in range(ndim))
    n = int(np.prod(shape)) if shape else 1
    if n > 300_000:  # long thin images (1 x up to 2M) instead of arrays too big for the fuzzing process
        shape, n = (1, min(n // max(1, shape[0]), 2_000_000)), 0
    raw = fdp.ConsumeBytes(min(n * max(dtype.itemsize, 1), 1_000_000))
    if dtype.kind == "O":
        return np.array([raw], dtype=object)
    buf = raw + bytes(max(0, n * dtype.itemsize - len(raw)))
    arr = np.frombuffer(buf, dtype=dtype, count=n).reshape(shape) if n else np.zeros(shape, dtype)
    if arr.ndim and fdp.ConsumeBool():
        arr = arr[::-1]  # non-contiguous views too
    return arr


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data)
    spec = SPECS[fdp.ConsumeIntInRange(0, len(SPECS) - 1)]
    source = _array(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else fdp.ConsumeBytes(len(data))
    try:
        packed, _ = pack_source(source, spec, name="fuzz", limits=LIMITS)
    except ImageError:
        return
    expected = (spec.height, spec.width, spec.input_channels)
    if packed.shape != expected or packed.dtype != np.uint8:
        raise AssertionError(f"packed {packed.shape} {packed.dtype}, expected {expected} uint8")


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
