"""The node's HTTP routes on the screening service: STOW-RS in, jobs and studies out, overlays for the kiosk.

STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``, a ``multipart/related;
type="application/dicom"`` body, each part through the same intake as C-STORE; the answer is the standard
Store Instances Response (``application/dicom+json``): Referenced SOP Sequence for what was stored, Failed SOP
Sequence with a Failure Reason for what was not. The body is parsed with the standard library's MIME parser
(email.parser), which reads multipart/related as it is, rather than python-multipart, which is form-data only.
"""

# no `from __future__ import annotations`: FastAPI resolves the route functions' annotations (Request)
import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .intake import SUCCESS, Sender
from .outbox import OUTBOX_STATES, delivery_summary
from .store import STATES, parse_time

if TYPE_CHECKING:
    from .service import ScreeningNode

log = logging.getLogger("cxr_edge.node")



def _stow_allowed(node: "ScreeningNode", host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n) for n in node.config.stow_from)


class UnsupportedMedia(ValueError):
    """A body or part this origin server does not accept (415)."""


def _parts(ctype: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body (a ValueError names what is wrong)."""
    from email import policy
    from email.parser import BytesParser

    lowered = ctype.lower()
    if not lowered.startswith("multipart/related"):
        raise UnsupportedMedia("STOW-RS takes multipart/related; type=\"application/dicom\" (PS3.18 10.5)")
    if "boundary=" not in lowered:
        raise ValueError("multipart/related without a boundary parameter")
    msg = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ValueError("the body is not a multipart message")
    out = []
    for part in msg.iter_parts():
        kind = part.get_content_type()
        if kind != "application/dicom":
            raise UnsupportedMedia(f"part of type {kind}: only application/dicom parts are accepted (no bulk data / metadata "
                             "parts)")
        payload = part.get_payload(decode=True)
        out.append(payload if isinstance(payload, bytes) else b"")
    return out


def add_node_routes(app, node: "ScreeningNode") -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    async def stow(request, study: str | None = None):
        host = request.client.host if request.client else ""
        if not _stow_allowed(node, host):
            return JSONResponse({"detail": f"STOW-RS is not open to {host}; the node admits it from "
                                           f"{', '.join(node.config.stow_from) or 'nowhere'} (--stow-from)"}, 403)
        if not node.service.ready or node.intake is None:
            return JSONResponse({"detail": "the node is starting"}, 503, headers={"Retry-After": "2"})
        body = await request.body()
        try:
            parts = _parts(request.headers.get("content-type", ""), body)
        except UnsupportedMedia as exc:
            return JSONResponse({"detail": str(exc)}, 415)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, 400)
        if not parts:
            return JSONResponse({"detail": "no application/dicom part in the body"}, 400)
        loop = asyncio.get_running_loop()
        sender = Sender("http", host)
        intake = node.intake
        outcomes = await asyncio.gather(*(loop.run_in_executor(None, intake.receive, p, sender, None, None, study)
                                          for p in parts))
        stored, failed = [], []
        for o in outcomes:
            item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [o.sop_class_uid]} if o.sop_class_uid else {"vr": "UI"},
                    "00081155": {"vr": "UI", "Value": [o.sop_instance_uid]} if o.sop_instance_uid else {"vr": "UI"}}
            if o.status == SUCCESS:
                stored.append(item)
            else:
                # Failure Reason (0008,1197): the C-STORE status the same instance would get (PS3.18 10.5.3, PS3.4 B.2)
                item["00081197"] = {"vr": "US", "Value": [o.status]}
                item["00000902"] = {"vr": "LO", "Value": [(o.reason or "")[:64]]}
                failed.append(item)
        answer: dict = {}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else (202 if stored else 409)
        return JSONResponse(answer, status, media_type="application/dicom+json")

    @app.post("/studies", summary="STOW-RS: store instances (multipart/related; type=application/dicom)")
    async def stow_any(request: Request):
        return await stow(request)

    @app.post("/studies/{study}", summary="STOW-RS: store instances of one study")
    async def stow_study(study: str, request: Request):
        return await stow(request, study)

    def _query(request: Request) -> dict:
        q = request.query_params
        state = q.get("state")
        if state and state not in STATES:
            raise ConfigError(f"state must be one of {', '.join(STATES)}")
        limit = int(q.get("limit", "100"))
        if not 1 <= limit <= 1000:
            raise ConfigError("limit must be 1..1000")
        after = q.get("after_id")
        return {"study_uid": q.get("study") or q.get("StudyInstanceUID"), "state": state,
                "since": parse_time(q["since"]) if q.get("since") else None,
                "until": parse_time(q["until"]) if q.get("until") else None, "limit": limit,
                "after_id": int(after) if after else None}

    @app.get("/v1/jobs", summary="Jobs, newest first (filters: study, state, since, until, limit, after_id)")
    async def jobs(request: Request):
        try:
            query = _query(request)
        except (ConfigError, ValueError) as exc:
            return JSONResponse({"detail": str(exc)}, 400)
        return {"jobs": await asyncio.get_running_loop().run_in_executor(None, lambda: _with_delivery(
            node.store.jobs(**query)))}

    def _with_delivery(rows) -> list[dict]:
        """Jobs as dicts, each with its result objects' delivery (one outbox query for the page)."""
        boxes = node.outbox.for_jobs([j.id for j in rows])
        return [{**j.to_dict(), "delivery": delivery_summary(boxes.get(j.id, []))} for j in rows]

    @app.get("/v1/jobs/{job_id}", summary="One job with its full result and the delivery of its result objects")
    async def job(job_id: int):
        j = await asyncio.get_running_loop().run_in_executor(None, node.store.job, job_id)
        if j is None:
            return JSONResponse({"detail": f"no job {job_id}"}, 404)
        return (await asyncio.get_running_loop().run_in_executor(None, _with_delivery, [j]))[0]

    @app.get("/v1/outbox", summary="Result objects by delivery state (state=dead: the dead letters, with reasons)")
    async def outbox(state: str | None = None, limit: int = 200):
        if state is not None and state not in OUTBOX_STATES:
            return JSONResponse({"detail": f"state must be one of {', '.join(OUTBOX_STATES)}"}, 400)
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(None, lambda: node.outbox.rows(state=state, limit=max(1, min(1000, limit))))
        counts = await loop.run_in_executor(None, node.outbox.counts)
        return {"counts": counts, "destinations": [str(d) for d in node.config.destinations],
                "objects": [{"id": r.id, "job_id": r.job_id, "study_uid": r.study_uid, **r.to_dict()} for r in rows]}

    @app.get("/v1/jobs/{job_id}/overlay.jpg", summary="The Grad-CAM overlay of a screened job")
    async def overlay(job_id: int):
        from pathlib import Path

        j = await asyncio.get_running_loop().run_in_executor(None, node.store.job, job_id)
        if j is None or not j.overlay_path or not Path(j.overlay_path).is_file():
            return JSONResponse({"detail": f"no overlay for job {job_id}"}, 404)
        return Response(Path(j.overlay_path).read_bytes(), media_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})

    @app.get("/v1/studies", summary="Recent studies with state and decision (the kiosk worklist)")
    async def studies(limit: int = 50):
        limit = max(1, min(500, limit))
        def studies_with_delivery():
            rows = node.store.studies(limit)
            boxes = node.outbox.for_studies([r["study_uid"] for r in rows])
            return [{**r, "delivery": boxes.get(r["study_uid"], {})} for r in rows]

        return {"studies": await asyncio.get_running_loop().run_in_executor(None, studies_with_delivery)}
