"""Durability of `cxr-edge node` under SIGKILL and under two nodes racing on one PostgreSQL store.

    python benchmarks/node_durability.py [--n 300] [--kills 2] [--seed 0] [--artifact PATH] [--pg-url URL]
                                         [--out benchmarks/results/node_durability] [--scenarios crash,fleet]

Only real components: the node runs as its own process (`python -m cxr_edge.cli node`, in its own process group so
its decode workers die with it), DCMTK's `/usr/bin/storescu` plays the X-ray room (never the venv's pynetdicom
`storescu`, which comes first on PATH), the job store is the node's SQLite file or a real PostgreSQL server
(tests/pg_server.py starts a throwaway one when no --pg-url is given). Test instances come from
tests/dicom_studies.py::make_frontal_instances and are written under a temporary folder, never in the repository.

Scenarios (each usable from a pytest test: it returns a dict of counts and a list of `problems`; the caller asserts):

* crash_and_resend: one node on SQLite; storescu sends n instances; after a random number of acknowledged
  instances the node's process group gets SIGKILL; the node restarts with the same --data and --node-id; the
  instances storescu saw no success for are sent again, plus a few that were acknowledged (duplicates must be
  harmless). Repeated `kills` times, then a last round without a kill. Checked from the job store and the audit
  export (`cxr-edge audit --format json`): every sent SOP Instance UID has exactly one job, in state screened, with
  one result (for that instance) and exactly one 'screened' audit record.
* two_nodes_one_store: two nodes, different --node-id and ports, the same --data folder with --shared-storage and
  one PostgreSQL store, so their claims genuinely race; two storescu processes send half the instances each (plus a
  few to both nodes) at the same time. Checked from PostgreSQL: no instance screened twice, none lost, and how many
  jobs each node screened, including jobs received by the other node.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
STORESCU = "/usr/bin/storescu"  # DCMTK; the venv's pynetdicom ships a `storescu` of its own earlier on PATH
UNFINISHED = ("received", "screening")
_SENDING = re.compile(r"Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")
_FAILED = re.compile(r"Store Failed, file: (.+?):?\s*$")


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[2]) == pgid and f[0] != "Z":
            out.append(int(d.name))
    return out


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 30.0) -> int:
    """Signal a process's whole group (it was started with start_new_session=True), reap it, and return how
    many of the group's processes were still alive 5 s after SIGKILL (0 expected)."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=30)
    if sig != signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # whatever of the group outlived a graceful stop
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(_group_alive(pgid))


