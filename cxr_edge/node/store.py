"""The durable job store: one row per received instance, one per study, and the append-only audit trail.

SQLite (WAL, ``synchronous=FULL``) under the node's data folder by default; PostgreSQL by URL for a fleet of
nodes sharing one store. Work is handed out by *row claims* (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
single-writer lock on SQLite) with a claim token that the result must present: two nodes never both record
a result for one job, even when one of them outlives its lease. Plain DB-API (sqlite3, psycopg 3) rather
than an ORM: a dozen statements, two dialects, and nothing more to install on a Jetson.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..extras import require

#: job states
RECEIVED, SCREENING, SCREENED, FAILED, SKIPPED = "received", "screening", "screened", "failed", "skipped"
STATES = (RECEIVED, SCREENING, SCREENED, FAILED, SKIPPED)
#: a job that started screening this many times without finishing (a node killed by it each time) fails
MAX_ATTEMPTS = 3

_JOB_COLUMNS = ("id", "sop_instance_uid", "study_uid", "series_uid", "sop_class_uid", "transfer_syntax", "source",
                "holder", "path", "size", "sha256", "state", "reason", "view", "received_at", "claimed_by",
                "claimed_at", "attempts", "screened_at", "result", "overlay_path", "patient_id")


def _schema(pg: bool) -> list[str]:
    key = "BIGSERIAL PRIMARY KEY" if pg else "INTEGER PRIMARY KEY AUTOINCREMENT"
    real = "DOUBLE PRECISION" if pg else "REAL"
    stmts = [
        f"""CREATE TABLE IF NOT EXISTS jobs (
            id {key}, sop_instance_uid TEXT NOT NULL UNIQUE, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
            sop_class_uid TEXT, transfer_syntax TEXT, source TEXT NOT NULL, holder TEXT NOT NULL, path TEXT,
            size BIGINT, sha256 TEXT, state TEXT NOT NULL, reason TEXT, view TEXT, received_at {real} NOT NULL,
            claimed_by TEXT, claim_token TEXT, claimed_at {real}, attempts INTEGER NOT NULL DEFAULT 0,
            screened_at {real}, result TEXT, overlay_path TEXT, patient_id TEXT)""",
        "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id)",
        "CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid)",
        "CREATE INDEX IF NOT EXISTS jobs_received ON jobs (received_at)",
        f"""CREATE TABLE IF NOT EXISTS studies (
            study_uid TEXT PRIMARY KEY, first_arrival {real} NOT NULL, last_arrival {real} NOT NULL,
            instances INTEGER NOT NULL, state TEXT NOT NULL, completed_at {real}, completed_by TEXT, summary TEXT)""",
        # the completion pass looks for studies still receiving, every second: an index, not a scan of all studies
        "CREATE INDEX IF NOT EXISTS studies_open ON studies (state, last_arrival)",
        f"""CREATE TABLE IF NOT EXISTS audit (
            id {key}, at {real} NOT NULL, event TEXT NOT NULL, node TEXT NOT NULL, source TEXT,
            study_uid TEXT, series_uid TEXT, sop_instance_uid TEXT, job_id BIGINT, detail TEXT)""",
        # the outbox: one row per result object per destination, committed with the result, sent after the commit
        f"""CREATE TABLE IF NOT EXISTS outbox (
            id {key}, job_id BIGINT NOT NULL, study_uid TEXT NOT NULL, kind TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, destination TEXT NOT NULL, holder TEXT NOT NULL,
            path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at {real} NOT NULL,
            last_error TEXT, claimed_by TEXT, claim_token TEXT, claimed_at {real}, created_at {real} NOT NULL,
            delivered_at {real}, UNIQUE (sop_instance_uid, destination))""",
        "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at)",
        "CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id)",
        "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
        "CREATE INDEX IF NOT EXISTS audit_study ON audit (study_uid)",
    ]
    if pg:  # append-only: the database itself refuses to change or remove an audit record
        stmts += [
            """CREATE OR REPLACE FUNCTION cxr_audit_append_only() RETURNS trigger AS $$
               BEGIN RAISE EXCEPTION 'audit records are append-only'; END; $$ LANGUAGE plpgsql""",
            "DROP TRIGGER IF EXISTS audit_append_only ON audit",
            """CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
               FOR EACH ROW EXECUTE FUNCTION cxr_audit_append_only()""",
        ]
    else:
        stmts += [
            """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
               BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
            """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
               BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
        ]
    return stmts


@dataclass(frozen=True)
class Job:
    """One received instance and what became of it."""

    id: int
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str | None
    transfer_syntax: str | None
    source: str
    holder: str
    path: str | None
    size: int | None
    sha256: str | None
    state: str
    reason: str | None
    view: str | None
    received_at: float
    claimed_by: str | None
    claimed_at: float | None
    attempts: int
    screened_at: float | None
    result: dict[str, Any] | None
    overlay_path: str | None
    patient_id: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Job:
        values = dict(zip(_JOB_COLUMNS, row))
        values["result"] = json.loads(values["result"]) if values["result"] else None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs`` shows it: times in UTC ISO 8601, the decision flattened for worklists."""
        r = self.result or {}
        decision = r.get("decision") or {}
        explanation = r.get("explanation") or {}
        probs = r.get("probabilities") or {}
        return {"id": self.id, "study_uid": self.study_uid, "series_uid": self.series_uid,
                "sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid,
                "transfer_syntax": self.transfer_syntax, "state": self.state, "reason": self.reason,
                "view": self.view, "source": self.source, "received_at": iso(self.received_at),
                "screened_at": iso(self.screened_at), "attempts": self.attempts, "label": r.get("label"),
                "p_covid": probs.get("COVID"), "threshold": r.get("threshold"),
                "borderline": decision.get("borderline"), "weak_map": explanation.get("weak"),
                "has_overlay": bool(self.overlay_path), "result": self.result}


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def parse_time(text: str) -> float:
    """An ISO 8601 time (``2026-12-04T10:00:00Z``, a date, or with an offset) as epoch seconds; naive = UTC."""
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not an ISO 8601 time (e.g. 2026-12-04T10:00:00Z or 2026-12-04)") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@dataclass(frozen=True)
class Claim:
    """A job handed to one screening worker: the token its result must present."""

    job: Job
    token: str


