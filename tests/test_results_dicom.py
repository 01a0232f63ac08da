"""Results back into the PACS: the DICOM objects (TID 1500 SR, heatmap SC, map SEG), the durable outbox, and delivery
to a real Orthanc by C-STORE and STOW-RS.

Every object the suite makes is checked by dicom3tools' dciodvfy: errors fail the test, warnings are printed (and
listed in docs/dicom-conformance.md). Source instances are made from the shared images under tmp_path, never committed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REAL_DATA
from orthanc_server import orthanc  # noqa: F401  (a fixture)
from pg_server import postgres_url  # noqa: F401  (the session fixture, reached through request.getfixturevalue)
from test_node import STORESCU_CFG

from cxr_edge.errors import ConfigError
from cxr_edge.node import result_objects as ro
from cxr_edge.node.delivery import Destination, backoff_s
from cxr_edge.node.outbox import DEAD, DELIVERED, PENDING, Outbox
from cxr_edge.node.store import JobStore

DCIODVFY = shutil.which("dciodvfy")

MODEL = {"artifact": "model.int8-cpu.onnx", "recipe": "small_cnn", "version": "v3", "sha256": "ab" * 32,
         "precision": "int8", "backend": "onnxruntime", "provider": "CPUExecutionProvider", "threshold": 0.47,
         "operating_point": "sensitivity 0.95 on cxr-dev val"}


def _result(label="COVID", p=0.81, borderline=False) -> dict:
    probs = {"COVID": p, "Normal": round((1 - p) * 0.6, 4), "Viral Pneumonia": round((1 - p) * 0.4, 4)}
    return {"label": label, "probabilities": probs, "threshold": 0.47,
            "decision": {"borderline": borderline, "text": f"{label}: p(COVID) {p:.2f} vs threshold 0.47"}}


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's findings: errors fail the caller's assertion, warnings are printed for the test log."""
    if not DCIODVFY:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian: dicom3tools) is not installed; .ci/run installs it")
        pytest.skip("dciodvfy (Debian: dicom3tools) is not installed")
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    for w in sorted({ln for ln in lines if ln.startswith("Warning")}):
        print(f"dciodvfy {path.name}: {w}")
    return [ln for ln in lines if ln.startswith("Error")]


@pytest.fixture(scope="module")
def source_dx(tmp_path_factory) -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip("the shared cxr-dev images are not beside the repository")
    from dicom_studies import make_instance, source_images

    out = tmp_path_factory.mktemp("src") / "pa.dcm"
    make_instance(source_images(REAL_DATA)[0], out, "pa", max_side=384)
    return out


def _read_back_sr(path: Path) -> dict:
    """What a receiving system reads from the report, through highdicom's TID 1500 accessors."""
    import highdicom as hd

    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    g = groups[0]
    texts: dict[str, list[str]] = {}

    def walk(items):  # TID 4019 algorithm identification items are TEXT content items of the group
        for it in items:
            if it.get("ValueType") == "TEXT":
                texts.setdefault(it.ConceptNameCodeSequence[0].CodeMeaning, []).append(it.TextValue)
            walk(it.get("ContentSequence", []))

    walk(g)
    return {"measurements": {m.name.meaning: m.value for m in g.get_measurements()},
            "evaluations": {q.name.meaning: q.value.meaning for q in g.get_qualitative_evaluations()},
            "algorithm": (texts["Algorithm Name"][0], texts["Algorithm Version"][0]),
            "parameters": texts.get("Algorithm Parameters", []),
            "source": [s.referenced_sop_instance_uid for s in g.source_images]}


