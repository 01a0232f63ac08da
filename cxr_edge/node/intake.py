"""Receiving one DICOM instance, the same way for C-STORE and STOW-RS: judged, decoded, stored durably, then
acknowledged.

The order is the point. The header is read within its budget (identifiers, selection rules); a screenable
image is decoded in the service's bounded, isolated decode pool (so a hostile or damaged instance is refused
*to its sender*, with a reason, instead of being acknowledged and failing later); the instance is written,
fsynced and its job row committed; only then does the caller answer success. A crash before the commit
leaves nothing the sender was told it can forget; a crash after it leaves a job the restarted node resumes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..decode import DecodeLimits, read_dicom_header
from ..errors import ImageError
from .config import NodeConfig
from .rules import SelectionRules
from .store import RECEIVED, SKIPPED, JobStore

log = logging.getLogger("cxr_edge.node")

#: C-STORE statuses (PS3.4 Table B.2-1) the node answers with
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
#: a DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1); nothing else reaches a file name or a query
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Overloaded(Exception):
    """The node could not judge an instance in time (decoders busy): a resource condition, answered A700, so the
    sender retries instead of discarding a good image as damaged."""


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: a calling AE and its address (DICOM), or an HTTP client address (STOW-RS)."""

    protocol: str  # "dicom" | "http"
    address: str
    ae_title: str | None = None

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.address}" if self.protocol == "dicom" else f"http:{self.address}"


@dataclass(frozen=True)
class IntakeOutcome:
    """What became of one received instance, and the DICOM status its sender gets."""

    status: int
    state: str  # received | skipped | duplicate | refused
    reason: str | None = None
    job_id: int | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == SUCCESS


Decoder = Callable[[bytes, str, str], Any]  # (data, name, client) -> PackedItem, raising the item's ImageError