class JobStore:
    """Jobs, studies and audit records in SQLite or PostgreSQL (``sqlite:///path`` or ``postgresql://...``).

    Connections come from a pool: a transaction borrows one and gives it back. Not one per thread: pynetdicom
    serves each association in a thread of its own, so a connection per thread (never closed) leaked three file
    descriptors (database, WAL, shared memory) per association, and a node that had taken a few hundred
    associations ran out of them. Every write is a short transaction committed before the caller acknowledges
    anything.
    """

    def __init__(self, url: str, node_id: str):
        self.url, self.node_id = url, node_id
        self.path: Path | None = None
        if url.startswith("sqlite:///"):
            self.pg, self.path = False, Path(url[len("sqlite:///"):])
        elif url.startswith(("postgresql://", "postgres://")):
            self.pg, self.path = True, None
            require("psycopg")
        else:
            raise ConfigError(f"job store URL {url!r}: use sqlite:///PATH (the default, under --data) or "
                              "postgresql://USER@HOST:PORT/DB")
        self._idle: list[Any] = []  # connections no transaction is using
        self._all: list[Any] = []
        self._lock = threading.Lock()

    # ---- connections
    def _connect(self):
        if self.pg:
            psycopg = require("psycopg")
            return psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit is fsynced before it returns
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _conn(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = self._connect()
        with self._lock:
            self._all.append(conn)
        return conn

    def _release(self, conn) -> None:
        with self._lock:
            if conn in self._all:  # (not one closed by close() meanwhile)
                self._idle.append(conn)

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.pg else text

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one committed-or-rolled-back transaction (BEGIN IMMEDIATE on SQLite: writers queue
        at the start, never deadlock half way). A broken connection is dropped, so the next call reconnects."""
        conn = self._conn()
        try:
            if self.pg:
                cur = conn.cursor()
            else:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.cursor()
            yield _Cursor(cur, self._sql)
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                self._drop(conn)
                raise
            self._release(conn)
            raise
        self._release(conn)

    def _drop(self, conn) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def migrate(self) -> JobStore:
        """Create the tables (idempotent; several nodes may start at once on one PostgreSQL store)."""
        with self.transaction() as cur:
            if self.pg:  # one node creates the schema at a time
                cur.execute("SELECT pg_advisory_xact_lock(4242)")
            for stmt in _schema(self.pg):
                cur.execute(stmt)
        return self

    def close(self) -> None:
        with self._lock:
            conns, self._all, self._idle = self._all, [], []
        for c in conns:
            try:
                c.close()
            except Exception:
                pass

    def describe(self) -> str:
        """The store for logs, without a password."""
        if not self.pg:
            return f"SQLite {self.path}"
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        return f"PostgreSQL {u.hostname}:{u.port or 5432}{u.path}"

    # ---- intake
    def add_job(self, cur, *, sop_instance_uid: str, study_uid: str, series_uid: str, sop_class_uid: str | None,
                transfer_syntax: str | None, source: str, path: str | None, size: int | None, sha256: str | None,
                state: str, reason: str | None, view: str | None, received_at: float,
                patient_id: str | None = None) -> int | None:
        """Insert one job in the caller's transaction; None when the instance is already known (a resend)."""
        cur.execute("""INSERT INTO jobs (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, source,
                       holder, path, size, sha256, state, reason, view, received_at, patient_id)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id""",
                    (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, source, self.node_id,
                     path, size, sha256, state, reason, view, received_at, patient_id))
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute("""INSERT INTO studies (study_uid, first_arrival, last_arrival, instances, state)
                       VALUES (?, ?, ?, 1, 'receiving')
                       ON CONFLICT (study_uid) DO UPDATE SET last_arrival = excluded.last_arrival,
                       instances = studies.instances + 1, state = 'receiving'""", (study_uid, received_at, received_at))
        return int(row[0])

    def audit(self, cur, event: str, *, source: str | None = None, study_uid: str | None = None,
              series_uid: str | None = None, sop_instance_uid: str | None = None, job_id: int | None = None,
              detail: dict[str, Any] | None = None, at: float | None = None) -> None:
        """Append one audit record in the caller's transaction (so a state change and its record land together)."""
        cur.execute("""INSERT INTO audit (at, event, node, source, study_uid, series_uid, sop_instance_uid, job_id, detail)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (time.time() if at is None else at, event, self.node_id, source, study_uid, series_uid,
                     sop_instance_uid, job_id, json.dumps(detail, sort_keys=True) if detail else None))

    def record(self, event: str, **kw) -> None:
        """One audit record in a transaction of its own."""
        with self.transaction() as cur:
            self.audit(cur, event, **kw)

    # ---- claims
    def claim(self, limit: int, lease_s: float, shared_storage: bool) -> list[Claim]:
        """Up to ``limit`` jobs to screen, claimed for this node: received ones, and ones whose claim outlived its
        lease (a node that died mid-screening). A job claimed ``MAX_ATTEMPTS`` times without a result fails
        instead, so one instance that kills its screener cannot take the fleet down in turn."""
        now = time.time()
        token = uuid.uuid4().hex
        lock = " FOR UPDATE SKIP LOCKED" if self.pg else ""
        mine = "" if shared_storage else " AND holder = ?"
        args: tuple = (now - lease_s,) + (() if shared_storage else (self.node_id,))
        with self.transaction() as cur:
            cur.execute(f"""SELECT id, attempts, sop_instance_uid, study_uid FROM jobs
                            WHERE (state = 'received' OR (state = 'screening' AND claimed_at < ?)){mine}
                            ORDER BY id LIMIT {int(limit)}{lock}""", args)
            rows = cur.fetchall()
            poisoned = [r for r in rows if r[1] >= MAX_ATTEMPTS]
            for jid, attempts, sop, study in poisoned:
                reason = (f"screening started {attempts} times without finishing (the screening process died or hung "
                          "each time); not retried")
                cur.execute("UPDATE jobs SET state = 'failed', reason = ?, claim_token = NULL WHERE id = ?", (reason, jid))
                self.audit(cur, "failed", job_id=jid, sop_instance_uid=sop, study_uid=study, detail={"reason": reason})
            ids = [r[0] for r in rows if r[1] < MAX_ATTEMPTS]
            if not ids:
                return []
            marks = ", ".join("?" for _ in ids)
            cur.execute(f"""UPDATE jobs SET state = 'screening', claimed_by = ?, claim_token = ?, claimed_at = ?,
                            attempts = attempts + 1 WHERE id IN ({marks})
                            RETURNING {", ".join(_JOB_COLUMNS)}""", (self.node_id, token, now, *ids))
            jobs = sorted((Job.from_row(r) for r in cur.fetchall()), key=lambda j: j.id)
        return [Claim(j, token) for j in jobs]

    def release_own_claims(self) -> int:
        """At start: jobs this node had claimed when it stopped go back to the queue (its results were never
        committed, so screening them again is the first result, not a second one)."""
        with self.transaction() as cur:
            cur.execute("""UPDATE jobs SET state = 'received', claimed_by = NULL, claim_token = NULL
                           WHERE state = 'screening' AND claimed_by = ? RETURNING id""", (self.node_id,))
            ids = [r[0] for r in cur.fetchall()]
            if ids:
                self.audit(cur, "resumed", detail={"jobs": len(ids), "job_ids": ids[:100]})
        return len(ids)

    def finish_many(self, records, forget_pixels: bool,
                    destinations: Sequence[tuple[str, Sequence[str]]] = ()) -> list[bool]:
        """Record claimed jobs' outcomes in one transaction, each only if its claim still holds (False: another node
        took the job after this one's lease ran out, and its result, not ours, is the one kept). ``records``:
        (claim, state, result, reason, overlay_path, audit_event, audit_detail[, objects]). With ``forget_pixels``
        the job no longer points at its instance file, which the caller deletes after the commit. ``objects``
        (kind, sop_instance_uid, sop_class_uid, path, only_destination, error) enter the outbox once per destination
        that takes that kind (``destinations``: (name, kinds) pairs; ``only_destination``: the one an HL7 message is
        addressed to) in the same transaction, dead at once when ``error`` says the object could not be made: a
        committed result is always delivered or dead-lettered with a reason, never forgotten."""
        now = time.time()
        kept = []
        with self.transaction() as cur:
            for claim, state, result, reason, overlay_path, event, detail, *rest in records:
                j = claim.job
                cur.execute(f"""UPDATE jobs SET state = ?, result = ?, reason = ?, overlay_path = ?, screened_at = ?,
                                claim_token = NULL{", path = NULL" if forget_pixels else ""}
                                WHERE id = ? AND claim_token = ? AND state = 'screening'""",
                            (state, json.dumps(result) if result is not None else None, reason, overlay_path, now, j.id,
                             claim.token))
                ok = cur.rowcount == 1
                kept.append(ok)
                if not ok:
                    continue
                self.audit(cur, event, source=j.source, study_uid=j.study_uid, series_uid=j.series_uid,
                           sop_instance_uid=j.sop_instance_uid, job_id=j.id, detail=detail, at=now)
                for kind, sop_uid, sop_class, path, only, error in (rest[0] if rest else ()):
                    for dest in (name for name, kinds in destinations if kind in kinds and only in (None, name)):
                        # an object that could not be made is dead from the start, with why: visible, never silent
                        cur.execute("""INSERT INTO outbox (job_id, study_uid, kind, sop_instance_uid, sop_class_uid,
                                       destination, holder, path, state, next_at, created_at, last_error)
                                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                                       ON CONFLICT (sop_instance_uid, destination) DO NOTHING""",
                                    (j.id, j.study_uid, kind, sop_uid, sop_class, dest, self.node_id, path or "",
                                     "dead" if error else "pending", now, now, error))
                        if error:
                            self.audit(cur, "dead_letter", study_uid=j.study_uid, sop_instance_uid=sop_uid, job_id=j.id,
                                       detail={"destination": dest, "kind": kind, "reason": error}, at=now)
        return kept

    def finish(self, claim: Claim, *, state: str, result: dict[str, Any] | None, reason: str | None,
               overlay_path: str | None, audit_event: str, audit_detail: dict[str, Any]) -> bool:
        """One claimed job's outcome (see :meth:`finish_many`)."""
        return self.finish_many([(claim, state, result, reason, overlay_path, audit_event, audit_detail)], False)[0]

    # ---- studies
    def stable_studies(self, quiet_s: float) -> list[str]:
        """Studies still receiving whose last instance arrived ``quiet_s`` ago and whose jobs are all finished."""
        with self.transaction() as cur:
            cur.execute("""SELECT study_uid FROM studies s WHERE state = 'receiving' AND last_arrival < ?
                           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                                           AND j.state IN ('received', 'screening'))
                           ORDER BY last_arrival LIMIT 100""", (time.time() - quiet_s,))
            return [r[0] for r in cur.fetchall()]

    def complete_study(self, study_uid: str, quiet_s: float) -> dict[str, Any] | None:
        """Mark one study complete with its summary, once (the conditional update decides between nodes)."""
        now = time.time()
        with self.transaction() as cur:
            cur.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,))
            jobs = [Job.from_row(r) for r in cur.fetchall()]
            summary = summarise_study(jobs)
            cur.execute("""UPDATE studies SET state = 'complete', completed_at = ?, completed_by = ?, summary = ?
                           WHERE study_uid = ? AND state = 'receiving' AND last_arrival < ?
                           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = ?
                                           AND j.state IN ('received', 'screening'))""",
                        (now, self.node_id, json.dumps(summary), study_uid, now - quiet_s, study_uid))
            if cur.rowcount != 1:
                return None
            self.audit(cur, "study_complete", study_uid=study_uid, detail=summary, at=now)
            cur.execute("SELECT first_arrival FROM studies WHERE study_uid = ?", (study_uid,))
            first = cur.fetchone()[0]
        return {**summary, "first_arrival_epoch": first}

    # ---- queries
    def jobs(self, *, study_uid: str | None = None, state: str | None = None, since: float | None = None,
             until: float | None = None, limit: int = 100, after_id: int | None = None) -> list[Job]:
        where, args = _filters(study_uid=study_uid, state=state, since=since, until=until, time_column="received_at")
        if after_id is not None:
            where.append("id > ?")
            args.append(after_id)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        order = "id ASC" if after_id is not None else "id DESC"
        with self.transaction() as cur:
            cur.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs{clause} ORDER BY {order} LIMIT {int(limit)}", args)
            return [Job.from_row(r) for r in cur.fetchall()]

    def job(self, job_id: int) -> Job | None:
        with self.transaction() as cur:
            cur.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
        return Job.from_row(row) if row else None

    def studies(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent studies with their state and summary (a study still receiving is summarised from its jobs)."""
        with self.transaction() as cur:
            cur.execute("""SELECT study_uid, first_arrival, last_arrival, instances, state, completed_at, summary
                           FROM studies ORDER BY last_arrival DESC LIMIT ?""", (int(limit),))
            rows = cur.fetchall()
            out = []
            for uid, first, last, n, state, completed, summary in rows:
                if summary and state == "complete":
                    s = json.loads(summary)
                else:
                    cur.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE study_uid = ? ORDER BY id", (uid,))
                    s = summarise_study([Job.from_row(r) for r in cur.fetchall()])
                out.append({"study_uid": uid, "state": state, "instances": n, "first_arrival": iso(first),
                            "last_arrival": iso(last), "completed_at": iso(completed), **s})
        return out

    def pending(self) -> int:
        """Jobs received and not yet screened, all nodes (an index range, not a scan of every job ever kept)."""
        with self.transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'screening')")
            return int(cur.fetchone()[0])

    def audit_records(self, *, study_uid: str | None = None, event: str | None = None, since: float | None = None,
                      until: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        where, args = _filters(study_uid=study_uid, since=since, until=until, time_column="at")
        if event:
            where.append("event = ?")
            args.append(event)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        tail = f" LIMIT {int(limit)}" if limit else ""
        with self.transaction() as cur:
            cur.execute(f"""SELECT id, at, event, node, source, study_uid, series_uid, sop_instance_uid, job_id, detail
                            FROM audit{clause} ORDER BY id{tail}""", args)
            rows = cur.fetchall()
        keys = ("id", "at", "event", "node", "source", "study_uid", "series_uid", "sop_instance_uid", "job_id", "detail")
        out = []
        for row in rows:
            rec = dict(zip(keys, row))
            rec["at"] = iso(rec["at"])
            rec["detail"] = json.loads(rec["detail"]) if rec["detail"] else None
            out.append(rec)
        return out


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders on both dialects."""

    def __init__(self, cur, sql):
        self._cur, self._sql = cur, sql

    def execute(self, text: str, args: Sequence[Any] = ()) -> None:
        self._cur.execute(self._sql(text), tuple(args))

    def fetchone(self):
        return self._cur.fetchone()

    def fetchall(self):
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


def _filters(*, study_uid=None, state=None, since=None, until=None, time_column: str) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if study_uid:
        where.append("study_uid = ?")
        args.append(study_uid)
    if state:
        if state not in STATES:
            raise ConfigError(f"unknown job state {state!r}; one of {', '.join(STATES)}")
        where.append("state = ?")
        args.append(state)
    if since is not None:
        where.append(f"{time_column} >= ?")
        args.append(since)
    if until is not None:
        where.append(f"{time_column} < ?")
        args.append(until)
    return where, args


def summarise_study(jobs: Sequence[Job]) -> dict[str, Any]:
    """A study's screening outcome: its most suspicious screened image decides, and any borderline image flags it."""
    screened = [j for j in jobs if j.state == SCREENED and j.result]
    counts = {s: sum(1 for j in jobs if j.state == s) for s in STATES}
    views = [j.to_dict() for j in screened]
    worst = max(views, key=lambda d: d["p_covid"] or 0.0, default={})
    return {"screened": counts[SCREENED], "skipped": counts[SKIPPED], "failed": counts[FAILED],
            "pending": counts[RECEIVED] + counts[SCREENING], "label": worst.get("label"), "p_covid": worst.get("p_covid"),
            "deciding_job": worst.get("id"), "borderline": any(d["borderline"] for d in views),
            "job_ids": [j.id for j in jobs]}
