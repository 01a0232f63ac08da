"""Every DICOM object a screened image gives back to the PACS, with UIDs that are the same however often it is made.

The report (SR), the captioned heatmap (SC) and the raw map (SEG) of one source image get SOP Instance UIDs derived
from the source instance UID, the model's sha256 and the object kind (``2.25.`` + a hash, PS3.5 B.2), and series UIDs
from the study, the model and the kind. A node that crashes after sending and sends again, or screens the image again
after a restart, sends the *same* instance, and the PACS keeps one copy. The same writer serves the node and
``cxr-edge predict --dicom-out``.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ..extras import require

#: object kinds, in the order they are sent (the report first: it is the result; the images illustrate it)
SR, SC, SEG = "sr", "sc", "seg"
KINDS = (SR, SC, SEG)
#: the ``--dicom-objects`` choices: which objects a screened image gives (SC and SEG only when it has a map)
DEFAULT_KINDS = (SR, SC, SEG)
#: SOP Class UID of each kind (Comprehensive 3D SR, Secondary Capture Image, Segmentation)
SOP_CLASS = {SR: "1.2.840.10008.5.1.4.1.1.88.34", SC: "1.2.840.10008.5.1.4.1.1.7", SEG: "1.2.840.10008.5.1.4.1.1.66.4"}
#: header attributes the objects copy whose value, when malformed, would stop highdicom: blanked in the copy used
_DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
_TIMES = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime", "PatientBirthTime")
_ENUMERATED = {"PatientSex": ("M", "F", "O", ""), "Laterality": ("R", "L", "")}


#: the namespace of cxr-edge's name-based UUIDs (fixed forever: changing it changes every result's UID)
_UID_NAMESPACE = uuid.UUID("5f0c6a52-8d1e-4c55-9a57-1f7de3c1a0e2")


def result_uid(*parts: object) -> str:
    """A UID derived from ``parts`` alone: ``2.25.`` + a name-based (version 5) UUID as an integer (PS3.5 B.2), so
    it never collides with another organisation's root. (pydicom's ``generate_uid(prefix=None)`` ignores its
    entropy sources and returns a random UUID, which would make every resend a new object.)"""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0x1f).join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class ResultObject:
    kind: str
    sop_instance_uid: str
    dataset: Any

    def write(self, folder: Path, stem: str) -> Path:
        """Written and fsynced under a temporary name, then renamed: a crash never leaves half an object."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}-{self.kind}.dcm"
        tmp = path.with_suffix(".dcm.part")
        self.dataset.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def model_record(manifest, info, threshold: float | None, operating_point: str | None) -> dict[str, Any]:
    """What every result and object says about the model: artifact, recipe, version, sha256, precision, backend."""
    return {"artifact": manifest.file, "recipe": manifest.recipe, "version": f"v{manifest.revision}",
            "sha256": manifest.sha256, "precision": info.precision, "backend": info.backend,
            "provider": info.provider, "threshold": threshold, "operating_point": operating_point}


def read_source(path_or_bytes) -> Any:
    """The source instance's header (no pixels): what the objects copy and reference."""
    pydicom = require("pydicom")
    from io import BytesIO

    src = BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        return pydicom.dcmread(src, stop_before_pixels=True)
    except Exception as exc:
        raise ImageError(str(path_or_bytes)[:80], f"not a DICOM file ({type(exc).__name__}: {exc}); DICOM result objects "
                                                   "belong in the source's study, so only DICOM inputs get them") from exc


def usable_source(source):
    """A copy of the source header the writers can take: malformed dates and times blanked (they are type 2 in
    what the objects copy), an Instance Number that is not a number dropped. The source file is not changed."""
    from pydicom.valuerep import DA, TM

    src = copy.deepcopy(source)  # (Dataset.copy is shallow: changing it would change the caller's header too)
    for keys, parse in ((_DATES, DA), (_TIMES, TM)):
        for k in keys:
            v = src.get(k)
            if v in (None, ""):
                continue
            try:
                parse(str(v))
            except Exception:
                setattr(src, k, "")
    try:
        int(str(src.get("InstanceNumber", 1) or 1))
    except (TypeError, ValueError):
        del src.InstanceNumber
    cs = src.get("SpecificCharacterSet")
    if cs is not None and (not isinstance(cs, str) or "2022" in cs):
        # ISO 2022 code extensions (Japanese, Korean, Chinese sites: "\\ISO 2022 IR 87"), which highdicom does not
        # take: the text is decoded to Unicode and the objects are written in UTF-8, which holds all of it
        src.decode()
        src.SpecificCharacterSet = "ISO_IR 192"
    for k, allowed in _ENUMERATED.items():  # enumerated values highdicom checks: anything else is unknown (empty)
        if k in src and str(src.get(k) or "") not in allowed:
            setattr(src, k, "")
    return src


