"""Dataset discovery (layouts, aliases, ignored folders), provenance, splits, and bulk loading."""

import csv
import random

import numpy as np
import pytest
from conftest import cxr_like, write_png

from cxr_edge.classes import canonical_class, ordered
from cxr_edge.data import scan_dataset, split_dataset
from cxr_edge.data.loading import load_images
from cxr_edge.data.split import split_counts
from cxr_edge.errors import ConfigError, DatasetError
from cxr_edge.preprocess import PreprocessSpec


def _tree(root, layout: dict[str, int]):
    """layout: relative folder -> number of images to write there."""
    img = cxr_like(40, 40)
    for folder, n in layout.items():
        for i in range(n):
            write_png(root / folder / f"img_{i:03d}.png", img)
    return root


@pytest.mark.parametrize(
    "name, canon",
    [("COVID", "COVID"), ("COVID-19", "COVID"), ("cov19", "COVID"), ("covid_19", "COVID"),
     ("NORMAL", "Normal"), ("Viral Pneumonia", "Viral Pneumonia"), ("viral_pneumonia", "Viral Pneumonia"),
     ("Lung_Opacity", "Lung Opacity"), ("PNEUMONIA", None), ("masks", None)],
)
def test_aliases(name, canon):
    assert canonical_class(name) == canon


def test_ordered_classes_fixed_order_and_unknown():
    assert ordered(["NORMAL", "covid-19"]) == ("COVID", "Normal")
    with pytest.raises(ConfigError, match="Unknown class 'cats'"):
        ordered(["cats"])


def test_radiography_database_layout_with_images_and_masks(tmp_path):
    _tree(tmp_path, {"COVID/images": 3, "COVID/masks": 3, "Normal/images": 2, "Normal/masks": 2,
                     "Viral Pneumonia/images": 2, "Lung_Opacity/images": 1})
    (tmp_path / "COVID.metadata.xlsx").write_bytes(b"x")
    ds = scan_dataset(tmp_path, classes=["COVID", "Normal"])
    assert ds.classes == ("COVID", "Normal") and ds.class_counts() == {"COVID": 3, "Normal": 2}
    assert all("masks" not in i.relpath for i in ds.items)
    ignored = dict(ds.ignored)
    assert "not used by this recipe" in ignored["Viral Pneumonia"]
    assert "not used by this recipe" in ignored["Lung_Opacity"]
    assert "COVID/masks" in ignored


def test_flat_layout_with_aliases_and_unknown_folders(tmp_path):
    _tree(tmp_path, {"COVID-19": 2, "COV19": 1, "NORMAL": 2, "cats": 2, "NORMAL/sub": 1})
    (tmp_path / "NORMAL" / "notes.txt").write_text("hi")
    ds = scan_dataset(tmp_path)
    assert ds.class_counts() == {"COVID": 3, "Normal": 3}
    assert any("aliases of 'COVID'" in n for n in ds.notes)
    ignored = dict(ds.ignored)
    assert "not a known class" in ignored["cats"]
    assert "not an image file" in ignored["NORMAL/notes.txt"]


def test_presplit_train_test_layout_carves_val_from_train(tmp_path):
    _tree(tmp_path, {"train/COVID": 20, "train/Normal": 20, "test/COVID": 5, "test/Normal": 5, "extra/COVID": 3})
    ds = scan_dataset(tmp_path, classes=["COVID", "Normal"])
    assert ds.presplit
    splits = split_dataset(ds, (0.7, 0.15, 0.15))
    counts = split_counts(splits, ds.classes)
    assert counts["test"] == {"COVID": 5, "Normal": 5}
    assert counts["val"]["COVID"] > 0 and counts["train"]["COVID"] + counts["val"]["COVID"] == 20
    assert {i.relpath.split("/")[0] for i in splits["val"]} == {"train"}
    assert "extra" in dict(ds.ignored)


def test_empty_or_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="No images of classes"):
        scan_dataset(tmp_path)
    _tree(tmp_path, {"COVID": 2})
    with pytest.raises(DatasetError, match=r"No images for class\(es\) \['Normal'\]"):
        scan_dataset(tmp_path, classes=["COVID", "Normal"])