# ---------------------------------------------------------------------------------------------------- the node
class Node:
    """`cxr-edge node` as its own process group on 127.0.0.1; restartable with the same flags."""

    def __init__(self, artifact: Path, data: Path, node_id: str, *, store: str | None = None, shared_storage: bool = False,
                 stable_after: float = 2.0, log_dir: Path):
        self.dicom_port, self.http_port = _port(), _port()
        self.node_id, self.data, self.log_dir = node_id, data, log_dir
        self.cmd = [sys.executable, "-m", "cxr_edge.cli", "node", str(artifact), "--data", str(data), "--allow-any-caller",
                    "--dicom-port", str(self.dicom_port), "--port", str(self.http_port), "--tuning", "off",
                    "--node-id", node_id, "--stable-after", str(stable_after)]
        if store:
            self.cmd += ["--store", store]
        if shared_storage:
            self.cmd += ["--shared-storage"]
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.leftovers = 0  # processes of a killed node's group found alive after SIGKILL

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait for /readyz; returns seconds from launch to ready."""
        self.starts += 1
        t0 = time.monotonic()
        with open(self.log_dir / f"{self.node_id}.start{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=str(self.log_dir))
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {self.node_id} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.leftovers += _kill_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                _kill_group(self.proc, signal.SIGTERM, wait_s=60)
            else:  # the main process is gone; its group may not be
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        p = self.log_dir / f"{self.node_id}.start{self.starts}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"


# ------------------------------------------------------------------------------------------------- the sender
class Send:
    """One `/usr/bin/storescu -v` run over a list of files, its output parsed as it comes: which file got a
    success response, which got another status. ``on_ack(count)`` is called after each success."""

    def __init__(self, files: list[Path], port: int, log: Path, on_ack: Callable[[int], None] | None = None, ae: str = "XRAY1"):
        self.cmd = [STORESCU, "-v", "-aet", ae, "-aec", "CXREDGE", "-nh", "localhost", str(port)] + [str(f) for f in files]
        self.log, self.on_ack = log, on_ack
        self.acked: list[Path] = []
        self.sent: list[Path] = []
        self.other: dict[str, str] = {}  # file -> non-success status text
        self.failed: list[Path] = []  # files whose send broke off (no response: the association was gone)
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.rc: int | None = None

    def start(self) -> Send:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, text=True, errors="replace")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        current: Path | None = None
        with open(self.log, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                m = _SENDING.search(line)
                if m:
                    current = Path(m.group(1))
                    self.sent.append(current)
                    continue
                m = _FAILED.search(line)
                if m:
                    self.failed.append(Path(m.group(1)))
                    current = None
                    continue
                m = _RESPONSE.search(line)
                if m and current is not None:
                    if m.group(1).strip() == "Success":
                        self.acked.append(current)
                        if self.on_ack:
                            self.on_ack(len(self.acked))
                    else:
                        self.other[str(current)] = m.group(1)
                    current = None

    def wait(self, timeout_s: float = 600.0) -> Send:
        assert self.proc is not None and self.thread is not None
        try:
            self.rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            self.rc = self.proc.returncode
        self.thread.join(timeout=30)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc)


# ------------------------------------------------------------------------------------------------- the stores
class Sqlite:
    """The node's SQLite job store, read-only (never written by this script)."""

    def __init__(self, data: Path):
        self.path = data / "jobs.sqlite"

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


class Postgres:
    def __init__(self, url: str):
        self.url = url

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()


def _unfinished(db) -> int:
    return int(db.query("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'screening')")[0][0])