def equipment(model: dict[str, Any], station: str | None, when: dt.datetime):
    """Contributing Equipment (IHE AIR): the algorithm as processing equipment, its version and model sha256."""
    from highdicom import ContributingEquipment
    from pydicom.sr.codedict import codes

    from .. import __version__

    return ContributingEquipment(
        manufacturer="cxr-edge", purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"cxr-edge {model.get('recipe')}"[:64],
        software_versions=[f"cxr-edge {__version__}"[:64], f"model {model.get('version')}"[:64]],
        device_serial_number=str(model.get("sha256"))[:64], station_name=(station or "")[:16] or None,
        contribution_datetime=when, contribution_description=f"AI screening for COVID-19 on chest X-ray; model sha256 "
                                                             f"{model.get('sha256')}"[:64])


def build(source, result: dict[str, Any], model: dict[str, Any], *, preview: np.ndarray | None = None,
          cam: np.ndarray | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS, station: str | None = None,
          when: dt.datetime | None = None, errors: dict[str, str] | None = None,
          blended: np.ndarray | None = None) -> list[ResultObject]:
    """The objects for one screened source image (``result`` as ``ScreeningResult.to_dict`` gives it).

    ``preview`` (the decoded image) and ``cam`` give the heatmap objects; without a map there are none
    (``blended``: the map already blended over ``preview``, when the caller made it for something else). With
    ``errors`` (a dict), a kind that cannot be made is recorded there with why, and the others are still made;
    without it the first failure raises. Times are UTC, and every object says so (Timezone Offset From UTC)."""
    require("highdicom")
    from . import heatmap_objects, sr_report

    when = (when or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    sha = model.get("sha256")
    source = usable_source(source)
    src_uid, study = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    eq = equipment(model, station, when)
    number = int(str(source.get("InstanceNumber", 1) or 1))
    pix: np.ndarray = preview if preview is not None else np.zeros((1, 1), np.uint8)  # (only used with a map)
    heat: np.ndarray = cam if cam is not None else np.zeros((1, 1), np.float32)
    makers = {
        SR: lambda uid: sr_report.report(source, result, model, series_uid=result_uid(study, sha, SR, "series"),
                                         sop_uid=uid, tracking_uid=result_uid(src_uid, sha, "tracking"),
                                         device_uid=result_uid("device", sha), equipment=eq, when=when,
                                         instance_number=number),
        SC: lambda uid: heatmap_objects.secondary_capture(
            source, heatmap_objects.captioned_overlay(pix, heat, result, model, blended),
            series_uid=result_uid(study, sha, SC, "series"), sop_uid=uid, equipment=eq, when=when,
            instance_number=number),
        SEG: lambda uid: heatmap_objects.map_segmentation(
            source, heat, model, series_uid=result_uid(study, sha, SEG, "series"), sop_uid=uid, equipment=eq, when=when,
            instance_number=number),
    }
    out: list[ResultObject] = []
    for kind in wanted_kinds(kinds, cam is not None and preview is not None):
        uid = result_uid(src_uid, sha, kind)
        try:
            ds = makers[kind](uid)
        except Exception as exc:
            if errors is None:
                raise
            errors[kind] = f"{kind.upper()} could not be made: {type(exc).__name__}: {exc}"
            continue
        ds.TimezoneOffsetFromUTC = "+0000"
        out.append(ResultObject(kind, uid, ds))
    return out


def wanted_kinds(kinds: tuple[str, ...], has_map: bool) -> list[str]:
    """The kinds one result gives: the report always (when asked for), the heatmap objects only with a map."""
    return [k for k in KINDS if k in kinds and (k == SR or has_map)]


def write_hl7(source, result: dict[str, Any], model: dict[str, Any], objects: list[ResultObject], dest, *,
              station: str | None, when: dt.datetime, path: Path) -> tuple[str, str, str, str, str, None]:
    """The HL7 ORU^R01 of one result for one HL7 destination, written like the objects (fsync, rename); the
    outbox row it gives: (kind, message control ID + destination, message type, path, that destination, no error)."""
    from .hl7_report import oru_r01

    report = next((o.sop_instance_uid for o in objects if o.kind == SR), None)
    text = oru_r01(source, result, model, sending_facility=station or "", report_uid=report,  # (escaped as text)
                   receiving_application=dest.receiving_application, receiving_facility=dest.receiving_facility,
                   when=when)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".hl7.part")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ("hl7", hl7_key(source, model, dest), "ORU^R01", str(path), dest.name, None)


def hl7_key(source, model: dict[str, Any], dest) -> str:
    """The outbox key of one HL7 message: its control ID at one destination."""
    from .hl7_report import control_id

    return f"{control_id(str(source.SOPInstanceUID), model.get('sha256'))}@{dest.name}"


def parse_kinds(text: str) -> tuple[str, ...]:
    """``sr,sc,seg`` (or ``none``) from the command line, checked."""
    if text.strip().lower() == "none":
        return ()
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        from ..errors import ConfigError

        raise ConfigError(f"unknown DICOM result object(s) {', '.join(bad)}: choose from {', '.join(KINDS)} or none")
    return kinds
