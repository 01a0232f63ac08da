"""The artifact manifest as types: every field cxr-edge writes, parsed and checked once, read as attributes.

A manifest is evidence (hash, gate, signer), so it is frozen, and it is parsed strictly: an unknown field (a
typo, a hand edit, a newer writer) or a field of the wrong type is a :class:`~cxr_edge.errors.ManifestError`
naming the field, at load time, instead of a ``KeyError`` or a silently ignored setting deep inside a backend.
The same coercion runs when code builds a manifest, so what a writer makes is what a reader accepts.

Files, hashes, signatures and schema migration live in :mod:`cxr_edge.manifest`; this module knows no files.
The coercion is a small walk over dataclass annotations rather than pydantic, because the runtime's base install
(a kiosk, a Jetson) carries no pydantic; only the ``serve`` extra brings it, and the manifest is needed everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, ManifestError
from .precision import Int8Target, Precision, Variant
from .preprocess import PreprocessSpec

#: the layout of the JSON this cxr-edge writes; older layouts are migrated on read (:mod:`cxr_edge.manifest`)
SCHEMA_VERSION = 3

#: a value of a measurement table (gate metrics): numbers, a verdict text, or None where it does not apply
Metric = int | float | str | None


class FieldError(ManifestError):
    """One field of a manifest is wrong: ``path`` names it (``gate.passed``), ``problem`` says how."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem

    def inside(self, parent: str) -> FieldError:
        sep = "" if self.path.startswith("[") else "."
        return FieldError(f"{parent}{sep}{self.path}" if parent else self.path, self.problem)


