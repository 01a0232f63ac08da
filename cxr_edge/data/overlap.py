"""Which of a site's images the model has already seen: calibrating a threshold on training images measures the
model's memory, not the site, and the report must say so.

Images are compared by content (sha256 of the file's bytes), so a copy under another name or folder is still found.
The training folder named in the manifest is used when it is still there; its split is reproduced when its
fingerprint still matches, so the report can say train / val / test. Without it, only "the same folder" or "the same
data fingerprint" can be recognised, and the report says the check was partial.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest_schema import DataProvenance
from .layout import Dataset, DatasetItem, scan_dataset
from .split import is_training_data, training_split


@dataclass(frozen=True)
class Overlap:
    """How many of the site's images were in the model's training data, per split (or ``all`` when unknown)."""

    checked: str  # "content" (files compared), "fingerprint" (whole-data fingerprint only) or "not possible"
    counts: dict[str, int] = field(default_factory=dict)  # split -> site images found there
    n_site: int = 0
    note: str = ""

    @property
    def seen(self) -> int:
        """Site images the model was fitted or tuned on (train and val; the test split was only evaluated on)."""
        return sum(v for k, v in self.counts.items() if k in ("train", "val", "all"))

    def to_dict(self) -> dict:
        return {"checked": self.checked, "counts": dict(self.counts), "n_site": self.n_site, "seen": self.seen,
                "note": self.note}

    def warning(self) -> str | None:
        if not self.seen:
            return None
        where = ", ".join(f"{v} in {k}" for k, v in self.counts.items() if v)
        return (f"{self.seen} of the {self.n_site} site images were in this model's training data ({where}): a "
                "threshold chosen on them measures what the model memorised, not how it does on this site's patients. "
                "Calibrate on images the model never saw.")


def _digest(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _digests(items: Iterable[DatasetItem]) -> set[str]:
    return {d for d in (_digest(i.path) for i in items) if d}


def training_overlap(site: Dataset, trained_on: DataProvenance | None, classes: list[str]) -> Overlap:
    """Compare ``site`` with the data the manifest says the model was trained on."""
    n = len(site.items)
    if trained_on is None or not (trained_on.root or trained_on.fingerprint):
        return Overlap("not possible", {}, n, "the manifest does not record its training data")
    if is_training_data(site, trained_on):
        return Overlap("fingerprint", {"all": n}, n, "these are the images the model was trained on (same fingerprint)")
    root = Path(trained_on.root) if trained_on.root else None
    if root is None or not root.is_dir():
        return Overlap("not possible", {}, n, f"the training folder {trained_on.root} is not on this machine, so "
                                              "only its fingerprint was compared (it differs)")
    train = scan_dataset(root, classes=classes)
    site_digests = {_digest(i.path): i for i in site.items}
    site_digests.pop(None, None)
    if is_training_data(train, trained_on):
        splits = training_split(train, trained_on)
        counts = {s: len(_digests(items) & site_digests.keys()) for s, items in splits.items()}
        return Overlap("content", counts, n, f"compared by content with the training folder {root} and its split")
    found = len(_digests(train.items) & site_digests.keys())
    return Overlap("content", {"all": found}, n, f"compared by content with {root}, which changed since training, so "
                                                 "the split is unknown")