def test_report_heatmap_and_map_validate_and_read_back_with_the_results_values(source_dx, tmp_path):
    src = ro.read_source(source_dx.read_bytes())
    preview = pydicom.dcmread(source_dx).pixel_array
    cam = np.outer(np.hanning(7), np.hanning(7)).astype(np.float32)
    when = dt.datetime(2026, 12, 4, 9, 30, 0)
    objs = ro.build(src, _result(), MODEL, preview=preview, cam=cam, station="CXREDGE", when=when)
    assert [o.kind for o in objs] == ["sr", "sc", "seg"]
    paths = {o.kind: o.write(tmp_path, "job-1") for o in objs}
    for kind, p in paths.items():
        assert dciodvfy(p) == [], f"{kind}: dciodvfy errors"

    # the same source and model give the same UIDs (a resend is the same object); another model gives new ones
    again = ro.build(src, _result(), MODEL, preview=preview, cam=cam, when=when + dt.timedelta(hours=1))
    assert [o.sop_instance_uid for o in again] == [o.sop_instance_uid for o in objs]
    other = ro.build(src, _result(), {**MODEL, "sha256": "cd" * 32}, preview=preview, cam=cam)
    assert not {o.sop_instance_uid for o in other} & {o.sop_instance_uid for o in objs}

    sr = pydicom.dcmread(paths["sr"])
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.Modality == "SR"
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert "not for diagnostic use" in sr.SeriesDescription
    # Contributing Equipment (IHE AIR): the acquisition equipment of the source, the algorithm, and highdicom
    eq = {e.Manufacturer: e for e in sr.ContributingEquipmentSequence}
    assert eq["cxr-edge"].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert MODEL["sha256"][:40] in eq["cxr-edge"].DeviceSerialNumber and "model v3" in eq["cxr-edge"].SoftwareVersions
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == src.SOPInstanceUID
    read = _read_back_sr(paths["sr"])
    assert read["measurements"]["Probability of COVID-19"] == pytest.approx(0.81)
    assert read["measurements"]["Threshold Value"] == pytest.approx(0.47)
    assert read["measurements"]["Probability of normal"] == pytest.approx(_result()["probabilities"]["Normal"])
    assert read["evaluations"]["COVID-19"] == "Suspected" and read["evaluations"]["Decided class"] == "COVID-19"
    assert read["evaluations"]["Intended use"].startswith("Screening aid, not for diagnostic use")
    assert read["evaluations"]["Decision within the borderline band of the threshold"] == "No"
    assert read["algorithm"] == ("cxr-edge small_cnn", "v3")
    assert f"model_sha256={MODEL['sha256']}" in read["parameters"] and "precision=int8" in read["parameters"]
    assert read["source"] == [src.SOPInstanceUID]

    sc = pydicom.dcmread(paths["sc"])
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.pixel_array.shape[2] == 3

    seg = pydicom.dcmread(paths["seg"])
    assert seg.SegmentationType == "FRACTIONAL" and (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    frame = seg.pixel_array.astype(np.float32) / seg.MaximumFractionalValue
    peak = np.unravel_index(np.argmax(frame), frame.shape)
    assert abs(peak[0] - src.Rows / 2) < src.Rows * 0.1 and abs(peak[1] - src.Columns / 2) < src.Columns * 0.1

    # not suspected, borderline: the coded values follow the result; no map, no heatmap objects
    quiet = ro.build(src, _result("Normal", 0.40, borderline=True), MODEL)
    assert [o.kind for o in quiet] == ["sr"]
    p = quiet[0].write(tmp_path, "job-2")
    assert dciodvfy(p) == []
    read = _read_back_sr(p)
    assert read["evaluations"]["COVID-19"] == "Not suspected" and read["evaluations"]["Decided class"] == "Normal"
    assert read["evaluations"]["Decision within the borderline band of the threshold"] == "Yes"


def test_a_source_in_utf8_keeps_its_character_set_and_names_in_every_object(source_dx, tmp_path):
    """Patient names outside ASCII: the objects declare the source's character set and carry the name unchanged."""
    ds = pydicom.dcmread(source_dx)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen|x^^Dr."
    path = tmp_path / "utf8.dcm"
    ds.save_as(path)
    cam = np.outer(np.hanning(5), np.hanning(5)).astype(np.float32)
    for o in ro.build(ro.read_source(path.read_bytes()), _result(), MODEL, preview=ds.pixel_array, cam=cam):
        back = pydicom.dcmread(o.write(tmp_path, "utf8"))
        assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Müller^Jürgen|x^^Dr."
        assert dciodvfy(tmp_path / f"utf8-{o.kind}.dcm") == []


def test_headers_other_sites_send_still_give_every_object_and_a_clean_hl7_message(source_dx, tmp_path):
    """Real-world header defects: no Patient Orientation (type 2 in CR), an Instance Number that is not a number, a
    malformed Study Time and birth date, control characters and a multi-group (ideographic) name."""
    from cxr_edge.node.delivery import Destination
    from cxr_edge.node.hl7_report import oru_r01

    ds = pydicom.dcmread(source_dx)
    ds.PatientOrientation = ""
    ds.InstanceNumber, ds.StudyTime, ds.PatientBirthDate = 73519, "073119", "19800101"
    ds.PatientSex = "M\x1c"
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    path = tmp_path / "odd.dcm"
    ds.save_as(path)
    raw = path.read_bytes()  # then the values a careless modality writes (pydicom itself refuses to write them)
    cut = raw.index(b"\xe0\x7f\x10\x00")  # the header, before the pixel data
    head = raw[:cut]
    for good, bad in ((b"73519 ", b"abcde "), (b"073119", b"25:99 "), (b"19800101", b"19XX0101")):
        assert head.count(good) == 1
        head = head.replace(good, bad)
    path.write_bytes(head + raw[cut:])
    src = ro.read_source(path.read_bytes())
    cam = np.outer(np.hanning(5), np.hanning(5)).astype(np.float32)
    errors: dict = {}
    objs = ro.build(src, _result(), MODEL, preview=ds.pixel_array, cam=cam, errors=errors)
    assert errors == {} and [o.kind for o in objs] == ["sr", "sc", "seg"]
    for o in objs:
        assert dciodvfy(o.write(tmp_path, "odd")) == [], o.kind
    text = oru_r01(src, _result(), MODEL, sending_facility="CXREDGE", report_uid=objs[0].sop_instance_uid)
    assert "\x1c" not in text and "\x0b" not in text, repr(text)
    assert "|M\\X1C\\" in text, repr(text)
    assert "|Yamada^Tarou|" in text  # the alphabetic group, in XPN order
    row = ro.write_hl7(src, _result(), MODEL, objs, Destination.parse("ris=mllp://127.0.0.1:2575"), station="X",
                       when=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), path=tmp_path / "m.hl7")
    assert row[4] == "ris" and row[5] is None and (tmp_path / "m.hl7").read_bytes().count(b"\r") >= 10


