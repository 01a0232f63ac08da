"""Series selection rules: which received instances are chest frontal radiographs worth screening.

In the spirit of MONAI Deploy's selector rules, but a flat TOML file a radiology IT engineer can read
(``default_rules.toml`` documents every key). Every instance that is not screened gets a reason, so the
audit trail can answer "why was this image not screened?".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6 ships 3.10): the same parser, from PyPI (the node extra)
    import tomli as tomllib

#: View Code Sequence codes (CID 4010 "DX View", SNOMED CT; the legacy SNOMED RT values too), used when the item's
#: meaning is not one of the views by name: values as pydicom's code dictionary and PixelMed's CID 4010 table list them
VIEW_CODES = {"399348003": "AP", "272479007": "PA", "399066004": "PA", "399173006": "LL", "399198007": "RL",
              "49370004": "LATERAL", "R-10206": "AP", "R-10214": "PA", "R-10232": "LL", "R-10236": "RL"}


@dataclass(frozen=True)
class Selection:
    """The rules' verdict on one instance: screen it, or skip it and say why."""

    screen: bool
    reason: str | None
    view: str | None


def _words(values: Any, key: str) -> frozenset[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"selection rules: {key} must be a list of strings, got {values!r}")
    return frozenset(v.strip().upper() for v in values)


def _choice(value: Any, key: str) -> bool:
    if value not in ("screen", "skip"):
        raise ConfigError(f"selection rules: {key} must be \"screen\" or \"skip\", got {value!r}")
    return value == "screen"


def _int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"selection rules: {key} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SelectionRules:
    modalities: frozenset[str]
    body_parts: frozenset[str]
    body_part_missing_screens: bool
    frontal_views: frozenset[str]
    skip_views: frozenset[str]
    view_missing_screens: bool
    photometric: frozenset[str]
    max_frames: int
    min_side: int
    source: str = "built-in defaults"

    _SECTIONS = {"modality": {"screen"}, "body_part": {"screen", "when_missing"},
                 "view": {"frontal", "skip", "when_missing"}, "image": {"photometric", "max_frames", "min_side"}}

    @classmethod
    def _parse(cls, text: str, source: str) -> dict[str, dict[str, Any]]:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"selection rules {source} are not valid TOML: {exc}") from exc
        for section, body in doc.items():
            if section not in cls._SECTIONS or not isinstance(body, dict):
                raise ConfigError(f"selection rules {source}: unknown section [{section}] "
                                  f"(known: {', '.join(sorted(cls._SECTIONS))})")
            unknown = set(body) - cls._SECTIONS[section]
            if unknown:
                raise ConfigError(f"selection rules {source}: unknown key(s) {sorted(unknown)} in [{section}] "
                                  f"(known: {sorted(cls._SECTIONS[section])})")
        return doc

    @classmethod
    def load(cls, path: str | Path | None = None) -> SelectionRules:
        """The built-in CXR defaults (``default_rules.toml``), with the keys a site's TOML file sets replacing
        them; unknown sections and keys are refused, not ignored."""
        doc = cls._parse(resources.files("cxr_edge.node").joinpath("default_rules.toml").read_text(), "built-in")
        source = "built-in defaults"
        if path is not None:
            try:
                text, source = Path(path).read_text(), str(path)
            except OSError as exc:
                raise ConfigError(f"cannot read the selection rules {path}: {exc.strerror or exc}") from exc
            for section, body in cls._parse(text, source).items():
                doc[section] = {**doc.get(section, {}), **body}
        m, b, v, i = (doc[k] for k in ("modality", "body_part", "view", "image"))
        return cls(modalities=_words(m["screen"], "modality.screen"),
                   body_parts=_words(b["screen"], "body_part.screen"),
                   body_part_missing_screens=_choice(b["when_missing"], "body_part.when_missing"),
                   frontal_views=_words(v["frontal"], "view.frontal"),
                   skip_views=_words(v["skip"], "view.skip"),
                   view_missing_screens=_choice(v["when_missing"], "view.when_missing"),
                   photometric=_words(i["photometric"], "image.photometric"),
                   max_frames=_int(i["max_frames"], "image.max_frames"),
                   min_side=_int(i["min_side"], "image.min_side"), source=source)

    def evaluate(self, ds, has_pixels: bool | None = None) -> Selection:
        """Screen or skip one instance, judged by its header alone (``has_pixels``: whether the object holds pixel
        data, for a header read that stopped before it; None: look for it in ``ds``)."""
        view = view_of(ds)
        if has_pixels is None:
            has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        if not has_pixels:
            return Selection(False, "not an image (no pixel data: a report, presentation state or key object)", view)
        modality = _text(ds, "Modality")
        if modality not in self.modalities:
            return Selection(False, f"modality {modality or '(none)'} is not screened "
                                    f"(screened: {', '.join(sorted(self.modalities))})", view)
        part = _text(ds, "BodyPartExamined")
        if part and part not in self.body_parts:
            return Selection(False, f"body part {part} is not a chest", view)
        if not part and not self.body_part_missing_screens:
            return Selection(False, "no body part recorded (BodyPartExamined) and the rules require one", view)
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        except (TypeError, ValueError):
            return Selection(False, "frame count or image size in the header is not a number", view)
        if frames > self.max_frames:
            return Selection(False, f"multi-frame object ({frames} frames): only single radiographs are screened", view)
        pi = _text(ds, "PhotometricInterpretation")
        if pi not in self.photometric:
            return Selection(False, f"photometric interpretation {pi or '(none)'} is not a grayscale radiograph", view)
        if min(rows, cols) < self.min_side:
            return Selection(False, f"image is {cols}x{rows}, smaller than {self.min_side} px a side (an icon "
                                    "or thumbnail?)", view)
        if view is None:
            if not self.view_missing_screens:
                return Selection(False, "view position not recorded (ViewPosition, View Code Sequence); set "
                                        "[view] when_missing = \"screen\" if this room sends only frontal views", None)
            return Selection(True, None, None)
        if view in self.skip_views or view not in self.frontal_views:
            return Selection(False, f"view {view} is not frontal (screened: {', '.join(sorted(self.frontal_views))})",
                             view)
        return Selection(True, None, view)


def _text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a damaged element: treated as absent, the rules then decide
        return ""
    return str(value or "").strip().upper()


def view_of(ds) -> str | None:
    """The view: ViewPosition, else the first View Code Sequence item (by code, then by its meaning)."""
    view = _text(ds, "ViewPosition")
    if view:
        return view
    try:
        seq = ds.get("ViewCodeSequence") or []
        item = seq[0] if len(seq) else None
    except Exception:
        return None
    if item is None:
        return None
    meaning = str(item.get("CodeMeaning", "") or "").strip().upper()
    if "LATERAL" in meaning or "OBLIQUE" in meaning:
        return meaning  # never frontal, whatever the code says
    if meaning in ("POSTERO-ANTERIOR", "ANTERO-POSTERIOR", "POSTEROANTERIOR", "ANTEROPOSTERIOR"):
        return meaning
    code = str(item.get("CodeValue", "") or "").strip()
    return VIEW_CODES.get(code) or meaning or None
