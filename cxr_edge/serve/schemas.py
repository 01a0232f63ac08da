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


class ModelInfo(BaseModel):
    backend: str
    provider: str
    precision: str
    classes: list[str]


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