class Intake:
    """The one intake path. ``decode`` is the service's bounded decoder; ``on_job(job_id, item)`` hands a
    committed job and its decoded pixels to the screening worker (which decodes the file again only after a
    restart)."""

    def __init__(self, store: JobStore, config: NodeConfig, rules: SelectionRules, decode: Decoder,
                 on_job: Callable[[int, Any], None], limits: DecodeLimits, counted: Callable[[str], None] | None = None):
        self.store, self.config, self.rules, self.decode, self.on_job = store, config, rules, decode, on_job
        self.limits, self.counted = limits, counted or (lambda outcome: None)
        config.instance_dir.mkdir(parents=True, exist_ok=True)

    # ---- the steps
    def _refuse(self, status: int, reason: str, sender: Sender, **uids) -> IntakeOutcome:
        out = IntakeOutcome(status, "refused", reason, **uids)
        log.warning("refused an instance from %s (status 0x%04X): %s", sender.label, status, reason)
        try:
            self.store.record("refused", source=sender.label, study_uid=uids.get("study_uid"),
                              sop_instance_uid=uids.get("sop_instance_uid"),
                              detail={"status": f"0x{status:04X}", "reason": reason})
        except Exception as exc:  # the refusal stands; the sender retries or gives up either way
            log.error("could not record a refusal in the audit trail: %s", exc)
        self.counted("refused")
        return out

    def _disk_ok(self) -> str | None:
        free = shutil.disk_usage(self.config.instance_dir).free / 2**20
        if free < self.config.min_free_mb:
            return (f"disk below the watermark: {free:,.0f} MB free, {self.config.min_free_mb:,.0f} MB kept free; retry "
                    "later")
        return None

    def receive(self, data: bytes, sender: Sender, expected_sop_instance: str | None = None,
                expected_sop_class: str | None = None, expected_study: str | None = None) -> IntakeOutcome:
        """Judge, decode, store and record one instance (the DICOM Part 10 bytes, file meta included). The expected
        identifiers come from the C-STORE request (Affected SOP Instance / Class UID) or the STOW-RS URL (study)."""
        t0 = time.time()
        full = self._disk_ok()
        if full:
            return self._refuse(OUT_OF_RESOURCES, full, sender)
        if len(data) > self.config.max_instance_mb * 2**20:
            return self._refuse(OUT_OF_RESOURCES, f"instance of {len(data) / 2**20:,.0f} MB is over the node's "
                                f"{self.config.max_instance_mb:,.0f} MB limit", sender)
        try:
            header = read_dicom_header(data, "instance", self.limits)
        except ImageError as exc:
            return self._refuse(CANNOT_UNDERSTAND, exc.reason, sender, sop_instance_uid=expected_sop_instance)
        ds = header.dataset
        uids = {k: str(getattr(ds, kw, "") or "").strip() for k, kw in
                (("sop_instance_uid", "SOPInstanceUID"), ("study_uid", "StudyInstanceUID"),
                 ("series_uid", "SeriesInstanceUID"), ("sop_class_uid", "SOPClassUID"))}
        bad = [kw for kw, v in uids.items() if not (v and len(v) <= 64 and _UID.match(v))]
        if bad:
            return self._refuse(DOES_NOT_MATCH_SOP_CLASS, f"missing or malformed identifier(s): {', '.join(bad)}", sender,
                                sop_instance_uid=expected_sop_instance)
        ids = {k: uids[k] for k in ("sop_instance_uid", "study_uid", "sop_class_uid")}
        if expected_sop_instance and expected_sop_instance.strip() != uids["sop_instance_uid"]:
            return self._refuse(DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from the request's Affected SOP "
                                "Instance UID", sender, **ids)
        if expected_sop_class and expected_sop_class.strip() != uids["sop_class_uid"]:
            return self._refuse(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request's Affected SOP Class "
                                "UID", sender, **ids)
        if expected_study and expected_study.strip() != uids["study_uid"]:
            return self._refuse(DOES_NOT_MATCH_SOP_CLASS, f"instance belongs to study {uids['study_uid']}, not the "
                                f"study in the request ({expected_study.strip()[:64]})", sender, **ids)
        patient = str(ds.get("PatientID", "") or "")[:64] if self.config.audit_patient_ids else None
        selection = self.rules.evaluate(ds, header.has_pixels)
        if not selection.screen:
            return self._commit(None, uids, header.declared_transfer_syntax, sender, SKIPPED, selection.reason,
                                selection.view, t0, patient, None)
        name = f"{uids['sop_instance_uid']}.dcm"
        try:
            item = self.decode(header.data, name, sender.label)
        except ImageError as exc:
            return self._refuse(CANNOT_UNDERSTAND, exc.reason, sender, **ids)
        except Overloaded as exc:
            return self._refuse(OUT_OF_RESOURCES, str(exc), sender, **ids)
        return self._commit(data, uids, header.declared_transfer_syntax, sender, RECEIVED, None, selection.view, t0,
                            patient, item)

    def _write(self, data: bytes) -> Path:
        """The instance on disk, fsynced (file and folder) before its job row is committed."""
        folder = self.config.instance_dir / time.strftime("%Y%m%d")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.dcm"
        tmp = path.with_suffix(".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _commit(self, data: bytes | None, uids: dict[str, str], ts: str | None, sender: Sender, state: str,
                reason: str | None, view: str | None, t0: float, patient: str | None, item) -> IntakeOutcome:
        ids = {k: uids[k] for k in ("sop_instance_uid", "study_uid", "sop_class_uid")}
        path = None
        try:
            if data is not None:
                path = self._write(data)
            with self.store.transaction() as cur:
                job_id = self.store.add_job(
                    cur, sop_instance_uid=uids["sop_instance_uid"], study_uid=uids["study_uid"],
                    series_uid=uids["series_uid"], sop_class_uid=uids["sop_class_uid"], transfer_syntax=ts,
                    source=sender.label, path=str(path) if path else None, size=len(data) if data is not None else None,
                    sha256=hashlib.sha256(data).hexdigest() if data is not None else None, state=state, reason=reason,
                    view=view, received_at=t0, patient_id=patient)
                detail: dict[str, Any] = {"transfer_syntax": ts, "sop_class_uid": uids["sop_class_uid"], "view": view}
                if patient is not None:
                    detail["patient_id"] = patient
                if job_id is None:
                    detail["note"] = "already received: acknowledged again, not screened again"
                elif reason:
                    detail["reason"] = reason
                self.store.audit(cur, "duplicate" if job_id is None else state, source=sender.label,
                                 study_uid=uids["study_uid"], series_uid=uids["series_uid"],
                                 sop_instance_uid=uids["sop_instance_uid"], job_id=job_id, detail=detail, at=t0)
        except Exception as exc:
            if path is not None:
                path.unlink(missing_ok=True)
            log.error("could not store an instance from %s: %s: %s", sender.label, type(exc).__name__, exc)
            self.counted("refused")
            return IntakeOutcome(OUT_OF_RESOURCES, "refused", f"could not store the instance ({type(exc).__name__}); "
                                 "retry later", None, ids["sop_instance_uid"], ids["sop_class_uid"], ids["study_uid"])
        if job_id is None:
            if path is not None:
                path.unlink(missing_ok=True)
            self.counted("duplicate")
            return IntakeOutcome(SUCCESS, "duplicate", "already received", None, ids["sop_instance_uid"],
                                 ids["sop_class_uid"], ids["study_uid"])
        self.counted(state)
        if state == RECEIVED:
            self.on_job(job_id, item)
        return IntakeOutcome(SUCCESS, state, reason, job_id, ids["sop_instance_uid"], ids["sop_class_uid"], ids["study_uid"])