class FrozenDict(dict):
    """An open table inside a manifest (gate metrics, toolchain versions): a dict that refuses changes, so a
    frozen manifest cannot be edited through one of its values."""

    def _refuse(self, *args: Any, **kwargs: Any) -> typing.NoReturn:
        raise TypeError("manifest values are read-only; build a changed manifest with dataclasses.replace()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    if origin is tuple:
        return "a list"
    return "an object"


def _got(value: Any) -> str:
    return {dict: "object", list: "list", FrozenDict: "object", tuple: "list", type(None): "null"}.get(
        type(value), type(value).__name__)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` as ``hint``: JSON (dicts, lists, strings) or already typed values; FieldError at ``path`` if neither."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], path)
        for option in options:  # scalars only (the schema has no union of records): the first that fits
            try:
                return _coerce(value, option, path)
            except FieldError:
                continue
        raise FieldError(path, f"must be {' or '.join(_describe(a) for a in args)}, got {_got(value)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise FieldError(path, f"must be a boolean, got {_got(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(path, f"must be an integer, got {_got(value)}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FieldError(path, f"must be a number, got {_got(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise FieldError(path, f"must be a string, got {_got(value)}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except (ValueError, TypeError):
            raise FieldError(path, f"must be {_describe(hint)}, got {value!r}") from None
    if hint is PreprocessSpec:
        if isinstance(value, PreprocessSpec):
            return value
        if not isinstance(value, Mapping):
            raise FieldError(path, f"must be an object, got {_got(value)}")
        try:
            return PreprocessSpec.from_dict(dict(value))
        except (ConfigError, TypeError, ValueError) as exc:
            raise FieldError(path, f"is not usable ({exc})") from None
    if isinstance(hint, type) and issubclass(hint, Record):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError(path, f"must be a list, got {_got(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise FieldError(path, f"must be a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise FieldError(path, f"must be an object, got {_got(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FieldError(path, f"must have text keys, got {_got(k)}")
            out[k] = _coerce(v, args[1], f"{path}.{k}")
        return FrozenDict(out)
    raise TypeError(f"the manifest schema has no parser for {hint!r} ({path})")  # a schema bug, not a bad file


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, PreprocessSpec):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


_R = TypeVar("_R", bound="Record")


class Record:
    """A typed part of a manifest. Subclasses are frozen dataclasses; construction coerces every field to its
    annotated type (from JSON or from Python values) and runs :meth:`_check`, so an instance is always valid."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every Record is a dataclass
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self._check()

    def _check(self) -> None:
        """Checks across fields or of ranges, raising :class:`FieldError`; types are checked already."""

    @classmethod
    def _json_in(cls, doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    def _json_out(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    @classmethod
    def from_dict(cls: type[_R], doc: Any, path: str = "") -> _R:
        """Parse the JSON object ``doc``; a FieldError names the field (``path`` is where ``doc`` sits)."""
        if not isinstance(doc, Mapping):
            raise FieldError(path or cls.__name__, f"must be an object, got {_got(doc)}")
        doc = cls._json_in(dict(doc))
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(doc) - set(known))
        if unknown:
            names = ", ".join(known) if len(known) <= 12 else f"the fields of cxr_edge.manifest_schema.{cls.__name__}"
            raise FieldError(unknown[0], f"is not a field cxr-edge knows (known here: {names}); it was written by "
                                         "hand or by a newer cxr-edge: re-export, or upgrade cxr-edge").inside(path)
        missing = [n for n, f in known.items() if n not in doc and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise FieldError(missing[0], "is missing; re-export the artifact with cxr-edge").inside(path)
        try:
            return cls(**doc)
        except FieldError as exc:
            raise exc.inside(path) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: fields in declaration order; None, empty parts and empty lists or tables that are the
        field's default are left out (absent means the same)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            js = _to_json(value)
            empty_default = f.default == () or f.default_factory is not dataclasses.MISSING
            if not js and isinstance(js, (list, dict)) and (isinstance(value, Record) or empty_default):
                continue
            out[f.name] = js
        return self._json_out(out)


def _empty() -> FrozenDict:
    return FrozenDict()


# ----------------------------------------------------------------------------------------------- the parts


class ArtifactFormat(str, enum.Enum):
    """What runs an artifact; a local file's format is decided by its name, and the manifest must agree."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"
    KERAS = "keras"
    TRITON = "triton"  # a remote model: its manifest comes from the server's model config


@dataclass(frozen=True)
class TensorSpec(Record):
    """One input or output of the graph (``N`` or null in ``shape``: the batch dimension)."""

    name: str
    dtype: str | None = None
    shape: tuple[int | str | None, ...] | None = None


@dataclass(frozen=True)
class OperatingPoint(Record):
    """The COVID threshold and what it achieved where it was chosen (training's validation split, or a site)."""

    threshold: float | None = None
    target_sensitivity: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    chosen_on: str | None = None
    # site calibration (cxr-edge calibrate) adds the counts and exact intervals behind the rates
    true_positives: int | None = None
    true_negatives: int | None = None
    sensitivity_ci95: tuple[float, float] | None = None
    specificity_ci95: tuple[float, float] | None = None
    manifest_version: int | None = None  # in operating_point_history: the manifest version it was used in

    def _check(self) -> None:
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise FieldError("threshold", f"must be a number in [0, 1], got {self.threshold!r}")


@dataclass(frozen=True)
class SiteCalibration(Record):
    """The site data a calibrated operating point was chosen on."""

    data: str | None = None
    fingerprint: str | None = None
    n_images: int | None = None
    skipped: int | None = None
    counts: Mapping[str, int] = field(default_factory=_empty)
    date: str | None = None
    engine: str | None = None


@dataclass(frozen=True)
class HeadOpSpec(Record):
    """One layer of the classifier head after the Grad-CAM layer; ``params`` are the layer kind's own settings."""

    kind: str
    layer: str | None = None
    params: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True)
class GradCam(Record):
    """How an artifact explains itself: the feature output and the head beside it (engine-native), or why not."""

    engine_native: bool = False
    layer: str | None = None
    feature_output: str | None = None
    probs_output: str | None = None
    head_file: str | None = None
    head_sha256: str | None = None
    head_ops: tuple[HeadOpSpec, ...] = ()
    head_check_max_abs: float | None = None
    method: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class NumericsRecord(Record):
    """Which arithmetic a gate measured with (export/gate_numerics.py); ``isa``: the CPU's facts, for people."""

    engine: str
    mode: str
    text: str | None = None
    depends_on_cpu: bool | None = None
    where: str | None = None
    isa: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GateRecord(Record):
    """An accuracy gate's verdict; ``metrics`` and ``limits`` are its open measurement tables."""

    name: str | None = None
    passed: bool | None = None  # None: not run (a TensorRT build with --no-gate)
    n_images: int | None = None
    metrics: Mapping[str, Metric] = field(default_factory=_empty)
    limits: Mapping[str, float] = field(default_factory=_empty)
    failures: tuple[str, ...] = ()
    numerics: NumericsRecord | None = None

    @property
    def failed(self) -> bool:
        """True only when the gate ran and failed; a gate not run is not a failure."""
        return self.passed is False

    @property
    def max_abs_dprob(self) -> float | None:
        """The largest |p - p_FP32| the gate measured, when it measured one."""
        v = self.metrics.get("max_abs_dprob")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class GateAttempt(Record):
    """One rung of the INT8 remedy ladder, as the export measured it."""

    attempt: int
    quantizer: str | None = None
    method: str | None = None
    excluded: tuple[str, ...] = ()
    remedy: str | None = None
    passed: bool | None = None
    metrics: Mapping[str, Metric] = field(default_factory=_empty)
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenVINOPrecisions(Record):
    """What OpenVINO's CPU plugin runs the compute nodes in (node count per precision; those not in INT8)."""

    per_precision: Mapping[str, int] = field(default_factory=_empty)
    not_int8: tuple[str, ...] = ()


@dataclass(frozen=True)
class Quantization(Record):
    """How an INT8 artifact was quantised, and how much of its work runs in INT8."""

    target: Int8Target
    method: str | None = None
    per_channel: bool | None = None
    exclude_nodes: tuple[str, ...] = ()
    calib_batch: int | None = None
    note: str | None = None
    quantizer: str | None = None
    activations: str | None = None
    weights: str | None = None
    nncf: str | None = None  # NNCF's version, when it quantised
    nodes_kept_float: tuple[str, ...] = ()
    strided_1x1_subsampled_before_dequantize: int | None = None
    uint8_input_straight_to_first_dequantize: bool | None = None
    int8_compute_nodes: int | None = None
    float_compute_nodes: int | None = None
    int8_mac_share: float | None = None
    qdq_pairs: int | None = None
    tensorrt_lint: tuple[str, ...] | None = None  # None: not checked (CPU targets); (): clean
    ort_cpu_int8_kernels: Mapping[str, int] | None = None
    openvino_cpu_precisions: OpenVINOPrecisions | None = None


@dataclass(frozen=True)
class Calibration(Record):
    """The images an INT8 artifact was calibrated on."""

    method: str | None = None
    data: str | None = None
    synthetic: bool | None = None
    fingerprint: str | None = None
    calibration_split: str | None = None
    n_calibration: int | None = None


@dataclass(frozen=True)
class SelfCheckAtExport(Record):
    max_abs_dprob: float
    measured_on: str | None = None


@dataclass(frozen=True)
class SelfCheckRecord(Record):
    """The FP32 model's answers on the reference images, and how far the artifact was from them where it was
    gated (:mod:`cxr_edge.self_check`)."""

    generator: str
    n: int
    inputs_sha256: str
    reference: str
    reference_probs: tuple[tuple[float, ...], ...]
    at_export: SelfCheckAtExport
    band: float
    tolerance: float


@dataclass(frozen=True)
class SourceModel(Record):
    """The Keras model an exported artifact came from (empty for models not made by export)."""

    file: str | None = None
    path: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ParentRef(Record):
    """The artifact this one was derived from (an FP16/INT8 graph's FP32 graph, an engine's ONNX)."""

    file: str
    sha256: str | None = None


@dataclass(frozen=True)
class DataProvenance(Record):
    """The training data: where it was, its fingerprint and split, so later stages find the same test split."""

    root: str | None = None
    fingerprint: str | None = None
    n_images: int | None = None
    split_fractions: tuple[float, ...] | None = None
    split_seed: int | None = None
    split_counts: Mapping[str, Mapping[str, int]] | None = None
    presplit: bool | None = None
    max_images: int | None = None
    skipped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    provenance_file: str | None = None


@dataclass(frozen=True)
class TrainingPhase(Record):
    phase: str
    epochs: int
    learning_rate: float | None = None
    precise_batchnorm: bool | None = None
    from_layer: str | None = None
    layers_unfrozen: int | None = None


@dataclass(frozen=True)
class Training(Record):
    phases: tuple[TrainingPhase, ...] = ()
    history: str | None = None  # the per-epoch CSV beside the model


@dataclass(frozen=True)
class TrainingMetrics(Record):
    val_accuracy_argmax: float | None = None
    n_val: int | None = None


@dataclass(frozen=True)
class PreprocessingFold(Record):
    folded: bool
    what: str | None = None


@dataclass(frozen=True)
class GraphRewrites(Record):
    """Exact rewrites export made to the converted graph."""

    input_preprocessing: PreprocessingFold | None = None


@dataclass(frozen=True)
class Toolchain(Record):
    """The versions an artifact was made with: Python, the platform, and each toolchain package (by its name)."""

    python: str | None = None
    platform: str | None = None
    packages: Mapping[str, str] = field(default_factory=_empty)

    @classmethod
    def _json_in(cls, doc: dict[str, Any]) -> dict[str, Any]:
        return {"python": doc.pop("python", None), "platform": doc.pop("platform", None), "packages": doc}

    def _json_out(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in (("python", self.python), ("platform", self.platform)) if v is not None} | dict(self.packages)

    @classmethod
    def current(cls) -> Toolchain:
        from .machine import toolchain_versions

        return cls.from_dict(toolchain_versions(), "versions")


@dataclass(frozen=True)
class EngineProfile(Record):
    """A TensorRT engine's optimisation profile: NHWC input shapes at its smallest, optimal and largest batch."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def batch_range(self) -> tuple[int, int]:
        return (self.min[0], self.max[0])


@dataclass(frozen=True)
class EngineBuild(Record):
    """The ``cxr-edge build`` options an engine was built with (how to rebuild it elsewhere)."""

    precision: Precision
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int | None = None
    dla_core: int | None = None
    timing_cache: str | None = None
    allow_tf32: bool | None = None
    gate: bool | None = None
    gate_data: str | None = None
    force: bool | None = None


@dataclass(frozen=True)
class TensorRTRecord(Record):
    version: str
    major: int
    typing: str | None = None


@dataclass(frozen=True)
class EngineDevice(Record):
    """The GPU and CUDA an engine was built on: engines run only on the same GPU model and TensorRT version."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_driver: str | None = None
    cuda_runtime: str | None = None
    cuda_bindings: str | None = None


@dataclass(frozen=True)
class DlaRecord(Record):
    dla_core: int
    calibration: str | None = None
    calibration_cache: str | None = None
    calibration_data: str | None = None
    n_calibration: int | None = None


@dataclass(frozen=True)
class SourceOnnx(Record):
    """The ONNX artifact an engine was built from; ``precision`` is its variant tag (``int8-trt``)."""

    file: str
    sha256: str | None = None
    precision: str | None = None

    @property
    def variant(self) -> Variant | None:
        """The source ONNX's variant (what an engine was built from), parsed from its recorded tag."""
        return Variant.from_tag(self.precision) if self.precision else None


@dataclass(frozen=True)
class TritonModel(Record):
    """Where a remote model is served (set by the triton:// backend, never read from a local file's manifest)."""

    host: str
    model: str
    max_batch_size: int | None = None


# ----------------------------------------------------------------------------------------------- the manifest


@dataclass(frozen=True, repr=False, kw_only=True)
class ArtifactManifest(Record):
    """Everything cxr-edge records about one artifact (Keras model, ONNX graph, TensorRT engine, remote model).

    Read it through its typed attributes (:meth:`to_dict` gives the JSON). ``file`` .. ``versions`` describe the
    file itself: :func:`cxr_edge.manifest.write_manifest` stamps them,
    and a manifest built in memory (a remote model, a graph being gated) has none. Change one with
    ``dataclasses.replace``.
    """

    # ---- the file
    file: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created: str | None = None
    versions: Toolchain | None = None
    # ---- what it is and what it expects
    kind: str | None = None
    format: ArtifactFormat | None = None
    opset: int | None = None
    classes: tuple[str, ...]
    operating_point: OperatingPoint | None = None
    preprocess: PreprocessSpec
    recipe: str | None = None
    recipe_config: Mapping[str, Any] | None = None  # the training recipe as run, for people (the code reads recipe)
    last_conv_layer: str | None = None
    weights: str | None = None
    seed: int | None = None
    training: Training | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    io_notes: Mapping[str, str] | None = None
    gradcam: GradCam | None = None
    graph_rewrites: GraphRewrites | None = None
    source_model: SourceModel = field(default_factory=SourceModel)
    data: DataProvenance = field(default_factory=DataProvenance)
    metrics: TrainingMetrics | None = None
    precision: Precision = Precision.FP32
    int8_target: Int8Target | None = None
    parent: ParentRef | None = None
    # ---- how it was checked
    gate: GateRecord | None = None
    gate_status: str | None = None
    conversion: str | None = None
    quantization: Quantization | None = None
    gate_attempts: tuple[GateAttempt, ...] = ()
    calibration: Calibration | None = None
    self_check: SelfCheckRecord | None = None
    # whether reduced-resolution decoding (JPEG DCT scaling) may feed this artifact: measured against full decoding
    # with the same criterion as the export gates (cxr_edge.runtime.decode_gate); None: not measured, so not used
    decode_gate: GateRecord | None = None
    # ---- a TensorRT engine
    profile: EngineProfile | None = None
    build: EngineBuild | None = None
    tensorrt_typing: str | None = None
    tf32: bool | None = None
    float_layers: str | None = None
    tensorrt: TensorRTRecord | None = None
    dla: DlaRecord | None = None
    build_seconds: float | None = None
    device: EngineDevice | None = None
    source_onnx: SourceOnnx | None = None
    source_gate: GateRecord | None = None
    # ---- written later, beside the artifact
    manifest_version: int | None = None  # the site-calibration revision (None: 1, as exported)
    operating_point_history: tuple[OperatingPoint, ...] = ()
    site_calibration: SiteCalibration | None = None
    probability_temperature: float | None = None
    external_data: Mapping[str, str] | None = None  # external weight file name -> sha256
    triton: TritonModel | None = None

    #: fields every manifest read from a file must have
    REQUIRED_IN_FILES: ClassVar[tuple[str, ...]] = ("sha256", "classes", "preprocess")

    def _check(self) -> None:
        sha = self.sha256
        if sha is not None and not (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise FieldError("sha256", "must be 64 lower-case hex digits")
        c = self.classes
        if not (len(c) >= 2 and all(c) and len(set(c)) == len(c)):
            raise FieldError("classes", f"must be a list of at least two distinct names, got {list(c)!r}")
        t = self.probability_temperature
        if t is not None and not 0.01 <= t <= 100:
            raise FieldError("probability_temperature", f"must be a number in [0.01, 100], got {t!r}")
        if self.manifest_version is not None and self.manifest_version < 1:
            raise FieldError("manifest_version", f"must be a positive integer, got {self.manifest_version!r}")
        if self.int8_target is not None and self.precision is not Precision.INT8:
            raise FieldError("int8_target", f"is for INT8 artifacts only; this one is {self.precision.value}")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, doc: Any, path: str = "") -> ArtifactManifest:
        """A manifest from its current JSON (``schema_version`` may be given, and must then be current); use
        :func:`cxr_edge.manifest.read_manifest` for files, which also migrates older layouts."""
        if isinstance(doc, Mapping) and "schema_version" in doc:
            if doc["schema_version"] != SCHEMA_VERSION:
                raise FieldError("schema_version", f"must be {SCHEMA_VERSION} here, got {doc['schema_version']!r}; "
                                                   "read files with read_manifest, which migrates older ones")
            doc = {k: v for k, v in doc.items() if k != "schema_version"}
        return super().from_dict(doc, path)

    def __repr__(self) -> str:
        return f"ArtifactManifest({self.file!r}, precision={self.precision.value}, sha256={str(self.sha256)[:12]}...)"

    # ---- what the code reads, derived
    @property
    def threshold(self) -> float | None:
        """The COVID threshold (None: argmax decides)."""
        return self.operating_point.threshold if self.operating_point is not None else None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs) or ("probs",)

    @property
    def gate_failed(self) -> bool:
        """True only when the export gate ran and failed (kept with --force); missing gate is not failure."""
        return self.gate is not None and self.gate.failed

    @property
    def revision(self) -> int:
        """Which calibration revision of the manifest this is: 1 as exported, +1 per ``cxr-edge calibrate``."""
        return self.manifest_version or 1

    @property
    def variant_tag(self) -> str:
        """``fp32``, ``fp16``, ``int8-trt``...: the variant, or ``int8`` for an engine (its INT8 is TensorRT's)."""
        if self.precision is Precision.INT8 and self.int8_target is None:
            return self.precision.value
        return Variant(self.precision, self.int8_target).tag

    # ---- files (cxr_edge.manifest)
    def write(self, artifact: Any, *, name: str | None = None, stamp: bool = True) -> Any:
        """Write this as the sidecar of ``artifact`` (see :func:`cxr_edge.manifest.write_manifest`)."""
        from .manifest import write_manifest

        return write_manifest(artifact, self, name=name, stamp=stamp)
