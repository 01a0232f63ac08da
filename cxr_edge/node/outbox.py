"""The durable outbox: result objects waiting for, being sent to, delivered to, or dead at each destination.

Rows are written in the transaction that records the result (``JobStore.finish_many``), so nothing screened is
forgotten by a crash. A sender claims due rows with a token (as the screening worker claims jobs), and only the
claim holder records the outcome: delivered, or failed with the attempt count up and the next attempt pushed back
(exponential backoff with jitter), or dead after the last attempt, with the reason, in the audit trail. A row being
sent when the node died is sent again after its lease; the object's UID is the same, so the PACS keeps one copy.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .store import JobStore, iso

#: outbox states
PENDING, SENDING, DELIVERED, DEAD = "pending", "sending", "delivered", "dead"
OUTBOX_STATES = (PENDING, SENDING, DELIVERED, DEAD)

_COLUMNS = ("id", "job_id", "study_uid", "kind", "sop_instance_uid", "sop_class_uid", "destination", "holder", "path",
            "state", "attempts", "next_at", "last_error", "claimed_by", "claimed_at", "created_at", "delivered_at")


@dataclass(frozen=True)
class OutboxRow:
    id: int
    job_id: int
    study_uid: str
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    destination: str
    holder: str
    path: str
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    claimed_by: str | None
    claimed_at: float | None
    created_at: float
    delivered_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "kind": self.kind, "sop_instance_uid": self.sop_instance_uid,
                "state": self.state, "attempts": self.attempts, "last_error": self.last_error,
                "next_attempt_at": iso(self.next_at) if self.state == PENDING else None,
                "delivered_at": iso(self.delivered_at)}


@dataclass(frozen=True)
class Sending:
    """Rows claimed for one send, with the token the outcome must present."""

    rows: list[OutboxRow]
    token: str


class Outbox:
    def __init__(self, store: JobStore):
        self.store = store

    def claim(self, limit: int, lease_s: float, shared_storage: bool, destinations: list[str],
              max_attempts: int = 1 << 30) -> Sending | None:
        """Due rows for the configured destinations: pending ones whose time has come, and ones another sender
        left claimed longer than ``lease_s`` (this node's own come back through :meth:`release_own` at start, never
        while it may still be sending them); reports and HL7 messages first (they are the result; the images
        illustrate it). Only this node's objects unless the storage is shared. An attempt is counted when it
        starts, so a row whose sending kills the node each time is dead-lettered after ``max_attempts``."""
        if not destinations:
            return None
        now = time.time()
        token = uuid.uuid4().hex
        me = self.store.node_id
        lock = " FOR UPDATE SKIP LOCKED" if self.store.pg else ""
        dmarks = ", ".join("?" for _ in destinations)
        mine = "" if shared_storage else " AND holder = ?"
        args: tuple = (now, now - lease_s, me, *destinations) + (() if shared_storage else (me,))
        with self.store.transaction() as cur:
            cur.execute(f"""SELECT id, attempts, job_id, study_uid, sop_instance_uid, destination, kind FROM outbox
                            WHERE ((state = 'pending' AND next_at <= ?)
                                   OR (state = 'sending' AND claimed_at < ? AND claimed_by <> ?))
                            AND destination IN ({dmarks}){mine}
                            ORDER BY CASE WHEN kind IN ('sr', 'hl7') THEN 0 ELSE 1 END, next_at, id
                            LIMIT {int(limit)}{lock}""", args)
            rows = cur.fetchall()
            for rid, attempts, job_id, study, sop, dest, kind in (r for r in rows if r[1] >= max_attempts):
                self._dead(cur, (rid, job_id, study, sop, dest, kind), now,
                           f"sending started {attempts} times without an outcome recorded (the node died or hung "
                           "during the send each time)", attempt=attempts)
            ids = [r[0] for r in rows if r[1] < max_attempts]
            if not ids:
                return None
            marks = ", ".join("?" for _ in ids)
            cur.execute(f"""UPDATE outbox SET state = 'sending', claimed_by = ?, claim_token = ?, claimed_at = ?,
                            attempts = attempts + 1 WHERE id IN ({marks}) RETURNING {", ".join(_COLUMNS)}""",
                        (me, token, now, *ids))
            got = sorted((OutboxRow(*r) for r in cur.fetchall()), key=lambda r: r.id)
        return Sending(got, token)

    def record(self, sending: Sending, outcomes: list[str | None], *, max_attempts: int, wait_s, permanent) -> dict[str, int]:
        """Each claimed row's outcome, in one transaction: None delivered; a reason retried after ``wait_s(attempt)``
        or dead after ``max_attempts`` (or at once when ``permanent(reason)``). Audited per object."""
        now = time.time()
        counts = {DELIVERED: 0, PENDING: 0, DEAD: 0}
        with self.store.transaction() as cur:
            for row, reason in zip(sending.rows, outcomes):
                attempts = row.attempts  # counted when the claim started it
                if reason is None:
                    cur.execute("""UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL,
                                   claim_token = NULL WHERE id = ? AND claim_token = ?""", (now, row.id, sending.token))
                    state, event = DELIVERED, "delivered"
                elif attempts >= max_attempts or permanent(reason):
                    cur.execute("""UPDATE outbox SET state = 'dead', last_error = ?, claim_token = NULL
                                   WHERE id = ? AND claim_token = ?""", (reason, row.id, sending.token))
                    state, event = DEAD, "dead_letter"
                else:
                    cur.execute("""UPDATE outbox SET state = 'pending', last_error = ?, next_at = ?,
                                   claim_token = NULL WHERE id = ? AND claim_token = ?""",
                                (reason, now + wait_s(attempts), row.id, sending.token))
                    state, event = PENDING, "delivery_failed"
                if cur.rowcount != 1:  # our claim lapsed and another sender took the row: its outcome counts
                    continue
                counts[state] += 1
                detail = {"destination": row.destination, "kind": row.kind, "attempt": attempts}
                if reason is not None:
                    detail["reason"] = reason
                self.store.audit(cur, event, study_uid=row.study_uid, sop_instance_uid=row.sop_instance_uid,
                                 job_id=row.job_id, detail=detail, at=now)
        return counts

    def strand_unconfigured(self, destinations: list[str]) -> int:
        """At start: this node's undelivered rows for destinations it no longer has (removed, or renamed: an unnamed
        destination is named by its address) would wait forever; they are dead-lettered with the reason instead,
        so they show up and ``--send-to NAME=URL --redeliver`` can still send them."""
        now = time.time()
        dmarks = ", ".join("?" for _ in destinations)
        other = f" AND destination NOT IN ({dmarks})" if destinations else ""
        with self.store.transaction() as cur:
            cur.execute(f"""SELECT id, job_id, study_uid, sop_instance_uid, destination, kind FROM outbox
                            WHERE state IN ('pending', 'sending') AND holder = ?{other}""",
                        (self.store.node_id, *destinations))
            rows = cur.fetchall()
            for row in rows:
                dest = row[4]
                self._dead(cur, row, now, f"destination {dest!r} is not configured on this node (removed or renamed); "
                                          f"give it again with --send-to {dest}=URL and start with --redeliver to send this")
        return len(rows)

    def _dead(self, cur, row: tuple, now: float, reason: str, **detail) -> None:
        """One row (id, job_id, study_uid, sop_instance_uid, destination, kind) dead-lettered with its audit record."""
        rid, job_id, study, sop, dest, kind = row
        cur.execute("UPDATE outbox SET state = 'dead', last_error = ?, claim_token = NULL WHERE id = ?", (reason, rid))
        self.store.audit(cur, "dead_letter", study_uid=study, sop_instance_uid=sop, job_id=job_id,
                         detail={"destination": dest, "kind": kind, **detail, "reason": reason}, at=now)

    def release_own(self) -> int:
        """At start: rows this node was sending when it stopped are due again now."""
        with self.store.transaction() as cur:
            cur.execute("""UPDATE outbox SET state = 'pending', claim_token = NULL, next_at = ?
                           WHERE state = 'sending' AND claimed_by = ? RETURNING id""", (time.time(), self.store.node_id))
            return len(cur.fetchall())

    def redeliver(self, destinations: list[str]) -> dict[str, int]:
        """Dead letters for ``destinations`` are due again with a fresh attempt count (``--redeliver`` after the
        destination was fixed); dead letters for destinations no longer configured stay dead and are counted."""
        now = time.time()
        with self.store.transaction() as cur:
            requeued = 0
            if destinations:
                marks = ", ".join("?" for _ in destinations)
                cur.execute(f"""UPDATE outbox SET state = 'pending', attempts = 0, next_at = ?, claim_token = NULL
                                WHERE state = 'dead' AND destination IN ({marks}) RETURNING id""", (now, *destinations))
                requeued = len(cur.fetchall())
            cur.execute("SELECT destination, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY destination")
            stranded = {d: int(n) for d, n in cur.fetchall()}
            self.store.audit(cur, "redeliver", detail={"requeued": requeued, "destinations": destinations,
                                                       "left_dead_unconfigured": stranded}, at=now)
        return {"requeued": requeued, **{f"dead_for_{d}": n for d, n in stranded.items()}}

    def counts(self) -> dict[str, int]:
        with self.store.transaction() as cur:
            cur.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")
            got = {s: int(n) for s, n in cur.fetchall()}
        return {s: got.get(s, 0) for s in OUTBOX_STATES}

    def for_jobs(self, job_ids: list[int]) -> dict[int, list[OutboxRow]]:
        if not job_ids:
            return {}
        marks = ", ".join("?" for _ in job_ids)
        with self.store.transaction() as cur:
            cur.execute(f"SELECT {', '.join(_COLUMNS)} FROM outbox WHERE job_id IN ({marks}) ORDER BY id", job_ids)
            rows = [OutboxRow(*r) for r in cur.fetchall()]
        out: dict[int, list[OutboxRow]] = {}
        for r in rows:
            out.setdefault(r.job_id, []).append(r)
        return out

    def for_studies(self, study_uids: list[str]) -> dict[str, dict[str, int]]:
        """Per study: objects by delivery state (the worklist's delivery column)."""
        if not study_uids:
            return {}
        marks = ", ".join("?" for _ in study_uids)
        with self.store.transaction() as cur:
            cur.execute(f"""SELECT study_uid, state, COUNT(*) FROM outbox WHERE study_uid IN ({marks})
                            GROUP BY study_uid, state""", study_uids)
            out: dict[str, dict[str, int]] = {}
            for uid, state, n in cur.fetchall():
                out.setdefault(uid, {})[state] = int(n)
        return out

    def rows(self, *, state: str | None = None, limit: int = 1000) -> list[OutboxRow]:
        where = " WHERE state = ?" if state else ""
        with self.store.transaction() as cur:
            cur.execute(f"SELECT {', '.join(_COLUMNS)} FROM outbox{where} ORDER BY id LIMIT {int(limit)}",
                        (state,) if state else ())
            return [OutboxRow(*r) for r in cur.fetchall()]


def delivery_summary(rows: list[OutboxRow]) -> dict[str, Any]:
    """A job's delivery in one word plus its objects: none, pending, delivered, or dead (any object dead)."""
    if not rows:
        return {"state": "none", "objects": []}
    states = {r.state for r in rows}
    state = DEAD if DEAD in states else DELIVERED if states == {DELIVERED} else PENDING
    return {"state": state, "objects": [r.to_dict() for r in rows]}
