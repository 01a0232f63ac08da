"""The one definition of preprocessing, shared by training, export, the runtime and Grad-CAM.

Preprocessing is split in two halves on purpose:

* **packing** (:func:`pack_image`): decoded pixels -> ``uint8`` array of shape ``(H, W, C_in)`` at the
  model's resolution. Colour handling, bit-depth reduction and resizing happen here, on the host,
  with OpenCV. Every consumer calls this same function.
* **normalisation** (:meth:`PreprocessSpec.normalize`): ``uint8`` batch -> the ``float32`` tensor the
  network's first layer expects (channel replication, BGR order, scaling, mean/std). Training puts it
  inside the Keras model as a layer and export fuses it into the ONNX graph, so the runtime only ships
  bytes; this NumPy version is the reference the layer is tested against.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# ImageNet channel means in BGR order, as used by keras.applications.imagenet_utils in "caffe" mode.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


class NormMode(str, enum.Enum):
    """How uint8 pixels become network inputs; names follow Keras' ``preprocess_input`` modes."""

    RESCALE = "rescale"  # x / 255 -> [0, 1]      (the small CNN recipe)
    CAFFE = "caffe"  # RGB->BGR, minus ImageNet mean (keras.applications.resnet50)
    TF = "tf"  # x / 127.5 - 1 -> [-1, 1] (keras.applications.resnet_v2)
    RAW = "raw"  # float(x), unchanged


class Interpolation(str, enum.Enum):
    AREA = "area"  # best for down-sampling, which is almost always what we do to radiographs
    LINEAR = "linear"
    CUBIC = "cubic"
    NEAREST = "nearest"

    @property
    def cv2_flag(self) -> int:
        import cv2

        return {
            "area": cv2.INTER_AREA,
            "linear": cv2.INTER_LINEAR,
            "cubic": cv2.INTER_CUBIC,
            "nearest": cv2.INTER_NEAREST,
        }[self.value]


@dataclass(frozen=True)
class PreprocessSpec:
    """Size, colour, normalisation and interpolation of one model's input.

    ``input_channels`` is what the runtime packs (1: grayscale radiograph, the default; 3: RGB);
    ``model_channels`` is what the network's first convolution wants. 1 -> 3 is a replication done
    inside the graph, so grayscale studies cost a third of the host-to-device bytes.
    ``mean``/``std`` are the optional featurewise statistics of the ResNet152V2 recipe, fitted on the
    training split after the mode's scaling and stored here so every consumer applies the same ones.
    """

    height: int
    width: int
    mode: NormMode
    input_channels: int = 1
    model_channels: int = 3
    interpolation: Interpolation = Interpolation.AREA
    mean: float | None = None
    std: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "mode", NormMode(self.mode))
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        if self.height < 8 or self.width < 8:
            raise ConfigError(f"Input size {self.height}x{self.width} is too small; use >= 8 px.")
        if self.input_channels not in (1, 3):
            raise ConfigError(f"input_channels must be 1 or 3, got {self.input_channels}.")
        if self.model_channels not in (1, 3):
            raise ConfigError(f"model_channels must be 1 or 3, got {self.model_channels}.")
        if self.input_channels == 3 and self.model_channels == 1:
            raise ConfigError("An RGB input cannot feed a 1-channel model; pack grayscale instead.")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("Featurewise normalisation needs both mean and std.")
        if self.std is not None and not self.std > 0:
            raise ConfigError(f"Featurewise std must be > 0, got {self.std}.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.input_channels)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.model_channels)

    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``y = x * scale + offset`` (in model channel order) covering mode + mean/std.

        Every normalisation we support is affine per channel, which is why it fuses into one
        multiply-add in any graph (Keras, ONNX, TensorRT).
        """
        c = self.model_channels
        if self.mode is NormMode.RESCALE:
            scale, offset = np.full(c, 1 / 255.0), np.zeros(c)
        elif self.mode is NormMode.TF:
            scale, offset = np.full(c, 1 / 127.5), np.full(c, -1.0)
        elif self.mode is NormMode.CAFFE:
            scale = np.ones(c)
            offset = -np.asarray(CAFFE_BGR_MEAN[:c] if c == 3 else [np.mean(CAFFE_BGR_MEAN)])
        else:
            scale, offset = np.ones(c), np.zeros(c)
        if self.mean is not None and self.std is not None:  # both or neither (__post_init__)
            scale, offset = scale / self.std, (offset - self.mean) / self.std
        return scale.astype(np.float32), offset.astype(np.float32)

    @property
    def swap_rgb_to_bgr(self) -> bool:
        return self.mode is NormMode.CAFFE and self.input_channels == 3

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """Reference NumPy normalisation of a packed ``(N, H, W, C_in)`` uint8 batch."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[-1] != self.input_channels:
            raise ConfigError(
                f"Expected a batch of shape (N, {self.height}, {self.width}, {self.input_channels}), "
                f"got {x.shape}."
            )
        if self.input_channels == 1 and self.model_channels == 3:
            x = np.repeat(x, 3, axis=-1)
        elif self.swap_rgb_to_bgr:
            x = x[..., ::-1]
        scale, offset = self.scale_offset()
        return x * scale + offset

    def with_stats(self, mean: float, std: float) -> PreprocessSpec:
        return dataclasses.replace(self, mean=float(mean), std=float(std))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mode"] = self.mode.value
        d["interpolation"] = self.interpolation.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"Unknown preprocessing fields {sorted(unknown)}; known: {sorted(fields)}.")
        return cls(**d)