def test_predict_dicom_out_writes_the_nodes_objects_for_dicom_inputs_only(artifact, source_dx, tmp_path, capsys):
    from cxr_edge.cli import main

    png = tmp_path / "plain.png"
    import cv2

    cv2.imwrite(str(png), pydicom.dcmread(source_dx).pixel_array)
    out = tmp_path / "objects"
    assert main(["predict", str(artifact), str(source_dx), str(png), "--dicom-out", str(out), "--tuning", "off"]) == 0
    uid = pydicom.dcmread(source_dx).SOPInstanceUID
    written = sorted(p.name for p in out.glob("*.dcm"))
    assert written == [f"{uid}-sc.dcm", f"{uid}-seg.dcm", f"{uid}-sr.dcm"]
    assert "no DICOM objects for" in capsys.readouterr().err  # the PNG: said, not fatal
    for name in written:
        assert dciodvfy(out / name) == []
    read = _read_back_sr(out / f"{uid}-sr.dcm")
    assert read["source"] == [pydicom.dcmread(source_dx).SOPInstanceUID]
    assert main(["predict", str(artifact), str(source_dx), "--dicom-out", str(out), "--dicom-objects", "sr,pdf"]) != 0


def test_highdicom_parametric_map_still_cannot_take_a_projection_radiograph(source_dx):
    """Why the raw map is a Segmentation (heatmap_objects.py): when highdicom builds this, switch to a Parametric Map."""
    import highdicom as hd
    from highdicom import pm

    src = pydicom.dcmread(source_dx)
    arr = np.zeros((src.Rows, src.Columns), np.uint8)
    rwvm = pm.RealWorldValueMapping("GRADCAM", "Grad-CAM", hd.sr.CodedConcept("1", "UCUM", "no units"), (0, 255),
                                    slope=1 / 255, intercept=0)
    with pytest.raises(RuntimeError, match="dimension index"):
        pm.ParametricMap([src], arr, hd.UID(), 1, hd.UID(), 1, manufacturer="x", manufacturer_model_name="y",
                         software_versions="1", device_serial_number="1", contains_recognizable_visual_features=False,
                         real_world_value_mappings=[rwvm],
                         voi_lut_transformations=[hd.VOILUTTransformation(window_center=128, window_width=256)])


