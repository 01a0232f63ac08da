"""Deterministic, stratified, patient-grouped train/val/test splits.

Determinism comes from sorting group keys before a seeded shuffle, so the split depends only on
the files and the seed, never on directory listing order. Grouping by patient keeps all images of
one patient in one split (a patient in both train and test inflates every metric).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

from ..errors import ConfigError, DatasetError
from ..manifest_schema import ArtifactManifest, DataProvenance
from .layout import Dataset, DatasetItem

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def _allocate(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Counts per split summing to n; val and test get at least one group when n >= 3."""
    counts = [int(round(n * f)) for f in fractions]
    if n >= 3:
        for k in (1, 2):
            if fractions[k] > 0 and counts[k] == 0:
                counts[k] = 1
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 0:
        raise DatasetError(f"Cannot split {n} groups with fractions {fractions}.")
    return counts


def _split_groups(items: list[DatasetItem], fractions, seed: int) -> dict[str, list[DatasetItem]]:
    by_group: dict[str, list[DatasetItem]] = defaultdict(list)
    for it in items:
        by_group[it.group].append(it)
    # A group is stratified under its most common label (ties broken by name, for determinism).
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, members in by_group.items():
        label = sorted(Counter(m.label for m in members).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_label[label].append(g)
    rng = np.random.default_rng(seed)
    out: dict[str, list[DatasetItem]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        groups = sorted(by_label[label])
        order = rng.permutation(len(groups))
        counts = _allocate(len(groups), fractions)
        bounds = np.cumsum([0] + counts)
        for k, split in enumerate(SPLITS):
            for idx in order[bounds[k] : bounds[k + 1]]:
                out[split].extend(by_group[groups[idx]])
    for split in SPLITS:
        out[split].sort(key=lambda i: i.relpath)
    return out


def split_dataset(
    ds: Dataset, fractions: tuple[float, ...] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[DatasetItem]]:
    """train/val/test item lists.

    Pre-split data keeps its folders; when it has no validation folder, validation is carved out
    of train (grouped and stratified) in the proportion ``val / (train + val)``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"Split fractions must be three non-negative numbers summing to 1, got {fractions}.")
    if not ds.presplit:
        return _split_groups(ds.items, fractions, seed)
    out = {s: [i for i in ds.items if i.presplit == s] for s in SPLITS}
    _warn_patient_overlap(out)
    if not out["val"] and out["train"]:
        tv = fractions[0] + fractions[1]
        val_frac = fractions[1] / tv if tv else 0.0
        carved = _split_groups(out["train"], (1 - val_frac, val_frac, 0.0), seed)
        out["train"], out["val"] = carved["train"], carved["val"]
    return out


def _warn_patient_overlap(splits: dict[str, list[DatasetItem]]) -> None:
    """Pre-split folders are the user's call, but a patient on both sides is worth a loud warning."""
    seen: dict[str, str] = {}
    shared = set()
    for split, items in splits.items():
        for it in items:
            if it.patient and seen.setdefault(it.patient, split) != split:
                shared.add(it.patient)
    if shared:
        log.warning("%d patients appear in more than one pre-split folder (e.g. %s): metrics will be optimistic",
                    len(shared), sorted(shared)[:3])


def split_counts(splits: dict[str, list[DatasetItem]], classes) -> dict[str, dict[str, int]]:
    return {s: {c: sum(1 for i in items if i.label == c) for c in classes} for s, items in splits.items()}


def is_training_data(ds: Dataset, trained_on: DataProvenance) -> bool:
    """True when ``ds`` is the data a model was trained on (the fingerprint its manifest recorded)."""
    return trained_on.fingerprint is not None and trained_on.fingerprint == ds.fingerprint()


def training_split(ds: Dataset, trained_on: DataProvenance) -> dict[str, list[DatasetItem]]:
    """The train/val/test split a model was trained with, reproduced on ``ds`` (its training data)."""
    if trained_on.split_fractions is None or trained_on.split_seed is None:
        raise DatasetError("The model's manifest names this as its training data but not how it was split "
                           "(data.split_fractions, data.split_seed); re-train it with this cxr-edge.")
    return split_dataset(ds, trained_on.split_fractions, seed=trained_on.split_seed)


def select_split(doc: ArtifactManifest, ds: Dataset, split: str) -> tuple[list[DatasetItem], str]:
    """``auto``: the model's own test split when this is the data it trained on, else every image."""
    same = is_training_data(ds, doc.data)
    if split == "auto":
        split = "test" if same else "all"
    if split == "all":
        if same:
            log.warning("evaluating on all images, including the ones this model was trained on")
        return ds.items, split
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be auto, train, val, test or all, got {split!r}.")
    if not same:
        raise DatasetError(
            f"This is not the data the model was trained on (fingerprint differs), so its {split!r} split "
            "is unknown. Use --split all to evaluate on every image, or point at the training data."
        )
    return training_split(ds, doc.data)[split], split
