"""Per-image provenance (source collection, patient id) from SOURCES.csv or a metadata CSV.

Knowing the source lets evaluation break metrics down by collection, which is how shortcut
learning (pediatric vs adult collections, image size) shows up; knowing the patient lets the
split keep all of a patient's images on one side.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError

_PATH_COLUMNS = ("relpath", "path", "filename", "file", "file_name", "image", "image_id", "imagefile")
_PATIENT_COLUMNS = ("patient_id", "patientid", "patient", "subject_id")
_SOURCE_COLUMNS = ("source_repo", "source", "dataset", "url")
_PATIENT_IN_TEXT = re.compile(r"patientid\s*=\s*([^;,\s]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Provenance:
    source: str | None = None
    patient: str | None = None


def _pick(fieldnames: Sequence[str], candidates: tuple[str, ...]) -> str | None:
    norm = {re.sub(r"[^a-z0-9]", "", f.lower()): f for f in fieldnames}
    for c in candidates:
        key = re.sub(r"[^a-z0-9]", "", c)
        if key in norm:
            return norm[key]
    return None


def read_provenance(csv_path: str | Path) -> dict[str, Provenance]:
    """Map of key -> provenance; keys are the CSV's path as written and its file name.

    Patient ids come from a patient column, or from ``patientid=`` inside ``original_label_text``
    (the format of ``SOURCES.csv``). They are namespaced by source, since two collections can both
    have a "patient 12".
    """
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"Cannot read metadata CSV {path}: {exc}") from exc
    path_col = _pick(fields, _PATH_COLUMNS)
    if path_col is None:
        raise DatasetError(
            f"Metadata CSV {path} has no image column; expected one of {', '.join(_PATH_COLUMNS)} "
            f"(found {', '.join(fields) or 'no header'})."
        )
    patient_col = _pick(fields, _PATIENT_COLUMNS)
    source_col = _pick(fields, _SOURCE_COLUMNS)
    out: dict[str, Provenance] = {}
    by_name: dict[str, Provenance | None] = {}
    for row in rows:
        key = (row.get(path_col) or "").strip().replace("\\", "/")
        if not key:
            continue
        source = ((row.get(source_col) or "").strip() or None) if source_col else None
        patient = ((row.get(patient_col) or "").strip() or None) if patient_col else None
        if patient is None:
            m = _PATIENT_IN_TEXT.search(row.get("original_label_text") or "")
            patient = m.group(1) if m else None
        if patient is not None:
            patient = f"{source or 'unknown'}:{patient}"
        prov = Provenance(source, patient)
        out[key] = prov
        name = Path(key).name
        # a bare file name is a usable key only while it is unambiguous
        by_name[name] = prov if name not in by_name or by_name[name] == prov else None
    for name, unique in by_name.items():
        if unique is not None:
            out.setdefault(name, unique)
    return out


def lookup(table: dict[str, Provenance], relpath: str) -> Provenance:
    return table.get(relpath) or table.get(Path(relpath).name) or Provenance()