def test_destinations_parse_with_names_and_refuse_what_is_not_an_address():
    d = Destination.parse("dicom://ORTHANC@10.1.2.3:4242")
    assert (d.kind, d.called_ae, d.host, d.port, d.name) == ("dicom", "ORTHANC", "10.1.2.3", 4242, "10.1.2.3:4242")
    s = Destination.parse("pacs=http://10.1.2.3:8042/dicom-web/")
    assert (s.kind, s.name, s.url) == ("stow", "pacs", "http://10.1.2.3:8042/dicom-web")
    assert Destination.parse("http://10.1.2.3:8042/dicom-web").name == "10.1.2.3:8042"
    r = Destination.parse("mllp://10.1.2.60:2575?app=RIS&facility=HOSP")
    assert (r.kind, r.takes, r.receiving_application, r.receiving_facility) == ("mllp", ("hl7",), "RIS", "HOSP")
    for bad in ("ftp://x", "dicom://10.1.2.3:104", "dicom://AE@host", "bad name=dicom://AE@h:1",
                "dicom://AE_TITLE_TOO_LONG_XX@h:1", "dicom://AE@h:99999", "mllp://host"):
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    waits = [backoff_s(a, 2.0, 60.0) for a in (1, 2, 3, 4, 8)]
    assert 2.0 <= waits[0] <= 4.0 and 4.0 <= waits[1] <= 6.0 and 8.0 <= waits[2] <= 10.0 and waits[4] == 60.0


def _screened_job(store: JobStore, uid: str, objects) -> None:
    """A job finished through the store's own path, with its objects entering the outbox in that transaction."""
    with store.transaction() as cur:
        store.add_job(cur, sop_instance_uid=uid, study_uid="1.2.3.9", series_uid="1.2.3.8", sop_class_uid="1.2",
                      transfer_syntax=None, source="t", path=None, size=None, sha256=None, state="received",
                      reason=None, view="PA", received_at=time.time())
    claim = store.claim(10, 60, False)[0]
    assert store.finish_many([(claim, "screened", {"label": "Normal"}, None, None, "screened", {}, objects)],
                             False, destinations=[("pacs", ("sr",)), ("archive", ("sr", "sc")), ("ris", ("hl7",))]) == [True]


