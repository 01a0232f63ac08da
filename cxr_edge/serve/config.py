"""The service's settings: a plain dataclass with no web framework behind it, so the CLI can read its
defaults (and ``cxr-edge --help`` can run) without the ``serve`` extra installed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    max_body_mb: float = 64.0
    max_images_per_request: int = 16
    decode_workers: int = 4  # worker processes (0: threads in the server process, no per-image limits)
    decode_timeout_s: float = 5.0  # per image: a decode running longer is killed and answered as a bad image
    decode_memory_mb: int = 1024  # per decode worker: address space above its own footprint
    max_inflight_body_mb: float = 256.0  # request bodies held at once, all clients together (503 above)
    min_body_rate_kbs: float = 8.0  # after the first 2 s, a body arriving slower than this is cut off (408)
    device: str = "auto"
    backend: str | None = None
    threads: int | None = None  # engine intra-op threads (default: the engine's own choice)
    engine_spin: bool | None = None  # False: engine threads sleep between calls instead of busy-waiting
    cors_origins: tuple[str, ...] = ()  # closed unless the operator lists origins
    trusted_keys: tuple[str, ...] = ()  # public keys; when given, only artifacts they signed are served
    body_timeout_s: float = 30.0  # a body still arriving after this is answered 408 (slow uploads)
    save_dir: str | None = None  # operator opt-in: keep received images here (never elsewhere, never by default)
    allow_failed_gate: bool = False  # serve an artifact whose export gate failed (investigation only)
    self_check: str = "refuse"  # refuse | warn | off: an engine that answers its reference images unlike FP32 here
    preprocess: str = "auto"  # auto | cpu | gpu: where images are resized (auto: the GPU only for CUDA engines)
    cuda_graph: bool = False  # TensorRT engines: replay each batch size's kernels as one CUDA graph
    tuning: str = "cached"  # cached | auto | off: this machine's measured backend/streams/threads (no backend given);
    # the serve command defaults to auto (tunes once at its first start)
