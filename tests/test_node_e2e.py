"""The node at the size of the issue's acceptance runs (slow): a 40-study mixed folder from DCMTK storescu over
several associations with hostile instances among them, a kill -9 during a 300-instance send, and two nodes on one
PostgreSQL store. The durability scenarios are the functions of benchmarks/node_durability.py, whose committed
results come from the same code."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
from test_node import DCMTK, _need_dcmtk, _need_real_data, _storescu, _wait_idle, running_node

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tiny_export):
    return next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")


def test_forty_mixed_studies_over_three_associations_with_hostile_instances(artifact, tmp_path):
    """Every frontal image screened exactly once, everything else skipped or refused with a reason; while hostile
    instances are refused on one association, the others keep being served and C-ECHO is answered."""
    _need_real_data()
    _need_dcmtk()
    from dicom_studies import make_mixed_studies

    made = make_mixed_studies(tmp_path / "studies", 40, seed=3)
    hostile = [i for i in made if i.expect == "refuse"]
    honest = [i for i in made if i.expect != "refuse"]
    with running_node(artifact, tmp_path / "node", max_associations=8) as (node, client):
        port = node.scp.port
        results, echoes = {}, []

        def send(name, items, ae):
            results[name] = _storescu(port, [i.path for i in items], ae=ae)

        def echo_loop(stop):
            while not stop.is_set():
                r = subprocess.run([DCMTK["echoscu"], "-aet", "XRAY1", "-aec", "CXREDGE", "127.0.0.1", str(port)],
                                   capture_output=True, timeout=30)
                echoes.append(r.returncode)
                time.sleep(0.2)

        stop = threading.Event()
        threads = [threading.Thread(target=send, args=("a", honest[0::2], "XRAY1")),
                   threading.Thread(target=send, args=("b", honest[1::2], "XRAY1")),
                   threading.Thread(target=send, args=("h", hostile * 3, "XRAY1")),
                   threading.Thread(target=echo_loop, args=(stop,))]
        for t in threads:
            t.start()
        for t in threads[:3]:
            t.join(300)
        stop.set()
        threads[3].join(30)
        _wait_idle(client, 120)
        jobs = {j["sop_instance_uid"]: j for j in client.get("/v1/jobs?limit=1000").json()["jobs"]}
        screen = {i.sop_instance_uid for i in made if i.expect == "screen"}
        skip = {i.sop_instance_uid for i in made if i.expect == "skip"}
        assert {u for u, j in jobs.items() if j["state"] == "screened"} == screen
        assert {u for u, j in jobs.items() if j["state"] == "skipped"} == skip
        assert all(jobs[u]["reason"] for u in skip)
        assert not {i.sop_instance_uid for i in hostile} & set(jobs)
        screened_records = Counter(r["sop_instance_uid"] for r in node.store.audit_records(event="screened"))
        assert set(screened_records) == screen and set(screened_records.values()) == {1}
        refusals = node.store.audit_records(event="refused")
        assert len(refusals) >= len([i for i in hostile if i.kind != "truncated"]) * 3 - 3  # storescu cannot read a truncated file
        assert all(r["detail"]["reason"] for r in refusals)
        assert echoes and all(rc == 0 for rc in echoes), "C-ECHO answered throughout"
        studies = client.get("/v1/studies?limit=100").json()["studies"]
        assert len(studies) == len({i.study_uid for i in honest}) and all(s["state"] == "complete" for s in studies)


def _durability():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import node_durability

    return node_durability


def test_kill_9_during_a_300_instance_send_loses_and_duplicates_nothing(tmp_path):
    """Two kill -9 of the node mid-send; the room resends what was not acknowledged (and a few that were): every
    acknowledged instance has exactly one job and one result, none is lost."""
    _need_real_data()
    _need_dcmtk()
    r = _durability().crash_and_resend(300, kills=2, seed=11, work=tmp_path, log=lambda *a: None)
    assert r["problems"] == [], r["problems"]
    assert r["lost"] == 0 and r["screened_twice"] == 0 and r["acknowledged_instances"] == 300
    assert r["node_processes_alive_after_sigkill"] == 0


def test_two_nodes_on_one_postgres_store_screen_each_job_once(postgres_url, tmp_path):  # noqa: F811
    _need_real_data()
    _need_dcmtk()
    r = _durability().two_nodes_one_store(postgres_url, 300, seed=12, work=tmp_path, log=lambda *a: None)
    assert r["problems"] == [], r["problems"]
    assert r["lost"] == 0 and r["screened_twice"] == 0


def _delivery():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import node_delivery

    return node_delivery


def test_pacs_down_while_100_studies_are_screened_then_every_result_arrives_once(tmp_path):
    """Orthanc stopped while 100 studies are screened, started again: per study, exactly the objects the node made."""
    _need_real_data()
    _need_dcmtk()
    r = _delivery().outage(100, seed=13, work=tmp_path, log=print)
    assert r["problems"] == [], r
    assert r["outbox_during_outage"]["delivered"] == 0 and r["failed_attempts_during_outage"] > 0
    assert r["objects_made"] >= 100 and r["objects_lost"] == 0 and r["objects_duplicated"] == 0


def test_soak_with_node_kills_and_pacs_restarts_delivers_each_result_exactly_once(tmp_path):
    """A short soak (the full 500-study one is benchmarks/node_delivery.py): SIGKILLs and a PACS restart."""
    _need_real_data()
    _need_dcmtk()
    r = _delivery().soak(120, kills=2, pacs_restarts=1, seed=14, work=tmp_path, chunk=20, log=print)
    assert r["problems"] == [], r
    assert r["node_kills"] == 2 and r["pacs_restarts"] == 1 and r["acknowledged"] == 120


from pg_server import postgres_url  # noqa: E402, F401  (the session fixture)