def _store_url(kind: str, tmp_path: Path, request) -> str:
    """A fresh, empty job store: an SQLite file, or a new database on the session's PostgreSQL server."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    import uuid

    psycopg = pytest.importorskip("psycopg")
    url = request.getfixturevalue("postgres_url")
    name = "outbox_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_outbox_retries_with_backoff_dead_letters_and_redelivers(kind, tmp_path, request):
    store = JobStore(_store_url(kind, tmp_path, request), "node-a").migrate()
    box = Outbox(store)
    _screened_job(store, "1.2.3.1", [("sr", "2.25.1", "1.2.840.10008.5.1.4.1.1.88.34", "/x/sr.dcm", None, None)])
    assert box.counts()[PENDING] == 2  # one row per destination
    s = box.claim(10, 60, False, ["pacs"])
    assert s is not None and [r.destination for r in s.rows] == ["pacs"]
    assert box.claim(10, 60, False, ["pacs"]) is None, "a claimed row is not handed out twice"
    box.record(s, ["association rejected"], max_attempts=3, wait_s=lambda a: 0.0, permanent=lambda r: False)
    for _ in range(2):
        s = box.claim(10, 60, False, ["pacs"])
        assert s is not None
        box.record(s, ["association rejected"], max_attempts=3, wait_s=lambda a: 0.0, permanent=lambda r: False)
    dead = box.rows(state=DEAD)
    assert len(dead) == 1 and dead[0].attempts == 3 and dead[0].last_error == "association rejected"
    assert box.claim(10, 60, False, ["pacs"]) is None
    # a retry waits its backoff
    s = box.claim(10, 60, False, ["archive"])
    assert s is not None
    box.record(s, ["timeout"], max_attempts=3, wait_s=lambda a: 3600.0, permanent=lambda r: False)
    assert box.claim(10, 60, False, ["archive"]) is None
    # --redeliver: dead letters of configured destinations come back with a fresh count
    assert box.redeliver(["pacs"])["requeued"] == 1
    s = box.claim(10, 60, False, ["pacs"])
    assert s is not None and s.rows[0].attempts == 1  # counted when the attempt starts
    box.record(s, [None], max_attempts=3, wait_s=lambda a: 0.0, permanent=lambda r: False)
    assert box.counts()[DELIVERED] == 1
    events = [r["event"] for r in store.audit_records()]
    assert events.count("delivery_failed") == 3 and "dead_letter" in events and "redeliver" in events
    assert "delivered" in events
    # a sender that died mid-send: its rows come back at the next start; one that kills the node every time it is
    # sent is dead after the last attempt instead of crash-looping the node
    _screened_job(store, "1.2.3.2", [("sr", "2.25.2", "1.2.840.10008.5.1.4.1.1.88.34", "/x/sr2.dcm", None, None)])
    for _ in range(3):
        assert box.claim(10, 60, False, ["pacs"], max_attempts=3) is not None
        assert box.release_own() == 1
    assert box.claim(10, 60, False, ["pacs"], max_attempts=3) is None
    assert "without an outcome recorded" in box.rows(state=DEAD)[-1].last_error
    # the node itself never takes back rows it is still sending, however long the send takes
    _screened_job(store, "1.2.3.3", [("sr", "2.25.3", "1.2.840.10008.5.1.4.1.1.88.34", "/x/sr3.dcm", None, None)])
    assert box.claim(10, 0.0, False, ["pacs"]) is not None and box.claim(10, 0.0, False, ["pacs"]) is None
    # an HL7 message goes to the destination it was written for only; an object that could not be made is dead
    _screened_job(store, "1.2.3.4", [("hl7", "C1@ris", "ORU^R01", "/x/m.hl7", "ris", None),
                                     ("sc", "2.25.4", "1.2.840.10008.5.1.4.1.1.7", "", None, "SC could not be made: X")])
    rows = box.rows()
    assert [(r.destination, r.state) for r in rows if r.sop_instance_uid == "C1@ris"] == [("ris", PENDING)]
    assert [(r.destination, r.state, r.last_error) for r in rows if r.sop_instance_uid == "2.25.4"] == \
        [("archive", DEAD, "SC could not be made: X")]
    # a destination this node no longer has: its rows are dead-lettered with the reason at start, not left waiting
    assert box.strand_unconfigured(["pacs", "ris"]) >= 1
    assert all(r.state in (DEAD, DELIVERED) or r.destination != "archive" for r in box.rows())
    store.close()


# ------------------------------------------------------------------ the node delivering to a real Orthanc

@pytest.fixture(scope="module")
def artifact(tiny_export):
    return next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")


def _wait_delivered(client, timeout: float = 90.0, want_dead: bool = False) -> dict:
    """Until the outbox has nothing pending or being sent (and, with ``want_dead``, something dead)."""
    end = time.monotonic() + timeout
    counts: dict = {}
    while time.monotonic() < end:
        counts = client.get("/v1/outbox?limit=1").json()["counts"]
        if counts["pending"] == 0 and counts["sending"] == 0 and (counts["dead"] > 0 or not want_dead) and \
                counts["delivered"] + counts["dead"] > 0:
            return counts
        time.sleep(0.2)
    raise AssertionError(f"the outbox did not settle: {counts}")


def test_node_delivers_each_result_once_into_the_source_study_in_orthanc(artifact, tmp_path, orthanc):  # noqa: F811
    """storescu -> node -> Orthanc by C-STORE *and* STOW-RS: the same objects twice, kept once (deterministic
    UIDs); the report in the source study reads back with the values of the JSON result; dciodvfy passes the
    objects as Orthanc returns them."""
    from dicom_studies import make_frontal_instances
    from test_node import _storescu, _wait_idle, running_node

    src = make_frontal_instances(tmp_path / "src", 3, per_study=2, max_side=384)
    # the X-ray room sends its images to the PACS and to the node (the usual routing)
    host, port = orthanc.dicom_url.split("@")[1].split(":")
    to_pacs = subprocess.run(["/usr/bin/storescu", "-xf", str(STORESCU_CFG), "CXR", "-aet", "XRAY1", "-aec", "ORTHANC",
                              host, port, *[str(i.path) for i in src]], capture_output=True, text=True, timeout=120)
    assert to_pacs.returncode == 0, to_pacs.stderr
    dests = (Destination.parse(f"pacs={orthanc.dicom_url}"), Destination.parse(f"web={orthanc.stow_url}"))
    with running_node(artifact, tmp_path / "node", destinations=dests, send_backoff_s=0.2) as (node, client):
        sent = _storescu(node.scp.port, [i.path for i in src])
        assert sent.returncode == 0, sent.stderr
        _wait_idle(client)
        counts = _wait_delivered(client)
        assert counts == {"pending": 0, "sending": 0, "delivered": 2 * 3 * 3, "dead": 0}  # 2 destinations x 3 x 3
        jobs = client.get("/v1/jobs?limit=100").json()["jobs"]
        assert {j["delivery"]["state"] for j in jobs} == {"delivered"}
        assert 'cxr_node_deliveries_total{destination="web",outcome="delivered"} 9.0' in client.get("/metrics").text

    by_uid = {j["sop_instance_uid"]: j for j in jobs}
    for study in {i.study_uid for i in src}:
        held = orthanc.instances_of_study(study)
        sources = [i for i in src if i.study_uid == study]
        modalities = sorted(h["modality"] for h in held)
        assert len(held) == len(sources) * 4, f"each source + its SR, SC and SEG, once: {modalities}"
        assert [modalities.count(m) for m in ("DX", "SR", "OT", "SEG")] == [len(sources)] * 4, modalities
        for h in held:
            if h["modality"] in ("SR", "OT", "SEG"):
                assert "not for diagnostic use" in h["series_description"]
        for h in [h for h in held if h["modality"] == "SR"]:
            path = tmp_path / f"{h['sop_instance_uid']}.dcm"
            path.write_bytes(orthanc.instance_file(h["id"]))
            assert dciodvfy(path) == []
            read = _read_back_sr(path)
            job = by_uid[read["source"][0]]
            assert read["measurements"]["Probability of COVID-19"] == pytest.approx(job["p_covid"], abs=1e-6)
            assert read["measurements"]["Threshold Value"] == pytest.approx(job["threshold"], abs=1e-6)
            assert read["evaluations"]["COVID-19"] == ("Suspected" if job["label"] == "COVID" else "Not suspected")
            assert f"model_sha256={job['result']['model']['sha256']}" in read["parameters"]
        for h in [h for h in held if h["modality"] in ("OT", "SEG")]:
            path = tmp_path / f"{h['sop_instance_uid']}.dcm"
            path.write_bytes(orthanc.instance_file(h["id"]))
            assert dciodvfy(path) == []


def test_a_refusing_destination_dead_letters_and_redeliver_sends_after_the_fix(artifact, tmp_path, orthanc):  # noqa: F811
    from dicom_studies import make_frontal_instances
    from test_node import _storescu, _wait_idle, running_node

    src = make_frontal_instances(tmp_path / "src", 2, max_side=384)
    data = tmp_path / "node"
    host_port = orthanc.dicom_url.split("@")[1]
    wrong = (Destination.parse(f"pacs=dicom://NOTORTHANC@{host_port}"),)
    with running_node(artifact, data, destinations=wrong, send_attempts=2, send_backoff_s=0.1,
                      dicom_objects=("sr",)) as (node, client):
        _storescu(node.scp.port, [i.path for i in src])
        _wait_idle(client)
        assert _wait_delivered(client, want_dead=True)["dead"] == 2
        job = client.get("/v1/jobs?limit=1").json()["jobs"][0]
        assert job["delivery"]["state"] == "dead"
        why = job["delivery"]["objects"][0]["last_error"]
        assert "NOTORTHANC" in why and ("rejected" in why or "could not be opened" in why), why
        audits = [r["detail"]["reason"] for r in node.store.audit_records(event="delivery_failed")]
        assert any("rejected" in a and "Called AE title not recognised" in a for a in audits + [why]), audits
        dead = client.get("/v1/outbox?state=dead").json()["objects"]
        assert len(dead) == 2 and all(d["attempts"] == 2 for d in dead)
        assert 'cxr_node_deliveries_total{destination="pacs",outcome="dead"} 2.0' in client.get("/metrics").text
        studies = client.get("/v1/studies").json()["studies"]
        assert sum(s["delivery"].get("dead", 0) for s in studies) == 2
    assert orthanc.count_instances() == 0
    assert len(node.store.audit_records(event="dead_letter")) == 2

    fixed = (Destination.parse(f"pacs={orthanc.dicom_url}"),)
    with running_node(artifact, data, destinations=fixed, redeliver=True, dicom_objects=("sr",)) as (node, client):
        assert _wait_delivered(client)["delivered"] == 2
    assert orthanc.count_instances() == 2
    assert node.store.audit_records(event="redeliver")[0]["detail"]["requeued"] == 2


# ------------------------------------------------------------------ HL7 v2 to a RIS listener

@contextmanager
def mllp_listener(folder: Path, mode: str = "accept"):
    """tests/mllp_listener.py in its own process: python-hl7's MLLP server, storing and acknowledging messages."""
    port_file = folder / "port"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "mllp_listener.py"), str(port_file),
                             str(folder / "received"), mode], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the MLLP listener did not start"
            time.sleep(0.05)
        yield int(port_file.read_text()), folder / "received"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_node_notifies_a_ris_by_hl7_oru_over_mllp_and_dead_letters_a_refusal(artifact, tmp_path):
    import hl7
    from dicom_studies import make_frontal_instances
    from test_node import _storescu, _wait_idle, running_node

    src = make_frontal_instances(tmp_path / "src", 2, max_side=256)
    with mllp_listener(tmp_path / "ris") as (port, received):
        ris = (Destination.parse(f"ris=mllp://127.0.0.1:{port}?app=RIS&facility=HOSP"),)
        with running_node(artifact, tmp_path / "node", destinations=ris) as (node, client):
            _storescu(node.scp.port, [i.path for i in src])
            _wait_idle(client)
            assert _wait_delivered(client) == {"pending": 0, "sending": 0, "delivered": 2, "dead": 0}
            jobs = {j["sop_instance_uid"]: j for j in client.get("/v1/jobs").json()["jobs"]}
        raw = [p.read_bytes().decode() for p in sorted(received.glob("*.hl7"))]
        messages = [hl7.parse(t) for t in raw]
    assert all("\n" not in t and t.count("\r") >= 12 for t in raw), "segments end with CR, and only CR"
    assert len(messages) == 2
    for m in messages:
        assert str(m.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(m.segment("MSH")[5]) == "RIS"
        obx = {str(o[3][0][0]): o for o in m.segments("OBX")}
        study = str(obx["113014"][5])
        job = next(j for j in jobs.values() if j["study_uid"] == study)
        assert str(obx["840539006"][5][0][1]) == ("Suspected" if job["label"] == "COVID" else "Not suspected")
        assert float(str(obx["P-COVID-19"][5])) == pytest.approx(job["p_covid"], abs=1e-6)
        assert float(str(obx["122411"][5])) == pytest.approx(job["threshold"], abs=1e-6)
        assert str(m.segment("OBR")[25]) == "P" and {str(o[11]) for o in m.segments("OBX")} == {"P"}
        source = pydicom.dcmread(next(i.path for i in src if i.study_uid == study), stop_before_pixels=True)
        assert str(m.segment("PID")[3]) == source.PatientID

    with mllp_listener(tmp_path / "ris2", "reject") as (port, received):
        ris = (Destination.parse(f"ris=mllp://127.0.0.1:{port}"),)
        with running_node(artifact, tmp_path / "node2", destinations=ris, send_attempts=2,
                          send_backoff_s=0.1) as (node, client):
            _storescu(node.scp.port, [src[0].path])
            _wait_idle(client)
            assert _wait_delivered(client, want_dead=True)["dead"] == 1
            dead = client.get("/v1/outbox?state=dead").json()["objects"][0]
            assert dead["kind"] == "hl7" and dead["last_error"] == "HL7 acknowledgement AE: unknown patient: not in the RIS"
        assert len(list(received.glob("*.hl7"))) == 2, "two attempts, then dead"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_senders_on_one_outbox_deliver_each_object_once(kind, tmp_path, request):
    """Two nodes' senders (shared storage) claiming from one outbox at once: no row is handed to both."""
    import threading

    url = _store_url(kind, tmp_path, request)
    a, b = JobStore(url, "node-a").migrate(), JobStore(url, "node-b").migrate()
    for k in range(40):
        _screened_job(a, f"1.2.9.{k}", [("sr", f"2.25.9{k}", "1.2.840.10008.5.1.4.1.1.88.34", f"/x/{k}.dcm", None, None)])
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def sender(store: JobStore) -> None:
        box = Outbox(store)
        while True:
            s = box.claim(4, 60, True, ["pacs"])
            if s is None:
                return
            with lock:
                sent.extend((store.node_id, r.id) for r in s.rows)
            box.record(s, [None] * len(s.rows), max_attempts=3, wait_s=lambda n: 0.0, permanent=lambda r: False)

    threads = [threading.Thread(target=sender, args=(st,)) for st in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ids = [rid for _, rid in sent]
    assert len(ids) == len(set(ids)) == 40, "every row sent once, by one sender"
    assert Outbox(a).counts()["delivered"] == 40
    assert len(a.audit_records(event="delivered")) == 40
    a.close()
    b.close()
