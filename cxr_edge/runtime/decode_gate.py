"""Reduced-resolution decoding, gated like INT8: used only for an artifact that answers the same with it.

A 2-3k pixel JPEG radiograph headed for a 128-224 px model decodes several times faster at a reduced DCT scale
(libjpeg's 1/2, 1/4, 1/8), but its pixels after the final resize differ slightly from a full decode's. Whether
that matters depends on the model, so it is measured per artifact: the artifact screens the same images decoded
both ways and must agree with itself by the export gates' own criterion (top-class agreement judged three-way by
:func:`cxr_edge.evaluation.criteria.agreement_verdict` against FP16's minimum, and max |dp| within FP16's limit).
The verdict is recorded in the manifest (``decode_gate``); without a passed gate every consumer decodes at full
resolution, and every result says which decoding ran.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..evaluation.criteria import accepted, agreement_verdict
from ..manifest_schema import ArtifactManifest, GateRecord
from ..precision import GATE_LIMITS

log = logging.getLogger(__name__)

GATE_NAME = "reduced-decode"
#: the shorter side images are presented at, as a hospital's CR/DX has them (the reduced scales then apply)
GATE_SIZE = 2048
JPEG_QUALITY = 95
MAX_IMAGES = 200


def decode_mode(manifest: ArtifactManifest | None) -> tuple[bool, str]:
    """Whether reduced-resolution JPEG decoding may feed this artifact, and the sentence every result carries."""
    g = getattr(manifest, "decode_gate", None)
    if g is None:
        return False, "full resolution (reduced-resolution decoding was not gated for this model)"
    if g.passed:
        return True, f"reduced-resolution JPEG decoding where the image allows it (gate passed on {g.n_images} images)"
    return False, "full resolution (reduced-resolution decoding failed its gate: " + "; ".join(g.failures) + ")"


def gate_jpegs(sources: Sequence, size: int = GATE_SIZE) -> list[bytes]:
    """Each source as a baseline JPEG (quality 95) whose shorter side is ``size``: what a CR/DX export looks like,
    so the reduced path is exercised even when the validation images are small PNGs."""
    import cv2

    from ..decode import decode_image
    from ..preprocess import to_uint8

    out = []
    for src in sources:
        px = to_uint8(decode_image(src if not isinstance(src, Path) else str(src), channels=1).pixels)
        h, w = px.shape[:2]
        px = px.reshape(h, w)
        f = size / min(h, w)
        px = cv2.resize(px, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", px, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if ok:
            out.append(buf.tobytes())
    return out


def dprob_limit(manifest: ArtifactManifest | None) -> float:
    """How far reduced decoding may move a probability: FP16's limit, or the artifact's own distance from its FP32
    model where its export gate measured a larger one (an INT8 artifact's rounding already moves its answers that
    far, so decoding is held to the precision the artifact has, not to a tighter one)."""
    own = manifest.gate.max_abs_dprob if manifest is not None and manifest.gate is not None else None
    return max(GATE_LIMITS.fp16_max_abs, own or 0.0)


def measure(engine, jpegs: Sequence[bytes], split: str | None = None) -> GateRecord:
    """The artifact's answers on ``jpegs`` decoded at full and at reduced resolution, judged as the export gates
    judge a lower precision against FP32: top-class agreement three-way against FP16's minimum, and max |dp| within
    :func:`dprob_limit`."""
    from ..preprocess import pack_source

    spec = engine.spec
    full = np.stack([pack_source(b, spec)[0] for b in jpegs])
    reduced: list[np.ndarray] = []
    scales: set[str] = set()
    for b in jpegs:
        packed, img = pack_source(b, spec, reduce=True)
        reduced.append(packed)
        scales.update(n.split(" at ", 1)[1].split(" ", 1)[0] for n in getattr(img, "notes", []) if "decoded at" in n)
    ref = engine.infer_all(full, 32, calibrated=False)
    probs = engine.infer_all(np.stack(reduced), 32, calibrated=False)
    n = len(ref)
    d = float(np.abs(ref - probs).max()) if n else 0.0
    agree = int((ref.argmax(1) == probs.argmax(1)).sum())
    verdict = agreement_verdict(agree, n, GATE_LIMITS.fp16_min_agreement, split)
    limit = dprob_limit(getattr(engine, "manifest", None))
    failures = [msg for ok, msg in ((accepted(verdict), verdict["text"]),
                                    (d <= limit, f"max |dp| {d:.3g} between full and reduced decoding > {limit}"),
                                    (n > 0, "no images to judge on")) if not ok]
    return GateRecord.from_dict({
        "name": GATE_NAME, "passed": not failures, "n_images": n, "failures": failures,
        "metrics": {"top_class_agreement": agree / n if n else None, "max_abs_dprob": d,
                    "agreement_verdict": verdict["text"], "scales": ", ".join(sorted(scales)) or "none applied",
                    "images": f"{split or 'given'} images as quality-{JPEG_QUALITY} JPEGs, shorter side {GATE_SIZE} px"},
        "limits": {"top_class_agreement": GATE_LIMITS.fp16_min_agreement, "max_abs_dprob": limit}}, "decode_gate")


def gate_artifact(artifact: str | Path, sources: Sequence, split: str | None = None, max_images: int = MAX_IMAGES,
                  **backend_options) -> GateRecord:
    """Measure ``artifact`` on ``sources`` (paths, bytes or arrays) and record the verdict in its manifest, in place
    (the model file and its sha256 are untouched; a signature must be renewed, as after calibrate)."""
    import dataclasses

    from ..manifest import read_manifest, write_manifest
    from .backends.registry import open_backend

    artifact = Path(artifact)
    jpegs = gate_jpegs(list(sources)[:max_images])
    engine = open_backend(artifact, **backend_options).load()
    try:
        record = measure(engine, jpegs, split)
    finally:
        engine.close()
    write_manifest(artifact, dataclasses.replace(read_manifest(artifact), decode_gate=record), stamp=False)
    log.info("decode gate of %s: %s", artifact.name, "passed" if record.passed else "; ".join(record.failures))
    return record