def test_split_is_deterministic_and_independent_of_listing_order(synth_dir):
    ds = scan_dataset(synth_dir)
    a = split_dataset(ds, seed=3)
    shuffled = list(ds.items)
    random.Random(7).shuffle(shuffled)
    ds.items = shuffled
    b = split_dataset(ds, seed=3)
    assert all([i.relpath for i in a[s]] == [i.relpath for i in b[s]] for s in a)
    c = split_dataset(ds, seed=4)
    assert [i.relpath for i in a["test"]] != [i.relpath for i in c["test"]]


def test_split_is_stratified_and_patient_grouped(synth_dir):
    ds = scan_dataset(synth_dir)
    assert all(i.patient for i in ds.items)  # SOURCES.csv gives synthetic patient ids
    splits = split_dataset(ds, (0.6, 0.2, 0.2), seed=0)
    patients = {s: {i.patient for i in items} for s, items in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    counts = split_counts(splits, ds.classes)
    for c in ds.classes:
        assert counts["test"][c] >= 6 and counts["val"][c] >= 6
    assert sum(len(v) for v in splits.values()) == len(ds.items)


def test_metadata_csv_patient_column(tmp_path):
    _tree(tmp_path, {"COVID": 6, "Normal": 6})
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "Patient ID", "source"])
        for c in ("COVID", "Normal"):
            for i in range(6):
                w.writerow([f"img_{i:03d}.png" if c == "COVID" else f"{c}/img_{i:03d}.png", f"{c}{i // 3}", "siteA"])
    ds = scan_dataset(tmp_path, metadata_csv=tmp_path / "meta.csv")
    assert {i.patient for i in ds.items if i.label == "Normal"} == {"siteA:Normal0", "siteA:Normal1"}
    splits = split_dataset(ds, (0.5, 0.0, 0.5))
    for c in ("COVID", "Normal"):
        tr = {i.patient for i in splits["train"] if i.label == c}
        te = {i.patient for i in splits["test"] if i.label == c}
        assert not tr & te


def test_bad_split_fractions(synth_dir):
    with pytest.raises(DatasetError, match="summing to 1"):
        split_dataset(scan_dataset(synth_dir), (0.5, 0.5, 0.5))


def test_load_images_skips_and_reports_bad_files(tmp_path):
    good = write_png(tmp_path / "good.png", cxr_like(50, 70))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    res = load_images([good, tmp_path / "bad.png", tmp_path / "empty.jpg", good], PreprocessSpec(32, 32, "raw"))
    assert res.x.shape == (2, 32, 32, 1) and res.kept == [0, 3]
    assert res.original_sizes == [(50, 70), (50, 70)]
    assert sorted(e.source.split("/")[-1] for e in res.errors) == ["bad.png", "empty.jpg"]


def test_common_size_removes_original_resolution():
    small, big = cxr_like(64, 64), np.kron(cxr_like(64, 64), np.ones((8, 8), np.uint8))
    spec = PreprocessSpec(32, 32, "raw")
    res = load_images([small, big], spec, common_size=64)
    assert np.abs(res.x[0].astype(int) - res.x[1].astype(int)).max() <= 1


def test_real_data_scan_and_provenance(real_data):
    ds = scan_dataset(real_data)
    assert ds.class_counts() == {"COVID": 325, "Normal": 320, "Viral Pneumonia": 320}
    assert all(i.source for i in ds.items)
    with_patient = [i for i in ds.items if i.patient]
    assert len(with_patient) >= 90  # the ieee8023 rows carry patient ids
    splits = split_dataset(ds)
    seen = {}
    for s, items in splits.items():
        for i in items:
            if i.patient:
                assert seen.setdefault(i.patient, s) == s, f"patient {i.patient} in {seen[i.patient]} and {s}"


def test_presplit_patient_overlap_is_warned(tmp_path, caplog):
    _tree(tmp_path, {"train/COVID": 2, "train/Normal": 2, "test/COVID": 2, "test/Normal": 2})
    with open(tmp_path / "SOURCES.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relpath", "patient_id"])
        w.writerow(["train/COVID/img_000.png", "p1"])
        w.writerow(["test/COVID/img_001.png", "p1"])
    with caplog.at_level("WARNING"):
        split_dataset(scan_dataset(tmp_path))
    assert "1 patients appear in more than one pre-split folder" in caplog.text
