"""Calibration refuses what it cannot support: too few site images for the interval it must reach, site images the
model was trained on (warned, by content), and an earlier report or manifest version overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cxr_edge.cli import main
from cxr_edge.data import scan_dataset
from cxr_edge.data.overlap import training_overlap
from cxr_edge.errors import ConfigError, DatasetError, ExitCode
from cxr_edge.manifest_schema import DataProvenance
from cxr_edge.workflows.calibrate import check_counts, minimum_counts


def test_the_minimum_follows_from_the_interval_width():
    assert minimum_counts(0.95, 0.20) == (33, 104)
    wide, narrow = minimum_counts(0.95, 0.30), minimum_counts(0.95, 0.10)
    assert wide[0] < 33 < narrow[0] and wide[1] < 104 < narrow[1]
    check_counts({"COVID": 33, "Normal": 60, "Viral Pneumonia": 44}, 0.95, 0.20)
    for n in range(33, 200):  # every larger set is accepted too (the width is not monotonic in n by itself)
        check_counts({"COVID": n, "Normal": 104}, 0.95, 0.20)
    with pytest.raises(DatasetError, match=r"1 COVID and 40 other images cannot support a threshold.*--ci-width 0.3"):
        check_counts({"COVID": 1, "Normal": 40}, 0.95, 0.20)


def test_one_covid_image_is_refused_before_anything_is_screened(tiny_export, tmp_path, capsys):
    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    site = tmp_path / "site"
    for label, n in (("COVID", 1), ("Normal", 200)):
        (site / label).mkdir(parents=True)
        for f in sorted((Path(tiny_export.data) / label).iterdir())[:n]:
            shutil.copy(f, site / label / f.name)
    assert main(["calibrate", str(art), str(site)]) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert "1 COVID and 20 other images cannot support a threshold" in err and err.count("\n") == 1
    assert not list(Path(art).parent.glob(f"calibration-{Path(art).name}-v*"))  # nothing written


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        label = next(p for p in src.iterdir() if (p / name).exists()).name
        (dst / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / label / name, dst / label / f"renamed-{name}")


def test_site_images_from_the_training_data_are_found_by_content(tiny_export, tmp_path):
    data = Path(tiny_export.data)
    train = scan_dataset(data, classes=["COVID", "Normal"])
    prov = DataProvenance(root=str(data), fingerprint=train.fingerprint(), split_fractions=(0.7, 0.15, 0.15), split_seed=0)
    site = tmp_path / "site"
    names = [i.path.name for i in train.items if i.label == "COVID"][:3] + \
        [i.path.name for i in train.items if i.label == "Normal"][:3]
    _copy(data, site, names)
    ov = training_overlap(scan_dataset(site, classes=["COVID", "Normal"]), prov, ["COVID", "Normal"])
    assert ov.checked == "content" and sum(ov.counts.values()) == 6 and set(ov.counts) == {"train", "val", "test"}
    assert (ov.seen > 0) == bool(ov.warning()) and (not ov.warning() or "training data" in ov.warning())
    same = training_overlap(train, prov, ["COVID", "Normal"])
    assert same.checked == "fingerprint" and same.seen == len(train.items) and "memorised" in same.warning()
    gone = training_overlap(scan_dataset(site, classes=["COVID", "Normal"]),
                            DataProvenance(root=str(tmp_path / "elsewhere"), fingerprint="0" * 64), ["COVID", "Normal"])
    assert gone.checked == "not possible" and gone.seen == 0 and "not on this machine" in gone.note


def test_an_earlier_report_is_not_overwritten(tiny_export, tmp_path):
    from cxr_edge.workflows.calibrate import calibrate_artifact

    src = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) or f.suffix == ".npz":
            shutil.copy(f, tmp_path / f.name)
    art = tmp_path / src.name
    opts = {"target_sensitivity": 0.9, "progress": False, "ci_width": 0.5}
    first = calibrate_artifact(art, tiny_export.data, out_dir=tmp_path / "rep", **opts)
    with pytest.raises(ConfigError, match="already holds a calibration report"):
        calibrate_artifact(art, tiny_export.data, out_dir=tmp_path / "rep", **opts)
    dry = calibrate_artifact(art, tiny_export.data, dry_run=True, **opts)  # its own dated folder, manifest untouched
    assert "dry-run" in dry["report"] and first["report"] != dry["report"]
    # a kept manifest version that differs from the current one (restored by hand) is never overwritten
    kept = tmp_path / f"{src.name}.manifest.v2.json"
    kept.write_text("{}")
    with pytest.raises(ConfigError, match="already exists and differs"):
        calibrate_artifact(art, tiny_export.data, out_dir=tmp_path / "rep3", **opts)
    assert kept.read_text() == "{}"
