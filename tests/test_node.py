"""The DICOM node: selection rules, the job store's claims and audit trail, and the node end to end against
DCMTK's echoscu/storescu (the X-ray room), pynetdicom as a second real peer, STOW-RS, TLS and the disk watermark."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("fastapi")
from conftest import REAL_DATA
from pg_server import postgres_url  # noqa: F401  (the session fixture)

from cxr_edge.errors import ConfigError
from cxr_edge.node.config import AllowedPeer, NodeConfig, TlsConfig
from cxr_edge.node.rules import SelectionRules
from cxr_edge.node.store import JobStore

DCMTK = {t: shutil.which(t, path="/usr/bin") for t in ("storescu", "echoscu")}  # not pynetdicom's scripts of the same name
STORESCU_CFG = Path(__file__).parent / "fixtures" / "dcmtk" / "storescu-cxr.cfg"


def _need_dcmtk():
    if all(DCMTK.values()):
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("DCMTK (storescu, echoscu) is missing on CI: .ci/run installs Debian's dcmtk")
    pytest.skip("DCMTK is not installed here (apt-get install dcmtk)")


def _need_real_data():
    if not REAL_DATA.is_dir():
        pytest.skip(f"the shared CXR images are not at {REAL_DATA}")


# ------------------------------------------------------------------ selection rules

def _header(**kw):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Modality, ds.Rows, ds.Columns, ds.PhotometricInterpretation = "DX", 1024, 1024, "MONOCHROME2"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_default_rules_screen_frontal_chest_radiographs_and_say_why_they_skip_the_rest():
    from pydicom.dataset import Dataset

    rules = SelectionRules.load()
    assert rules.evaluate(_header(ViewPosition="PA"), True).screen
    assert rules.evaluate(_header(ViewPosition="AP ", Modality="CR", BodyPartExamined="CHEST"), True).screen
    assert rules.evaluate(_header(ViewPosition="PA", PhotometricInterpretation="MONOCHROME1"), True).screen
    cases = {
        "view LL is not frontal": _header(ViewPosition="LL"),
        "view position not recorded": _header(),
        "modality OT is not screened": _header(ViewPosition="PA", Modality="OT"),
        "body part KNEE is not a chest": _header(ViewPosition="PA", BodyPartExamined="KNEE"),
        "multi-frame object (3 frames)": _header(ViewPosition="PA", NumberOfFrames=3),
        "photometric interpretation RGB": _header(ViewPosition="PA", PhotometricInterpretation="RGB"),
        "smaller than 128 px": _header(ViewPosition="PA", Rows=64, Columns=64),
    }
    for why, ds in cases.items():
        sel = rules.evaluate(ds, True)
        assert not sel.screen and why in sel.reason, (why, sel)
    assert "not an image" in rules.evaluate(_header(ViewPosition="PA"), False).reason
    # the View Code Sequence when ViewPosition is empty: by meaning first (a lateral is never frontal), then by code
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399173006", "SCT", "left lateral"
    assert not rules.evaluate(_header(ViewCodeSequence=[item]), True).screen
    item2 = Dataset()
    item2.CodeValue, item2.CodingSchemeDesignator, item2.CodeMeaning = "399348003", "SCT", "antero-posterior"
    assert rules.evaluate(_header(ViewCodeSequence=[item2]), True).screen


def test_a_site_rules_file_changes_the_choice_and_a_typo_is_refused(tmp_path):
    site = tmp_path / "rules.toml"
    site.write_text('[view]\nwhen_missing = "screen"\n[modality]\nscreen = ["DX"]\n')
    rules = SelectionRules.load(site)
    assert rules.evaluate(_header(), True).screen  # this room never fills in ViewPosition
    assert not rules.evaluate(_header(ViewPosition="PA", Modality="CR"), True).screen
    bad = tmp_path / "bad.toml"
    bad.write_text('[view]\nwhen_mising = "screen"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        SelectionRules.load(bad)
    bad.write_text('[view]\nwhen_missing = "maybe"\n')
    with pytest.raises(ConfigError, match="screen.*skip"):
        SelectionRules.load(bad)


def test_allowlist_entries_match_title_and_address():
    p = AllowedPeer.parse("XRAY1@10.1.0.0/16")
    assert p.admits("XRAY1", "10.1.2.3") and not p.admits("XRAY1", "10.2.0.1") and not p.admits("XRAY2", "10.1.2.3")
    assert AllowedPeer.parse("PACS").admits("PACS", "192.0.2.9")
    with pytest.raises(ConfigError, match="AE title"):
        AllowedPeer.parse("A-TITLE-LONGER-THAN-16")


# ------------------------------------------------------------------ the job store

def _add(store: JobStore, n: int, prefix: str = "1.2.3", study: str = "1.2.3.9") -> list[int]:
    ids = []
    for k in range(n):
        with store.transaction() as cur:
            ids.append(store.add_job(cur, sop_instance_uid=f"{prefix}.{k + 1}", study_uid=study, series_uid=study + ".1",
                                     sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
                                     source="XRAY1@127.0.0.1", path=None, size=1, sha256="x", state="received", reason=None,
                                     view="PA", received_at=time.time()))
    return ids


def _race(stores: list[JobStore], per_store_threads: int = 2) -> dict[int, list[str]]:
    """Every store's threads claim and finish jobs until none is left; returns job id -> nodes that finished it."""
    finished: dict[int, list[str]] = {}
    lock = threading.Lock()

    def work(store: JobStore):
        while True:
            claims = store.claim(7, lease_s=300, shared_storage=True)
            if not claims:
                return
            for c in claims:
                if store.finish(c, state="screened", result={"label": "Normal"}, reason=None, overlay_path=None,
                                audit_event="screened", audit_detail={}):
                    with lock:
                        finished.setdefault(c.job.id, []).append(store.node_id)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores for _ in range(per_store_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return finished


def _check_store_semantics(url: str):
    a, b = JobStore(url, "node-a").migrate(), JobStore(url, "node-b").migrate()
    try:
        ids = _add(a, 120)
        assert _add(a, 1) == [None]  # the same SOP Instance UID again: a duplicate, not a second job
        finished = _race([a, b])
        assert sorted(finished) == sorted(ids), "every job finished"
        assert all(len(v) == 1 for v in finished.values()), "no job finished twice"
        screened = [r for r in a.audit_records(event="screened")]
        assert len(screened) == len(ids)
        # a claim that lapsed and was taken over cannot record a second result
        (jid,) = _add(a, 1, prefix="1.2.4")
        (stale,) = a.claim(1, lease_s=300, shared_storage=True)
        (fresh,) = b.claim(1, lease_s=0.0, shared_storage=True)  # a's lease counts as expired for b
        assert stale.job.id == fresh.job.id == jid
        assert b.finish(fresh, state="screened", result={}, reason=None, overlay_path=None, audit_event="screened",
                        audit_detail={})
        assert not a.finish(stale, state="screened", result={}, reason=None, overlay_path=None, audit_event="screened",
                            audit_detail={})
        # a restarted node puts back what it had claimed; a job that kept killing its screener fails instead
        (jid2,) = _add(a, 1, prefix="1.2.5")
        assert [c.job.id for c in a.claim(1, 300, True)] == [jid2]
        assert a.release_own_claims() == 1
        for _ in range(2):  # a's claim was the first attempt (a restart after a crash counts: it may be the cause)
            assert [c.job.id for c in b.claim(1, 0.0, True)] == [jid2]
        assert b.claim(1, 0.0, True) == []
        job = a.job(jid2)
        assert job.state == "failed" and "started 3 times" in job.reason
    finally:
        a.close()
        b.close()
    return ids


def test_sqlite_store_claims_each_job_once_and_keeps_the_audit_append_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    _check_store_semantics(url)
    conn = sqlite3.connect(tmp_path / "jobs.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET event = 'nothing'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")


def test_postgres_store_claims_each_job_once_across_two_nodes(postgres_url):  # noqa: F811
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(postgres_url, autocommit=True) as c:
        for t in ("jobs", "studies", "audit"):
            c.execute(f"DROP TABLE IF EXISTS {t}")
    _check_store_semantics(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as c, pytest.raises(psycopg.Error, match="append-only"):
        c.execute("DELETE FROM audit")


def test_store_connections_do_not_pile_up_with_association_threads(tmp_path):
    """pynetdicom serves every association in a new thread: the store must not keep a connection (three file
    descriptors with WAL) per thread it ever saw, or a node runs out of descriptors after a few hundred."""
    import os
    import threading

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}", "node-a").migrate()
    fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    before = fds()
    for k in range(60):  # one short-lived thread per association, each recording something
        t = threading.Thread(target=store.record, args=("association_accepted",), kwargs={"detail": {"k": k}})
        t.start()
        t.join()
    assert len(store._all) <= 2 and fds() - before <= 6
    assert len(store.audit_records(event="association_accepted")) == 60
    store.close()


def test_store_url_must_name_a_known_database():
    with pytest.raises(ConfigError, match="sqlite:///PATH"):
        JobStore("mysql://x", "n")


# ------------------------------------------------------------------ the node, end to end

@pytest.fixture(scope="module")
def artifact(tiny_export):
    return next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")


@contextmanager
def running_node(artifact, data_dir: Path, *, client_address=("127.0.0.1", 50000), **node_kw):
    """The node in this process: its HTTP app under TestClient (which runs the lifespan: engine, SCP, worker)."""
    from fastapi.testclient import TestClient

    from cxr_edge.node.service import ScreeningNode
    from cxr_edge.serve.config import ServeConfig

    cfg = NodeConfig(data_dir=data_dir, dicom_host="127.0.0.1", dicom_port=0, stable_after_s=0.5,
                     **{"allowed": (AllowedPeer.parse("XRAY1"),), **node_kw})
    node = ScreeningNode(artifact, ServeConfig(decode_workers=1, tuning="off"), cfg)
    node.open_store()
    with TestClient(node.build_app(), client=client_address) as client:
        yield node, client


def _wait_idle(client, timeout: float = 60.0):
    """Until no job is waiting or being screened and every study is complete."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = [j for s in ("received", "screening") for j in client.get(f"/v1/jobs?state={s}").json()["jobs"]]
        studies = client.get("/v1/studies?limit=500").json()["studies"]
        if not busy and all(s["state"] == "complete" for s in studies):
            return
        time.sleep(0.2)
    raise AssertionError("the node did not finish its jobs in time")


def _storescu(port: int, files, ae: str = "XRAY1") -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK["storescu"], "-xf", str(STORESCU_CFG), "CXR", "-aet", ae, "-aec", "CXREDGE", "-nh",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def small_study_set(tmp_path_factory):
    """One instance of every kind the node must tell apart (made from the shared images, never committed)."""
    _need_real_data()
    _need_dcmtk()
    from dicom_studies import make_instance, source_images

    out = tmp_path_factory.mktemp("studies")
    src = source_images(REAL_DATA)[:16]
    kinds = ["pa", "ap", "mono1", "16bit", "jpeg2000", "jpegls", "jpeg_baseline", "rle", "deflated", "lateral",
             "unknown_view", "multiframe", "no_pixels", "sc_colour", "corrupt", "hostile_size"]
    return [make_instance(src[k % len(src)], out / f"{k:02d}_{kind}.dcm", kind, max_side=512)
            for k, kind in enumerate(kinds)]


def test_node_screens_what_dcmtk_sends_once_and_records_every_skip_and_refusal(artifact, small_study_set, tmp_path):
    _need_dcmtk()
    data = tmp_path / "node"
    with running_node(artifact, data) as (node, client):
        port = node.scp.port
        echo = subprocess.run([DCMTK["echoscu"], "-aet", "XRAY1", "-aec", "CXREDGE", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        stranger = subprocess.run([DCMTK["echoscu"], "-aet", "STRANGER", "-aec", "CXREDGE", "127.0.0.1", str(port)],
                                  capture_output=True, text=True, timeout=30)
        assert stranger.returncode != 0 and "Rejected" in stranger.stderr + stranger.stdout
        wrong_called = subprocess.run([DCMTK["echoscu"], "-aet", "XRAY1", "-aec", "OTHERNODE", "127.0.0.1", str(port)],
                                      capture_output=True, text=True, timeout=30)
        assert wrong_called.returncode != 0

        sent = _storescu(port, [i.path for i in small_study_set])
        _wait_idle(client)
        jobs = {j["sop_instance_uid"]: j for j in client.get("/v1/jobs?limit=1000").json()["jobs"]}
        by_expect = {e: {i.sop_instance_uid for i in small_study_set if i.expect == e} for e in ("screen", "skip", "refuse")}
        assert {u for u, j in jobs.items() if j["state"] == "screened"} == by_expect["screen"], sent.stdout + sent.stderr
        assert {u for u, j in jobs.items() if j["state"] == "skipped"} == by_expect["skip"]
        assert all(jobs[u]["reason"] for u in by_expect["skip"])
        assert not by_expect["refuse"] & set(jobs), "a refused instance is never acknowledged or queued"
        refused = node.store.audit_records(event="refused")
        assert {r["sop_instance_uid"] for r in refused} >= by_expect["refuse"] - {None}
        assert all(r["detail"]["status"] == "0xC000" and r["detail"]["reason"] for r in refused)
        assert node.store.audit_records(event="association_rejected")

        # every screened job: a result with the model recorded, an overlay, and the received pixels gone
        screened = [j for j in jobs.values() if j["state"] == "screened"]
        assert all(j["label"] in ("COVID", "Normal") and j["result"]["model"]["sha256"] for j in screened)
        img = client.get(f"/v1/jobs/{screened[0]['id']}/overlay.jpg")
        assert img.status_code == 200 and img.content[:3] == b"\xff\xd8\xff"
        assert screened[0]["result"]["explanation"]["files"]["cam"].endswith("-cam.npy")
        assert not list((data / "instances").rglob("*.dcm")), "received pixels are deleted after screening"

        # sending everything again: acknowledged as duplicates, nothing screened twice
        _storescu(port, [i.path for i in small_study_set if i.expect != "refuse"])
        _wait_idle(client)
        again = client.get("/v1/jobs?limit=1000").json()["jobs"]
        assert len(again) == len(jobs)
        per_instance = {}
        for r in node.store.audit_records(event="screened"):
            per_instance[r["sop_instance_uid"]] = per_instance.get(r["sop_instance_uid"], 0) + 1
        assert set(per_instance.values()) == {1}
        assert len(node.store.audit_records(event="duplicate")) == len(small_study_set) - len(by_expect["refuse"])

        studies = client.get("/v1/studies?limit=100").json()["studies"]
        assert all(s["state"] == "complete" for s in studies)
        metrics = client.get("/metrics").text
        assert f'cxr_node_jobs_total{{outcome="screened"}} {float(len(by_expect["screen"]))}' in metrics
        assert "cxr_node_arrival_to_result_seconds_bucket" in metrics and "cxr_node_queue_depth 0.0" in metrics

    # the audit trail, exported by the command line
    from cxr_edge.cli import main

    out = tmp_path / "audit.json"
    assert main(["audit", "--data", str(data), "--event", "screened", "--format", "json", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == len(by_expect["screen"])
    r = records[0]
    assert r["source"] == "XRAY1@127.0.0.1" and r["detail"]["model"]["precision"] == "int8"
    assert {"threshold", "operating_point", "label", "p_covid", "borderline"} <= set(r["detail"])
    assert "PatientName" not in out.read_text() and "ANON001" not in out.read_text(), "no patient identifiers by default"
    csv_out = tmp_path / "audit.csv"
    assert main(["audit", "--data", str(data), "--format", "csv", "--out", str(csv_out)]) == 0
    assert csv_out.read_text().splitlines()[0].startswith("id,at,event,node,source,study_uid")


def _scu_store(port: int, path: Path, ae: str = "XRAY1", tls=None):
    """One C-STORE by pynetdicom (a second real peer: it reports the exact status and Error Comment)."""
    from pydicom import dcmread
    from pynetdicom import AE

    scu = AE(ae_title=ae)
    ds = dcmread(path)
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", port, ae_title="CXREDGE", tls_args=tls)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_disk_watermark_answers_out_of_resources_and_tls_is_required_when_configured(artifact, small_study_set, tmp_path):
    pa = next(i for i in small_study_set if i.kind == "pa")
    with running_node(artifact, tmp_path / "full", min_free_mb=1e12) as (node, client):
        status = _scu_store(node.scp.port, pa.path)
        assert status.Status == 0xA700 and "watermark" in status.ErrorComment
        assert client.get("/v1/jobs").json()["jobs"] == []

    # TLS with a self-signed pair: a TLS caller stores, a plain one cannot even associate
    import ssl

    key, cert = _self_signed(tmp_path)
    with running_node(artifact, tmp_path / "tls", tls=TlsConfig(cert, key)) as (node, client):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ctx.check_hostname = False
        assert _scu_store(node.scp.port, pa.path, tls=(ctx, None)).Status == 0x0000
        from pynetdicom import AE

        plain = AE(ae_title="XRAY1")
        plain.add_requested_context("1.2.840.10008.1.1")
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", node.scp.port, ae_title="CXREDGE").is_established
        _wait_idle(client)
        assert [j["state"] for j in client.get("/v1/jobs").json()["jobs"]] == ["screened"]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cxr-edge-node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    kp, cp = folder / "node.key", folder / "node.crt"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


def _multipart(parts: list[bytes], boundary: str = "cxr-boundary-42") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs_feeds_the_same_intake_and_answers_per_instance(artifact, small_study_set, tmp_path):
    pick = {i.kind: i for i in small_study_set}
    parts = [pick[k].path.read_bytes() for k in ("pa", "lateral", "hostile_size")]
    body, ctype = _multipart(parts)
    with running_node(artifact, tmp_path / "stow") as (node, client):
        r = client.post("/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 202 and r.headers["content-type"].startswith("application/dicom+json")
        answer = r.json()
        stored = {i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]}
        assert stored == {pick["pa"].sop_instance_uid, pick["lateral"].sop_instance_uid}
        (failed,) = answer["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [0xC000] and "exceeds the limit" in failed["00000902"]["Value"][0]
        # a study in the URL that the instance does not belong to
        body1, ctype1 = _multipart([pick["ap"].path.read_bytes()])
        r = client.post("/studies/1.2.3.4", content=body1, headers={"Content-Type": ctype1})
        assert r.status_code == 409
        assert client.post("/studies", content=b"x", headers={"Content-Type": "application/json"}).status_code == 415
        _wait_idle(client)
        jobs = {j["sop_instance_uid"]: j for j in client.get(f"/v1/jobs?study={pick['pa'].study_uid}").json()["jobs"]}
        assert jobs[pick["pa"].sop_instance_uid]["state"] == "screened"
        assert jobs[pick["pa"].sop_instance_uid]["source"] == "http:127.0.0.1"
        assert client.get("/v1/jobs?state=bogus").status_code == 400
        assert client.get("/v1/jobs?since=2000-01-01T00:00:00Z&until=2000-01-02").json()["jobs"] == []
    with running_node(artifact, tmp_path / "stow2", client_address=("192.0.2.7", 1234)) as (node, client):
        assert client.post("/studies", content=body, headers={"Content-Type": ctype}).status_code == 403


def test_a_restarted_node_screens_the_jobs_it_had_claimed(artifact, small_study_set, tmp_path):
    """What a kill -9 leaves: a committed job claimed by this node, its file on disk, no result. The next start puts
    it back and screens it, decoding the stored file (the decoded pixels died with the process)."""
    pa = next(i for i in small_study_set if i.kind == "pa")
    data = tmp_path / "node"
    node_id = "kiosk-1"
    store = JobStore(f"sqlite:///{(data / 'jobs.sqlite').resolve()}", node_id).migrate()
    (data / "instances").mkdir(parents=True)
    kept = data / "instances" / "left-by-a-crash.dcm"
    shutil.copy(pa.path, kept)
    with store.transaction() as cur:
        store.add_job(cur, sop_instance_uid=pa.sop_instance_uid, study_uid=pa.study_uid, series_uid=pa.series_uid,
                      sop_class_uid=None, transfer_syntax=None, source="XRAY1@127.0.0.1", path=str(kept), size=1,
                      sha256=None, state="received", reason=None, view="PA", received_at=time.time())
    assert len(store.claim(5, 300, False)) == 1  # claimed, then the process "died"
    store.close()
    with running_node(artifact, data, node_id=node_id, heatmaps="none") as (node, client):
        _wait_idle(client)
        (job,) = client.get("/v1/jobs").json()["jobs"]
        assert job["state"] == "screened" and job["attempts"] == 2
        assert not job["has_overlay"] and job["result"]["explanation"] is None  # --heatmaps none: the decision only
        assert node.store.audit_records(event="resumed")
    assert not kept.exists()


def test_node_refuses_to_start_without_a_writable_audit_store(tmp_path):
    from cxr_edge.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["node", "any.onnx", "--data", str(blocker / "data"), "--allow", "XRAY1"])
    assert code == 5
    code = main(["node", "any.onnx", "--data", str(tmp_path / "d")])  # no allowlist and no --allow-any-caller
    assert code == 5
