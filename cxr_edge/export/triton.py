"""Triton Inference Server model repository export, validated with Triton's own model-config protobuf.

Each artifact becomes ``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx`` (``onnxruntime_onnx``; the
``int8-ov`` flavour on the ``openvino`` backend)
or ``model.plan`` (``tensorrt_plan``). The artifact's manifest travels inside the config as a
``parameters`` entry, so a ``triton://`` client knows the classes, threshold and preprocessing of a
remote model without any local file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..extras import require
from ..manifest import ArtifactManifest, read_manifest
from ..manifest_schema import ArtifactFormat, TensorSpec
from ..precision import Int8Target
from ..runtime.backends.triton import MANIFEST_PARAMETER, model_name, remote_manifest_json

_NP_TO_TRITON = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


@dataclass(frozen=True)
class TritonConfig:
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 5000
    instances: int = 1
    kind: str = "auto"  # KIND_CPU | KIND_GPU | auto (GPU for TensorRT plans, CPU otherwise)

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be >= 1.")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"Preferred batch sizes {bad} are outside 1..{self.max_batch_size}.")
        if self.kind not in ("auto", "KIND_CPU", "KIND_GPU"):
            raise ConfigError(f"kind must be auto, KIND_CPU or KIND_GPU, got {self.kind!r}.")


def _tensor(t: TensorSpec) -> str:
    if t.dtype not in _NP_TO_TRITON or not t.shape:
        raise ConfigError(f"Tensor {t.name!r} of the manifest has no dtype Triton knows or no shape ({t.dtype}, "
                          f"{t.shape}); re-export the artifact with this cxr-edge.")
    dims = ", ".join(str(d) for d in t.shape[1:])
    return f'  {{\n    name: "{t.name}"\n    data_type: {_NP_TO_TRITON[t.dtype]}\n    dims: [ {dims} ]\n  }}'


def render_config(doc: ArtifactManifest, name: str, fmt: ArtifactFormat, cfg: TritonConfig) -> str:
    platform = {ArtifactFormat.ONNX: "onnxruntime_onnx", ArtifactFormat.TENSORRT: "tensorrt_plan"}[fmt]
    # the int8-ov flavour is made for OpenVINO (ONNX Runtime leaves much of it unfused); Triton's OpenVINO
    # backend reads ONNX files when named as its default model file
    runtime = [f'platform: "{platform}"']
    if fmt is ArtifactFormat.ONNX and doc.int8_target is Int8Target.OV:
        runtime = ['backend: "openvino"', 'default_model_filename: "model.onnx"']
    max_batch = cfg.max_batch_size
    if fmt is ArtifactFormat.TENSORRT and doc.profile is not None:
        max_batch = min(max_batch, doc.profile.batch_range[1])
    kind = cfg.kind if cfg.kind != "auto" else ("KIND_GPU" if fmt is ArtifactFormat.TENSORRT else "KIND_CPU")
    preferred = ", ".join(str(b) for b in cfg.preferred_batch_sizes if b <= max_batch)
    escaped = remote_manifest_json(doc).replace("\\", "\\\\").replace('"', '\\"')
    return "\n".join([
        f'name: "{name}"',
        *runtime,
        f"max_batch_size: {max_batch}",
        "input [",
        ",\n".join(_tensor(t) for t in doc.inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t) for t in doc.outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]" if preferred else "",
        f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {cfg.instances}, kind: {kind} }} ]",
        f'parameters {{ key: "{MANIFEST_PARAMETER}" value: {{ string_value: "{escaped}" }} }}',
        "",
    ])


def validate_config(text: str):
    """Parse with Triton's ModelConfig protobuf (tritonclient); raises ConfigError on any problem."""
    require("tritonclient")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc
    if cfg.max_batch_size > 0 and not cfg.HasField("dynamic_batching"):
        raise ConfigError("batched model without dynamic_batching")
    for t in list(cfg.input) + list(cfg.output):
        if not t.dims:
            raise ConfigError(f"tensor {t.name} has no dims")
    return cfg


def export_triton(artifacts, repo: str | Path, cfg: TritonConfig = TritonConfig()) -> list[Path]:
    repo = Path(repo)
    out = []
    for art in map(Path, artifacts):
        doc = read_manifest(art)
        fmt = doc.format
        if fmt not in (ArtifactFormat.ONNX, ArtifactFormat.TENSORRT):
            raise ConfigError(f"{art.name}: only ONNX artifacts and TensorRT plans go into a Triton repository.")
        name = model_name(doc, art)
        mdir = repo / name
        (mdir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(art, mdir / "1" / ("model.onnx" if fmt is ArtifactFormat.ONNX else "model.plan"))
        head = doc.gradcam.head_file if doc.gradcam is not None else None
        if head and (art.parent / head).is_file():
            shutil.copy(art.parent / head, mdir / head)  # Triton ignores extra files
        text = render_config(doc, name, fmt, cfg)
        validate_config(text)
        (mdir / "config.pbtxt").write_text(text)
        out.append(mdir)
    return out