def _wait_drained(db, expect_jobs: int | None, timeout_s: float = 600.0, alive: Callable[[], bool] = lambda: True) -> float:
    """Seconds until no job is received/screening (and, if given, at least `expect_jobs` jobs exist)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not alive():
            raise RuntimeError("a node died while its queue drained")
        try:
            total = int(db.query("SELECT COUNT(*) FROM jobs")[0][0])
            if _unfinished(db) == 0 and (expect_jobs is None or total >= expect_jobs):
                return time.monotonic() - t0
        except (sqlite3.OperationalError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"jobs still unfinished after {timeout_s:.0f} s")


def _wait_studies(db, timeout_s: float = 60.0) -> None:
    """Studies complete --stable-after s after their last instance (the node's study loop)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and db.query("SELECT COUNT(*) FROM studies WHERE state <> 'complete'")[0][0]:
        time.sleep(0.2)


def _audit_export(data: Path | None = None, store: str | None = None, log_dir: Path | None = None) -> list[dict]:
    """The audit trail as `cxr-edge audit --format json` exports it."""
    src = ["--store", store] if store else ["--data", str(data)]
    out = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "audit", *src, "--format", "json"], capture_output=True,
                         text=True, timeout=300, check=False, cwd=str(log_dir or tempfile.gettempdir()))
    if out.returncode != 0:
        raise RuntimeError(f"cxr-edge audit failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _verify(db, audit: list[dict], sop_of: dict[Path, str], acked: set[Path]) -> dict[str, Any]:
    """Every sent instance: one job, screened, one result for that instance, one 'screened' audit record."""
    sent = set(sop_of.values())
    rows = db.query("SELECT sop_instance_uid, state, result, holder, claimed_by, attempts FROM jobs")
    jobs: dict[str, list[tuple]] = {}
    for r in rows:
        jobs.setdefault(r[0], []).append(r)
    screened_audit: dict[str, int] = {}
    for rec in audit:
        if rec["event"] == "screened":
            screened_audit[rec["sop_instance_uid"]] = screened_audit.get(rec["sop_instance_uid"], 0) + 1
    acked_uids = {sop_of[f] for f in acked}
    wrong_result = 0
    for uid in sent:
        for r in jobs.get(uid, []):
            res = json.loads(r[2]) if r[2] else None
            if res is not None and res.get("source") != uid:
                wrong_result += 1
    studies = {}
    for rec in audit:
        if rec["event"] == "study_complete":
            studies[rec["study_uid"]] = studies.get(rec["study_uid"], 0) + 1
    return {
        "sent_instances": len(sent),
        "acknowledged_instances": len(acked_uids),
        "never_acknowledged": len(sent - acked_uids),
        "lost": sum(1 for u in acked_uids if u not in jobs),
        "jobs_missing_for_sent": sum(1 for u in sent if u not in jobs),
        "job_rows_more_than_one": sum(1 for u in sent if len(jobs.get(u, [])) > 1),
        "not_screened": sum(1 for u in sent if any(r[1] != "screened" for r in jobs.get(u, [])) or u not in jobs),
        "failed": sum(1 for u in sent for r in jobs.get(u, []) if r[1] == "failed"),
        "without_result": sum(1 for u in sent for r in jobs.get(u, []) if r[1] == "screened" and not r[2]),
        "result_for_other_instance": wrong_result,
        "screened_twice": sum(1 for u in sent if screened_audit.get(u, 0) > 1),
        "screened_audit_missing": sum(1 for u in sent if screened_audit.get(u, 0) == 0),
        "screened_audit_records": sum(screened_audit.get(u, 0) for u in sent),
        "duplicate_audit_records": sum(1 for rec in audit if rec["event"] == "duplicate"),
        "jobs_screened_more_than_once_started": sum(1 for r in rows if r[5] > 1),
        "studies_completed": len(studies),
        "studies_completed_twice": sum(1 for v in studies.values() if v > 1),
        "studies_not_completed": int(db.query("SELECT COUNT(*) FROM studies WHERE state <> 'complete'")[0][0]),
        "jobs_by_state": {s: sum(1 for r in rows if r[1] == s) for s in sorted({r[1] for r in rows})},
    }


def _orphans(data: Path, db) -> dict[str, int]:
    """Instance files left on disk that no unfinished job points to (received pixels are deleted after screening,
    so anything left is a file the node wrote but never committed, or a .part from a write cut short)."""
    paths = {r[0] for r in db.query("SELECT path FROM jobs WHERE path IS NOT NULL")}
    files = [p for p in (data / "instances").rglob("*") if p.is_file()]
    return {"orphan_instance_files": sum(1 for p in files if p.suffix == ".dcm" and str(p) not in paths),
            "partial_files": sum(1 for p in files if p.suffix == ".part")}


def _problems(v: dict[str, Any], extra: dict[str, int] | None = None) -> list[str]:
    must_be_zero = ("never_acknowledged", "lost", "jobs_missing_for_sent", "job_rows_more_than_one", "not_screened",
                    "failed", "without_result", "result_for_other_instance", "screened_twice", "screened_audit_missing",
                    "studies_completed_twice", "studies_not_completed")
    out = [f"{k} = {v[k]}" for k in must_be_zero if v.get(k)]
    out += [f"{k} = {n}" for k, n in (extra or {}).items() if n]
    return out


# ------------------------------------------------------------------------------------------- test material
def make_test_files(out_dir: Path, n: int, seed: int) -> dict[Path, str]:
    """n screenable frontal DX instances under out_dir: file -> SOP Instance UID."""
    _tests_on_path()
    from dicom_studies import make_frontal_instances

    out_dir.mkdir(parents=True, exist_ok=True)
    return {Path(i.path).resolve(): i.sop_instance_uid for i in make_frontal_instances(out_dir, n, seed=seed, max_side=512)}


def tiny_artifact(out_dir: Path) -> Path:
    """The tests' tiny Grad-CAM model, exported as fp32 + int8-cpu; its int8-cpu artifact."""
    _tests_on_path()
    from tiny_models import write_artifact_set

    write_artifact_set(out_dir, variants=("fp32", "int8-cpu"))
    return out_dir / "model.int8-cpu.onnx"


# ----------------------------------------------------------------------------------------- scenario 1: crash
def crash_and_resend(n: int = 300, kills: int = 2, *, seed: int = 0, artifact: Path | None = None,
                     files: dict[Path, str] | None = None, work: Path | None = None, duplicates_per_resend: int = 5,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """SIGKILL the node `kills` times while storescu sends, restart it (same --data and --node-id), resend what was
    not acknowledged plus a few that were. Returns counts; `problems` lists every count that must be 0 and is not."""
    rng = random.Random(seed)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cxr-durability-crash-")) if work is None else work
    node: Node | None = None
    sends: list[Send] = []
    try:
        if artifact is None:
            artifact = tiny_artifact(work / "artifact")
        if files is None:
            files = make_test_files(work / "dicom", n, seed)
        order = sorted(files)
        data = work / "crash-data"
        node = Node(artifact, data, "crash-node", log_dir=work)
        db = Sqlite(data)
        first_ready = node.start()
        acked: set[Path] = set()
        rounds: list[dict[str, Any]] = []
        t_all = time.monotonic()
        for r in range(kills + 1):
            pending = [f for f in order if f not in acked]
            dups = rng.sample(sorted(acked), min(duplicates_per_resend, len(acked))) if r else []
            batch = dups + pending  # the deliberate duplicates go first, so they are sent before any kill
            kill_at = rng.randint(max(1, len(batch) // 10), max(1, (len(batch) * 2) // 3)) if r < kills else None
            killed = threading.Event()

            delay = rng.uniform(0.0, 0.05)  # after the ack: the next instance is somewhere between decode and commit

            def on_ack(count: int, kill_at=kill_at, killed=killed, delay=delay) -> None:
                if kill_at is not None and count >= kill_at and not killed.is_set():
                    killed.set()
                    time.sleep(delay)
                    node.kill9()

            s = Send(batch, node.dicom_port, work / f"storescu.round{r}.log", on_ack)
            sends.append(s)
            t0 = time.monotonic()
            s.start().wait()
            send_s = time.monotonic() - t0
            round_acked = set(s.acked)
            in_flight = [f for f in s.sent if f not in round_acked]
            row: dict[str, Any] = {"round": r, "to_send": len(batch), "deliberate_duplicates": len(dups),
                                   "kill_after_acks": kill_at, "acknowledged": len(round_acked),
                                   "sent_not_acknowledged": len(in_flight), "other_status": len(s.other),
                                   "in_transit_at_kill": s.failed[0].name if s.failed else None,
                                   "kill_delay_ms": round(1e3 * delay, 1) if kill_at is not None else None,
                                   "storescu_rc": s.rc, "send_s": round(send_s, 2)}
            acked |= round_acked
            if kill_at is not None:
                if not killed.is_set():
                    raise RuntimeError(f"round {r}: storescu finished before the planned kill ({kill_at} acks)")
                known = {x[0] for x in db.query("SELECT sop_instance_uid FROM jobs")}
                row["committed_but_unacknowledged"] = sum(1 for f in in_flight if files[f] in known)
                row["in_transit_committed"] = bool(s.failed) and files.get(s.failed[0]) in known
                row["unfinished_jobs_at_kill"] = _unfinished(db)
                row["jobs_at_kill"] = len(known)
                last_audit = int(db.query("SELECT COALESCE(MAX(id), 0) FROM audit")[0][0])
                t_restart = time.monotonic()
                row["restart_to_ready_s"] = round(node.start(), 2)
                node_alive = lambda: node.proc is not None and node.proc.poll() is None
                _wait_drained(db, None, alive=node_alive)
                row["restart_to_drained_s"] = round(time.monotonic() - t_restart, 2)
                resumed = db.query("SELECT detail FROM audit WHERE event = 'resumed' AND id > ?", (last_audit,))
                row["resumed_by_restart"] = sum(json.loads(d[0])["jobs"] for d in resumed if d[0])
            log(f"round {r}: {json.dumps(row)}")
            rounds.append(row)
        node_alive = lambda: node.proc is not None and node.proc.poll() is None
        drain_s = _wait_drained(db, len(files), alive=node_alive)
        total_s = time.monotonic() - t_all
        _wait_studies(db)
        audit = _audit_export(data=data, log_dir=work)
        node.stop()
        v = _verify(db, audit, files, acked)
        orphans = _orphans(data, db)
        resumed_total = sum(json.loads(d[0])["jobs"] for d in db.query("SELECT detail FROM audit WHERE event = 'resumed'")
                            if d[0])
        kills_rows = [x for x in rounds if x["kill_after_acks"] is not None]
        out = {
            "scenario": "crash_and_resend", "n": len(files), "kills": kills, "seed": seed,
            "acknowledged_before_kill": [x["acknowledged"] for x in kills_rows],
            "sent_not_acknowledged_at_kill": [x["sent_not_acknowledged"] for x in kills_rows],
            "committed_but_unacknowledged_at_kill": [x["committed_but_unacknowledged"] for x in kills_rows],
            "kill_delay_after_ack_ms": [x["kill_delay_ms"] for x in kills_rows],
            "unfinished_jobs_at_kill": [x["unfinished_jobs_at_kill"] for x in kills_rows],
            "resent": sum(x["to_send"] - x["deliberate_duplicates"] for x in rounds[1:]),
            "resent_distinct_files": len(files) - rounds[0]["acknowledged"],
            "deliberate_duplicates_resent": sum(x["deliberate_duplicates"] for x in rounds),
            "duplicates_acknowledged": v["duplicate_audit_records"],
            "resumed_jobs_total": resumed_total,
            "restart_to_ready_s": [x["restart_to_ready_s"] for x in kills_rows],
            "restart_to_drained_s": [x["restart_to_drained_s"] for x in kills_rows],
            "first_start_to_ready_s": round(first_ready, 2),
            "final_drain_s": round(drain_s, 2), "total_s": round(total_s, 2),
            "node_processes_alive_after_sigkill": node.leftovers,
            "rounds": rounds, **v, **orphans,
        }
        out["problems"] = _problems(v, {"node_processes_alive_after_sigkill": node.leftovers,
                                        "other_status_responses": sum(x["other_status"] for x in rounds)})
        return out
    finally:
        for s in sends:
            s.kill()
        if node is not None:
            node.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------- scenario 2: fleet
def two_nodes_one_store(pg_url: str | None = None, n: int = 300, *, seed: int = 0, artifact: Path | None = None,
                        files: dict[Path, str] | None = None, work: Path | None = None, overlap: int = 10,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Two nodes (same --data with --shared-storage, one PostgreSQL store, different --node-id and ports); two
    storescu send half the instances each, and `overlap` instances to both, at the same time. Returns counts."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cxr-durability-fleet-")) if work is None else work
    nodes: list[Node] = []
    sends: list[Send] = []
    stack = contextlib.ExitStack()
    try:
        if pg_url is None:
            _tests_on_path()
            from pg_server import running_postgres

            pg_url = stack.enter_context(running_postgres(work / "pg"))
        if artifact is None:
            artifact = tiny_artifact(work / "artifact")
        if files is None:
            files = make_test_files(work / "dicom", n, seed)
        order = sorted(files)
        data = work / "fleet-data"
        db = Postgres(pg_url)
        nodes = [Node(artifact, data, f"fleet-{k}", store=pg_url, shared_storage=True, log_dir=work) for k in ("a", "b")]
        ready = [nd.start() for nd in nodes]
        half = len(order) // 2
        ov = order[half - overlap // 2: half + (overlap - overlap // 2)] if overlap else []
        parts = [order[:half] + [f for f in ov if f not in order[:half]], order[half:] + [f for f in ov if f not in order[half:]]]
        t0 = time.monotonic()
        sends = [Send(p, nd.dicom_port, work / f"storescu.{nd.node_id}.log", ae=f"XRAY{k + 1}")
                 for k, (p, nd) in enumerate(zip(parts, nodes))]
        for s in sends:
            s.start()
        for s in sends:
            s.wait()
        send_s = time.monotonic() - t0
        alive = lambda: all(nd.proc is not None and nd.proc.poll() is None for nd in nodes)
        _wait_drained(db, len(files), alive=alive)
        drain_s = time.monotonic() - t0
        _wait_studies(db)  # both nodes race to complete each study, too
        audit = _audit_export(store=pg_url, log_dir=work)
        for nd in nodes:
            nd.stop()
        acked = set().union(*(set(s.acked) for s in sends))
        v = _verify(db, audit, files, acked)
        per_node = {}
        for nd in nodes:
            screened_by = db.query("SELECT COUNT(*) FROM jobs WHERE state = 'screened' AND claimed_by = ?", (nd.node_id,))[0][0]
            received_by = db.query("SELECT COUNT(*) FROM jobs WHERE holder = ?", (nd.node_id,))[0][0]
            cross = db.query("SELECT COUNT(*) FROM jobs WHERE state = 'screened' AND claimed_by = ? AND holder <> ?",
                             (nd.node_id, nd.node_id))[0][0]
            audit_screened = sum(1 for r in audit if r["event"] == "screened" and r["node"] == nd.node_id)
            per_node[nd.node_id] = {"received": int(received_by), "screened": int(screened_by),
                                    "screened_of_other_nodes_receipts": int(cross), "screened_audit_records": audit_screened,
                                    "acknowledged": len(sends[nodes.index(nd)].acked), "start_to_ready_s": round(ready[nodes.index(nd)], 2)}
        pg_version = db.query("SHOW server_version")[0][0]
        out = {"scenario": "two_nodes_one_store", "n": len(files), "seed": seed, "overlap_sent_to_both": len(ov),
               "sent_per_node": [len(p) for p in parts], "per_node": per_node, "send_s": round(send_s, 2),
               "send_to_drained_s": round(drain_s, 2), "postgresql": pg_version,
               "lost_claims_logged": sum(nd.log_tail(10**6).count("another node took it") for nd in nodes),
               **v, **_orphans(data, db)}
        both = all(p["screened"] > 0 for p in per_node.values())
        out["both_nodes_screened"] = both
        out["problems"] = _problems(v, {"other_status_responses": sum(len(s.other) for s in sends)})
        if not both:
            out["problems"].append("one node screened nothing: the race was not exercised")
        return out
    finally:
        for s in sends:
            s.kill()
        for nd in nodes:
            nd.stop()
        stack.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reporting
def _versions(pg_url: str | None) -> dict[str, str | None]:
    import importlib.metadata as md

    def first_line(cmd: list[str]) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    pg_bin = None
    with contextlib.suppress(Exception):
        _tests_on_path()
        from pg_server import postgres_binaries

        b = postgres_binaries()
        pg_bin = first_line([str(b / "postgres"), "--version"]) if b else None
    vers = {"python": platform.python_version(), "dcmtk_storescu": first_line([STORESCU, "--version"]),
            "postgresql_server_binaries": pg_bin}
    for pkg in ("cxr-edge", "pynetdicom", "pydicom", "psycopg", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            vers[pkg] = md.version(pkg)
    return vers


def _machine() -> dict[str, Any]:
    try:
        from cxr_edge.machine import machine_facts

        return machine_facts().to_dict()
    except Exception as exc:
        return {"cpu": platform.processor(), "cores": os.cpu_count(), "error": str(exc)}


def write_report(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    m, v, a = doc["machine"], doc["versions"], doc["artifact"]
    lines = ["# Node durability: SIGKILL + resend, and two nodes on one PostgreSQL store", "",
             f"Date {doc['date']}. Command: `{doc['command']}`", "",
             f"Machine: {m.get('cpu')}, {m.get('usable_cores', m.get('cores'))} usable cores ({m.get('isa', '')}); "
             f"other work was running on it. Versions: cxr-edge {v.get('cxr-edge')}, pynetdicom {v.get('pynetdicom')}, "
             f"pydicom {v.get('pydicom')}, psycopg {v.get('psycopg')}, onnxruntime {v.get('onnxruntime')}, "
             f"DCMTK `{v.get('dcmtk_storescu')}`, PostgreSQL `{v.get('postgresql_server_binaries')}`, Python {v.get('python')}.", "",
             f"Artifact: `{a['name']}` ({a['kind']}), sha256 `{a['sha256']}`.", "",
             "Real components only: `cxr-edge node` as its own process group (SIGKILL goes to the whole group, decode "
             "workers included), DCMTK `/usr/bin/storescu -v` as the X-ray room (acknowledgements parsed from its "
             "`Received Store Response (Success)` lines), the node's SQLite store or a real PostgreSQL server. "
             "Verification reads the job store and the audit export of `cxr-edge audit --format json`.", ""]
    c = doc["scenarios"].get("crash")
    if c:
        lines += ["## 1. crash_and_resend (SQLite store, one node, SIGKILL mid-send, restart, resend)", "",
                  f"{c['n']} instances, {c['kills']} kill(s), seed {c['seed']}.", "",
                  "| round | to send | of which deliberate duplicates | killed after acks (+ delay ms) | acknowledged | "
                  "no success (cut off, then failed fast) | of those already committed | jobs unfinished at kill | "
                  "restart to ready s | restart to backlog drained s | send s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["rounds"]:
            k = f"{r['kill_after_acks']} (+{r['kill_delay_ms']})" if r["kill_after_acks"] else "-"
            lines.append(f"| {r['round']} | {r['to_send']} | {r['deliberate_duplicates']} | {k} | "
                         f"{r['acknowledged']} | {r['sent_not_acknowledged']} | {r.get('committed_but_unacknowledged', '-')} | "
                         f"{r.get('unfinished_jobs_at_kill', '-')} | {r.get('restart_to_ready_s', '-')} | "
                         f"{r.get('restart_to_drained_s', '-')} | {r['send_s']} |")
        lines += ["", "| check | value |", "|---|---|"]
        for k in ("acknowledged_before_kill", "resent", "resent_distinct_files", "deliberate_duplicates_resent", "duplicates_acknowledged",
                  "resumed_jobs_total", "lost", "never_acknowledged", "screened_twice", "job_rows_more_than_one",
                  "screened_audit_missing", "not_screened", "failed", "result_for_other_instance",
                  "jobs_screened_more_than_once_started", "restart_to_ready_s", "restart_to_drained_s", "final_drain_s",
                  "node_processes_alive_after_sigkill", "committed_but_unacknowledged_at_kill", "orphan_instance_files",
                  "partial_files", "studies_completed", "studies_completed_twice", "studies_not_completed", "problems"):
            lines.append(f"| {k} | {c[k]} |")
        lines += [""]
    f = doc["scenarios"].get("fleet")
    if f:
        lines += ["## 2. two_nodes_one_store (PostgreSQL, same --data with --shared-storage, claims race)", "",
                  f"{f['n']} instances, half to each node at once by two storescu, {f['overlap_sent_to_both']} sent to both; "
                  f"PostgreSQL server {f['postgresql']}.", "",
                  "| node | acknowledged | received (holder) | screened | screened of the other node's receipts | "
                  "'screened' audit records | start to ready s |", "|---|---|---|---|---|---|---|"]
        for name, p in f["per_node"].items():
            lines.append(f"| {name} | {p['acknowledged']} | {p['received']} | {p['screened']} | "
                         f"{p['screened_of_other_nodes_receipts']} | {p['screened_audit_records']} | {p['start_to_ready_s']} |")
        lines += ["", "| check | value |", "|---|---|"]
        for k in ("lost", "never_acknowledged", "screened_twice", "job_rows_more_than_one", "screened_audit_missing",
                  "not_screened", "failed", "result_for_other_instance", "duplicate_audit_records", "lost_claims_logged",
                  "both_nodes_screened", "studies_completed", "studies_completed_twice", "studies_not_completed", "send_s",
                  "send_to_drained_s",
                  "orphan_instance_files", "problems"):
            lines.append(f"| {k} | {f[k]} |")
        lines += [""]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {x}" for x in doc["notes"]] + [""]
    (out / "results.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", help="artifact to screen with (default: the tests' tiny int8-cpu model, built in a temp dir)")
    ap.add_argument("--pg-url", help="PostgreSQL for the fleet scenario (default: a throwaway server, tests/pg_server.py)")
    ap.add_argument("--out", default="benchmarks/results/node_durability")
    ap.add_argument("--scenarios", default="crash,fleet")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data) for inspection")
    a = ap.parse_args()
    chosen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if not Path(STORESCU).exists():
        print(f"{STORESCU} (DCMTK) is missing: apt-get install dcmtk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cxr-durability-"))
    try:
        if a.artifact:
            artifact, kind = Path(a.artifact).resolve(), "given"
        else:
            artifact, kind = tiny_artifact(work / "artifact"), "tiny test model (tests/tiny_models.py), int8-cpu"
        files = make_test_files(work / "dicom", a.n, a.seed)
        doc: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "machine": _machine(), "versions": _versions(a.pg_url),
            "artifact": {"name": artifact.name, "path": str(artifact) if a.artifact else None, "kind": kind,
                         "sha256": _sha256(artifact)},
            "scenarios": {}, "notes": []}
        if "crash" in chosen:
            (work / "crash").mkdir()
            doc["scenarios"]["crash"] = crash_and_resend(a.n, a.kills, seed=a.seed, artifact=artifact, files=files,
                                                         work=work / "crash")
        if "fleet" in chosen:
            (work / "fleet").mkdir()
            doc["scenarios"]["fleet"] = two_nodes_one_store(a.pg_url, a.n, seed=a.seed, artifact=artifact, files=files,
                                                            work=work / "fleet")
        c = doc["scenarios"].get("crash")
        if c:
            doc["notes"].append(
                f"Recovery time is measured from the restart's launch: to /readyz 200, then to no job left in received/"
                f"screening. The backlog at each kill was {c['unfinished_jobs_at_kill']} job(s) (screening keeps up with one "
                "storescu on this model), so the recovery time is the node's start-up time; "
                f"{c['resumed_jobs_total']} claimed job(s) were put back by a restart (audit event 'resumed').")
            doc["notes"].append(
                f"Instances committed by the node but cut off before storescu saw the success, per kill: "
                f"{c['committed_but_unacknowledged_at_kill']}; their resend was acknowledged as a duplicate and not "
                f"screened again (duplicates acknowledged {c['duplicates_acknowledged']} = "
                f"{c['deliberate_duplicates_resent']} deliberate + {sum(c['committed_but_unacknowledged_at_kill'])} such).")
            doc["notes"].append("After a kill storescu goes on through its list and every remaining file fails at once "
                                "(\"Store Failed ... Peer aborted Association\"); those are the 'no success' column, "
                                "resent in the next round.")
        f = doc["scenarios"].get("fleet")
        if f:
            doc["notes"].append("Fleet: the receiving node is woken by its own intake, the other polls every 0.5 s, so "
                                "each node screens mostly its own receipts; 'screened of the other node's receipts' > 0 "
                                "shows the claims on one PostgreSQL store really raced (FOR UPDATE SKIP LOCKED).")
        write_report(Path(a.out), doc)
        print((Path(a.out) / "results.md").read_text())
        bad = {k: v["problems"] for k, v in doc["scenarios"].items() if v["problems"]}
        if bad:
            print(f"PROBLEMS: {bad}", file=sys.stderr)
        return 1 if bad else 0
    finally:
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
