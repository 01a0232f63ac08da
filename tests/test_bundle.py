"""Artifact bundles: one folder (or archive) with everything a runtime needs, accepted by every command and
checked whole on load, with one line naming the missing or changed piece."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from cxr_edge import bundle
from cxr_edge.cli import main
from cxr_edge.errors import ConfigError, ExitCode, ManifestError


@pytest.fixture()
def art(tiny_export, tmp_path) -> Path:
    """A copy of the tiny INT8 artifact (with its manifest and Grad-CAM head) in a folder of its own."""
    src = Path(next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu"))
    out = tmp_path / "export"
    out.mkdir()
    for f in (src, src.with_name(src.name + ".manifest.json"), src.with_name("model.head.npz")):
        shutil.copy2(f, out / f.name)
    return out / src.name


@pytest.fixture()
def image(tiny_export) -> str:
    return str(sorted((Path(tiny_export.data) / "COVID").iterdir())[0])


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def test_a_bundle_holds_every_piece_with_its_role(art):
    folder = bundle.make_bundle(art)
    assert folder == art.parent / "bundles" / "model.int8-cpu.onnx"
    doc = json.loads((folder / bundle.INDEX).read_text())
    roles = {f["name"]: f["role"] for f in doc["files"]}
    assert roles == {art.name: "model", f"{art.name}.manifest.json": "manifest", "model.head.npz": "gradcam-head"}
    assert bundle.check_bundle(folder) == folder / art.name
    with pytest.raises(ConfigError, match="already holds a bundle"):
        bundle.make_bundle(art)  # no silent replacement
    assert bundle.make_bundle(art, replace=True) == folder


@pytest.mark.parametrize("form", ["folder", "model file", "archive"])
def test_every_form_of_a_bundle_is_accepted_by_predict(art, image, form, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    folder = bundle.make_bundle(art)
    path = {"folder": folder, "model file": folder / art.name,
            "archive": bundle.write_archive(folder, tmp_path / "m.cxrbundle.tar")}[form]
    assert main(["predict", str(path), image, "--json"]) == ExitCode.OK
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(out) == 1 and out[0]["label"]


def test_a_missing_piece_is_named_in_one_line(art, image, capsys):
    folder = bundle.make_bundle(art)
    (folder / "model.head.npz").unlink()
    assert main(["predict", str(folder), image]) == ExitCode.INTEGRITY
    line = _error_line(capsys)
    assert "model.head.npz (the Grad-CAM head) missing" in line and "Copy the whole bundle folder" in line
    assert main(["serve", str(folder / art.name), "--port", "0"]) == ExitCode.INTEGRITY  # before anything starts
    assert "incomplete" in _error_line(capsys)


def test_a_changed_piece_is_refused(art, image, capsys):
    folder = bundle.make_bundle(art)
    m = folder / f"{art.name}.manifest.json"
    m.write_text(m.read_text().replace('"classes"', '"classes" ', 1))
    assert main(["predict", str(folder), image]) == ExitCode.INTEGRITY
    assert f"{m.name} (its manifest) no longer match" in _error_line(capsys)


def test_another_model_in_a_bundle_folder_is_not_its_model(art, tiny_export):
    folder = bundle.make_bundle(art)
    other = Path(next(a.path for a in tiny_export.artifacts if a.variant == "fp32"))
    shutil.copy2(other, folder / other.name)
    with pytest.raises(ConfigError, match="is not the model of the bundle"):
        bundle.resolve(folder / other.name)


def _archive_with(tmp_path: Path, name: str, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute"])
def test_a_hostile_archive_writes_nothing_outside_the_cache(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    if kind == "symlink":
        m = tarfile.TarInfo("model.onnx")
        m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
        data = b""
    else:
        m = tarfile.TarInfo("../escape.txt" if kind == "dotdot" else "/tmp/escape.txt")
        data = b"x"
        m.size = 1
    path = _archive_with(tmp_path, "evil.cxrbundle.tar", m, data)
    with pytest.raises(ManifestError, match="Refused"):
        bundle.resolve(path)
    assert not (tmp_path / "escape.txt").exists()


def test_a_damaged_archive_says_copy_it_again(art, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    good = bundle.write_archive(bundle.make_bundle(art), tmp_path / "m.cxrbundle.tar")
    cut = tmp_path / "cut.cxrbundle.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ManifestError, match="copy it again|incomplete"):
        bundle.resolve(cut)


def test_signing_and_calibrating_inside_a_bundle_keep_it_whole(art, tiny_export, tmp_path, capsys):
    pytest.importorskip("cryptography")
    from cxr_edge.signing import generate_keypair

    folder = bundle.make_bundle(art)
    model = folder / art.name
    key, pub = generate_keypair(tmp_path / "op")
    assert main(["sign", str(folder), "--key", str(key)]) == ExitCode.OK
    assert bundle.check_bundle(folder) == model
    assert any(f["role"] == "signature" for f in json.loads((folder / bundle.INDEX).read_text())["files"])
    assert main(["calibrate", str(folder), str(tiny_export.data), "--target-sensitivity", "0.9", "--ci-width", "0.5",
                 "--self-check", "refuse"]) == ExitCode.OK
    roles = [f["role"] for f in json.loads((folder / bundle.INDEX).read_text())["files"]]
    assert "manifest-history" in roles and "calibration" in roles and "signature" in roles
    assert bundle.check_bundle(folder) == model
    assert list((folder / "calibration").glob("calibration-*-v2/calibration.md"))
    # the kept signature no longer matches the new manifest: a signed kiosk refuses it until it is re-signed
    assert main(["predict", str(folder), str(next((Path(tiny_export.data) / "COVID").iterdir())),
                 "--trusted-key", str(pub)]) == ExitCode.INTEGRITY
    capsys.readouterr()
    # a re-export replaces the bundle, and the calibrated one is kept under a dated name, not deleted
    assert bundle.make_bundle(art, replace=True) == folder
    assert list(folder.parent.glob(f"{folder.name}.previous-*"))


def test_bundle_command_makes_checks_and_archives(art, tmp_path, capsys):
    assert main(["bundle", str(art)]) == ExitCode.OK
    folder = art.parent / "bundles" / "model.int8-cpu.onnx"
    assert main(["bundle", str(folder), "--check"]) == ExitCode.OK
    assert "complete and unchanged" in capsys.readouterr().out
    assert main(["bundle", str(folder), "--archive", str(tmp_path / "x.tar")]) == ExitCode.CONFIG
    assert ".cxrbundle.tar" in _error_line(capsys)
    assert main(["bundle", str(folder), "--archive", str(tmp_path / "x.cxrbundle.tar")]) == ExitCode.OK
    (folder / "model.head.npz").unlink()
    assert main(["bundle", str(folder), "--check"]) == ExitCode.INTEGRITY
    assert "missing" in _error_line(capsys)


def test_the_python_api_takes_a_bundle_too(art, image):
    from cxr_edge.runtime import Screener

    folder = bundle.make_bundle(art)
    with Screener(folder, isolation=None) as s:
        assert s.predict([image])[0].ok
    (folder / "model.head.npz").unlink()
    with pytest.raises(ManifestError, match="incomplete"):
        Screener(folder, isolation=None)


def test_an_onnx_artifact_and_the_engine_built_from_it_get_two_bundles(art):
    engine = art.with_name("model.int8-cpu.plan")  # same stem, another format: the fp16 ONNX and its .plan
    shutil.copy2(art, engine)
    shutil.copy2(art.with_name(art.name + ".manifest.json"), engine.with_name(engine.name + ".manifest.json"))
    assert bundle.make_bundle(art) != bundle.make_bundle(engine)


def test_archive_size_and_sparse_members_are_refused_from_the_headers(art, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    good = bundle.write_archive(bundle.make_bundle(art), tmp_path / "m.cxrbundle.tar")
    monkeypatch.setenv("CXR_EDGE_MAX_BUNDLE_BYTES", "1000")
    with pytest.raises(ManifestError, match="declares more than 1,000 bytes"):
        bundle.resolve(good)
    assert not (tmp_path / "cache" / "bundles").exists() or not any((tmp_path / "cache" / "bundles").iterdir())
    monkeypatch.delenv("CXR_EDGE_MAX_BUNDLE_BYTES")
    gz = tmp_path / "gz.cxrbundle.tar"
    with tarfile.open(gz, "w:gz") as tar:  # a compressed archive could expand without bound: only plain tar is read
        tar.add(art, arcname=art.name)
    with pytest.raises(ManifestError, match="compressed"):
        bundle.resolve(gz)


def test_a_changed_cache_copy_is_unpacked_again_and_two_unpacks_agree(art, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    archive = bundle.write_archive(bundle.make_bundle(art), tmp_path / "m.cxrbundle.tar")
    model = bundle.resolve(archive)
    (model.parent / "model.head.npz").write_bytes(b"changed in the cache")
    assert bundle.resolve(archive) == model and bundle.check_bundle(model.parent) == model  # healed from the archive
    from concurrent.futures import ThreadPoolExecutor

    shutil.rmtree(model.parent)
    with ThreadPoolExecutor(4) as pool:
        assert len(set(pool.map(lambda _: bundle.resolve(archive), range(4)))) == 1


def test_calibrate_and_sign_never_write_into_an_archive_or_its_cache(art, tiny_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    archive = bundle.write_archive(bundle.make_bundle(art), tmp_path / "m.cxrbundle.tar")
    assert main(["calibrate", str(archive), str(tiny_export.data)]) == ExitCode.CONFIG
    assert "read-only" in _error_line(capsys)
    unpacked = bundle.resolve(archive).parent
    assert main(["calibrate", str(unpacked), str(tiny_export.data)]) == ExitCode.CONFIG
    assert "read-only" in _error_line(capsys)