#: rows converted per step in :func:`to_uint8`: bounds the float64 working copy to a few MiB
_ROWS_PER_STEP_ELEMENTS = 1 << 20


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Bring 8-bit, 16-bit or float pixels to uint8.

    8-bit data is left untouched (that is what the published recipes trained on). Wider data is
    linearly windowed from its own min to max: radiograph PNG/TIFF exports rarely use the full
    16-bit range, so a fixed /257 would give a dark, low-contrast image.

    Memory is the output plus a few MiB, whatever the input: 16-bit data goes through a 65,536-entry
    lookup table, float data is converted a band of rows at a time (a whole-image float64 copy of a
    49 MP four-channel image is 1.5 GB). The arithmetic is the same float64 formula either way.
    """
    if pixels.dtype == np.uint8:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    if pixels.dtype == np.uint16:
        return _window(np.arange(65536, dtype=np.float64), lo, hi)[pixels]
    out = np.empty(pixels.shape, dtype=np.uint8)
    step = max(1, _ROWS_PER_STEP_ELEMENTS // max(1, pixels[:1].size))
    for r in range(0, pixels.shape[0], step):
        out[r : r + step] = _window(pixels[r : r + step].astype(np.float64), lo, hi)
    return out


def _window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = 255.0 / (hi - lo)
    if np.isfinite(scale) and scale > 0:
        y = (x - lo) * scale
    elif np.isfinite(hi - lo):  # span so small (subnormal) that 255/span overflows: divide instead
        y = (x - lo) / (hi - lo) * 255.0
    else:  # float data spanning +-1e308: hi - lo overflows, so work in halves (both found by fuzzing)
        y = (x / 2 - lo / 2) / (hi / 2 - lo / 2) * 255.0
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Decoded OpenCV-order pixels (gray, BGR or BGRA) -> gray ``(H, W, 1)`` or RGB ``(H, W, 3)``.

    Alpha is dropped rather than composited: radiographs saved as RGBA carry an opaque alpha.
    """
    import cv2

    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        gray = pixels
        if channels == 1:
            return gray[:, :, None]
        return np.repeat(gray[:, :, None], 3, axis=2)
    n = pixels.shape[2]
    if channels == 1:
        code = cv2.COLOR_BGRA2GRAY if n == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(pixels, code)[:, :, None]
    code = cv2.COLOR_BGRA2RGB if n == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(pixels, code)


def pack_image(pixels: np.ndarray, spec: PreprocessSpec, resize: bool = True) -> np.ndarray:
    """Decoded pixels -> ``uint8 (H, W, C_in)`` at the model's resolution (the host half of preprocessing).

    ``resize=False`` stops before the resize (the GPU path resizes on the device, with the same rule:
    :func:`cxr_edge.runtime.resize.area_resize`)."""
    import cv2

    # gray data: depth first, then replication (three wide copies are never made); colour data: channels
    # first at native depth (cvtColor works at 16-bit and float32), then depth, so a wide multi-channel
    # image is never windowed whole
    if pixels.ndim == 2 or pixels.shape[2] == 1 or pixels.dtype not in (np.uint8, np.uint16, np.float32):
        img = to_channels(to_uint8(pixels), spec.input_channels)
    else:
        img = to_uint8(to_channels(pixels, spec.input_channels))
    if img.ndim == 2:
        img = img[:, :, None]
    if resize and img.shape[:2] != (spec.height, spec.width):
        img = cv2.resize(img, (spec.width, spec.height), interpolation=spec.interpolation.cv2_flag)
        if img.ndim == 2:
            img = img[:, :, None]
    return np.ascontiguousarray(img, dtype=np.uint8)


def pack_source(source, spec: PreprocessSpec, *, name: str | None = None, limits=None, common_size: int | None = None,
                resize: bool = True, reduce: bool = False):
    """Decode + pack in one call, the way every consumer does it: returns (packed, decoded image).

    ``common_size`` first down-samples to one square size (the size-leak check of evaluation). ``reduce``: large
    JPEGs may be decoded at a reduced DCT scale (faster; pixels differ slightly), which only an artifact whose
    manifest records a passed decode gate asks for (:mod:`cxr_edge.runtime.decode_gate`); training, evaluation and
    every other consumer decode at full resolution.
    """
    import cv2

    from .decode import DecodeLimits, decode_image

    target = max(spec.height, spec.width, common_size or 0)
    img = decode_image(source, name=name, limits=limits or DecodeLimits(), reduce_for=target if reduce else None,
                       channels=spec.input_channels)
    pixels = img.pixels
    if common_size:
        pixels = cv2.resize(to_uint8(pixels), (common_size, common_size), interpolation=cv2.INTER_AREA)
    return pack_image(pixels, spec, resize), img
