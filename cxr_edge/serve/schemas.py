"""Response models of the HTTP service: what ``/docs`` shows and what tests validate answers against.

They mirror :class:`cxr_edge.runtime.result.ScreeningResult` field for field; the service builds its
answers with ``ScreeningResult.to_dict()``, so CLI, Python API, service and kiosk share one shape.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ExplanationModel(BaseModel):
    target: str = Field(description="the class explained (the decided label)")
    method: str = Field(description="engine-native (closed-form head gradient) or tensorflow")
    peak: float = Field(description="the raw Grad-CAM maximum; near zero: nothing to point at")
    seconds: float
    shape: list[int] | None = Field(None, description="feature-map resolution of the raw map")
    files: dict[str, str] = Field(default_factory=dict, description="files written (CLI only)")
    overlay_png_base64: str | None = Field(None, description="overlay on the image, PNG, base64 (service)")
    preview_jpeg_base64: str | None = Field(None, description="the decoded image, longest side <= 1024, JPEG, base64")
    heatmap_png_base64: str | None = Field(None, description="the coloured map alone (JET), PNG, base64")
    weak: bool | None = Field(None, description="the map shows no localised evidence (same as localised = false)")
    localised: bool | None = Field(None, description="false: the map is near-empty, flat or not finite, so nothing is "
                                                     "coloured (see reason)")
    reason: str | None = Field(None, description="why the map shows no localised evidence, with its numbers")


class DecisionModel(BaseModel):
    label: str
    probability: float = Field(description="probability of the label")
    rule: str = Field(description="threshold (on p(COVID)) or argmax")
    threshold: float | None = None
    covid_probability: float | None = None
    margin: float | None = Field(None, description="p(COVID) - threshold; positive: at or above it")
    borderline: bool | None = Field(None, description="within borderline_band of the threshold: treat as uncertain")
    borderline_band: float | None = None
    operating_point: str | None = Field(None, description="how the threshold was chosen")
    reason: str = Field(description="why this label, floats rounded")
    text: str = Field(description="the reason plus the borderline warning when it applies")


class ScreeningResultModel(BaseModel):
    index: int = Field(description="position of the image in the request")
    source: str = Field(description="the uploaded file's name as sent (never used as a path)")
    ok: bool
    status: int = Field(description="200 screened; 422 the image could not be used (see error)")
    error: str | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = Field(None, description="COVID threshold the label was decided with; None: argmax")
    backend: str | None = None
    provider: str | None = None
    precision: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    explanation: ExplanationModel | None = None
    decision: DecisionModel | None = None
    preprocess: str | None = Field(None, description="which path decoded and resized the image: cpu or gpu")
    decode: str | None = Field(None, description="full resolution, or reduced-resolution JPEG decoding and the gate "
                                                  "that allowed it for this model")
    self_check: dict | None = Field(None, description="the engine's load-time self-check against its FP32 answers: "
                                    "status (passed, failed: served with --self-check warn, not available, off), "
                                    "where (backend/ISA or GPU), max_abs_dprob, tolerance")


class ModelInfo(BaseModel):
    backend: str
    provider: str
    precision: str
    classes: list[str]
    artifact: str | None = Field(None, description="artifact file name")
    recipe: str | None = None
    version: str | None = Field(None, description="manifest version and creation date")
    sha256: str | None = Field(None, description="first 12 hex digits of the artifact's sha256")
    operating_point: str | None = None
    preprocess: str | None = Field(None, description="where images are resized: cpu or gpu")
    tuned: str | None = Field(None, description="the per-machine tuning in use (cxr-edge tune), if any")
    self_check: dict | None = Field(None, description="load-time self-check: status, where, measured |dp|, tolerance, "
                                    "and a sentence such as 'self-check passed on onnxruntime/AVX2: ...'")


class ScreenResponse(BaseModel):
    request_id: str
    results: list[ScreeningResultModel]
    model: ModelInfo


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    backend: str | None = None
    provider: str | None = None
    precision: str | None = None
    queue_depth: int | None = None
    reason: str | None = None  # why not ready: loading, shutting down, decoders or queue saturated
