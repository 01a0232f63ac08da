"""The screening result as an HL7 v2.5.1 ORU^R01 for a RIS or EHR, sent over MLLP.

Why HL7 v2 over MLLP and not FHIR: a hospital's RIS/EHR takes results through its interface engine, and HL7 v2
ORU over MLLP is the interface every RIS and engine (Mirth, Rhapsody, Cloverleaf) already has a channel type for;
a FHIR DiagnosticReport needs a FHIR server with write access and an authorisation setup that few RIS offer today.
The message carries what the TID 1500 report carries (coded decision, probabilities, threshold, borderline,
algorithm) as preliminary (``P``) observations, and the study and report UIDs so the RIS can link to the PACS.
Built as text (segments joined by CR, fields escaped per HL7 2.5.1 section 2.7) and checked by parsing it back with
python-hl7; the message control ID derives from the source instance and the model, so a resend is recognisable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from ..classes import COVID
from . import result_codes as rc

#: ORU^R01 observation result status for an unverified machine result
PRELIMINARY = "P"
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"), ("\r", " "), ("\n", " "))


def esc(value: object) -> str:
    """One field or component value, escaped (HL7 2.5.1 2.7): no delimiter in a value can split the message, and
    no control character (MLLP's 0x0B / 0x1C framing bytes among them) reaches the wire except as \\Xhh\\."""
    text = "" if value is None else str(value)
    for a, b in _ESCAPES:
        text = text.replace(a, b)
    return "".join(f"\\X{ord(c):02X}\\" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


def _ce(code: tuple[str, str, str]) -> str:
    value, scheme, meaning = code
    return f"{esc(value)}^{esc(meaning)}^{esc(scheme)}"


def control_id(source_uid: str, model_sha: str | None) -> str:
    """MSH-10: the same source and model give the same ID (an interface engine can drop a resend)."""
    return hashlib.sha256(f"{source_uid}|{model_sha}|oru".encode()).hexdigest()[:20].upper()


def _person_name(pn) -> str:
    """DICOM PN as HL7 XPN (family^given^middle^suffix^prefix), from the alphabetic group only (a name with
    ideographic and phonetic groups, family^given=山田^太郎=..., keeps its romanised components)."""
    if not pn:
        return ""
    from pydicom.valuerep import PersonName

    p = pn if isinstance(pn, PersonName) else PersonName(str(pn))
    parts = (p.family_name, p.given_name, p.middle_name, p.name_suffix, p.name_prefix)
    return "^".join(esc(x) for x in parts).rstrip("^")


def oru_r01(source, result: dict[str, Any], model: dict[str, Any], *, sending_facility: str, report_uid: str | None,
            receiving_application: str = "", receiving_facility: str = "", when: dt.datetime | None = None) -> str:
    """The ORU^R01 message text for one screened image (``source``: its DICOM header; ``report_uid``: the SR's)."""
    when = (when or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    ts = when.strftime("%Y%m%d%H%M%S") + "+0000"  # UTC, said (the study's own date/time in OBR-7 is the site's)
    probs: dict[str, float] = result.get("probabilities") or {}
    decision = result.get("decision") or {}
    label = str(result.get("label"))
    study_dt = f"{source.get('StudyDate', '')}{str(source.get('StudyTime', '')).split('.')[0]}"
    msh = ["MSH", "^~\\&", "CXR-EDGE", esc(sending_facility), esc(receiving_application), esc(receiving_facility), ts,
           "", "ORU^R01^ORU_R01", control_id(str(source.SOPInstanceUID), model.get("sha256")), "P", "2.5.1", "", "",
           "AL", "NE", "", "UNICODE UTF-8"]
    pid = ["PID", "1", "", f"{esc(source.get('PatientID', ''))}^^^{esc(source.get('IssuerOfPatientID', ''))}".rstrip("^"),
           "", _person_name(source.get("PatientName")), "", esc(source.get("PatientBirthDate", "")),
           esc(source.get("PatientSex", ""))]
    accession = esc(source.get("AccessionNumber", ""))
    service = "CXR-AI^AI chest X-ray COVID-19 screening^99CXREDGE"
    orc = ["ORC", "RE", accession, esc(report_uid or source.SOPInstanceUID)]
    obr = ["OBR", "1", accession, esc(report_uid or source.SOPInstanceUID), service, "", "", esc(study_dt)] + \
          [""] * 14 + [ts, "", "", PRELIMINARY]  # OBR-22 results date, OBR-25 result status
    obx: list[list[str]] = []

    def add(kind: str, code: tuple[str, str, str], value: str, units: str = "") -> None:
        obx.append(["OBX", str(len(obx) + 1), kind, _ce(code), "", value, units, "", "", "", "", PRELIMINARY, "", "", ts])

    add("CWE", rc.COVID_19, _ce(rc.SUSPECTED if label == COVID else rc.NOT_SUSPECTED))
    add("CWE", rc.DECIDED_CLASS, _ce(rc.CLASS_FINDING.get(label, rc.NOT_SUSPECTED)))
    for c, p in probs.items():
        if c in rc.PROBABILITY_OF:
            add("NM", rc.PROBABILITY_OF[c], f"{float(p):.6f}", _ce(rc.NO_UNITS))
    if result.get("threshold") is not None:
        add("NM", rc.THRESHOLD_VALUE, f"{float(result['threshold']):.6f}", _ce(rc.NO_UNITS))
    add("CWE", rc.BORDERLINE, _ce(rc.YES if decision.get("borderline") else rc.NO))
    add("ST", rc.INTENDED_USE, esc(rc.SCREENING_AID[2]))
    add("ST", ("ALGORITHM", rc.PRIVATE_SCHEME, "Algorithm"),
        esc(f"cxr-edge {model.get('recipe')} {model.get('version')} sha256={model.get('sha256')} "
            f"{model.get('precision')} {model.get('backend')} operating point: {model.get('operating_point')}"))
    add("ST", ("113014", "DCM", "Study"), esc(source.StudyInstanceUID))
    if report_uid:
        add("ST", ("REPORT-UID", rc.PRIVATE_SCHEME, "DICOM report SOP Instance UID"), esc(report_uid))
    segments = [msh, pid, orc, obr, *obx]  # (joining MSH with "|" puts MSH-1, the separator, after "MSH")
    return "\r".join("|".join(seg).rstrip("|") for seg in segments) + "\r"


def ack_outcome(ack_text: str) -> str | None:
    """None when the receiver accepted the message (MSA-1 AA or CA), else why not (MSA-1, MSA-3, ERR)."""
    import hl7

    try:
        msg = hl7.parse(ack_text)
        msa = msg.segment("MSA")
    except Exception as exc:
        return f"unreadable HL7 acknowledgement ({type(exc).__name__}: {exc}): {ack_text[:120]!r}"
    code = str(msa[1])
    if code in ("AA", "CA"):
        return None
    text = str(msa[3]) if len(msa) > 3 else ""
    return f"HL7 acknowledgement {code}" + (f": {text}" if text else "")
