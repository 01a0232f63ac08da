"""Systems under test over loopback: the HTTP service (``cxr-edge serve``) and the DICOM node (``cxr-edge node``).

The system is then the whole service, decode included: each sample is the image file as a kiosk uploads it
(``POST /v1/predict``, multipart field ``files``), or a DX instance as an X-ray room sends it (C-STORE), completed
when the node's job store says it is screened (``GET /v1/jobs``). They are external processes, started here on free
ports or given by URL, never imported: this measures what a client of the service gets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import ConfigError, EngineError
from .loadgen_qsl import DX_PRESENTATION, SampleLibrary, dx_instance
from .loadgen_settings import Estimate
from .loadgen_sut import Responder

log = logging.getLogger(__name__)

#: seconds a started service has to answer /readyz (engine load, tuning off)
READY_TIMEOUT_S = 180.0
#: seconds one sample may take before it is answered as failed (so LoadGen never waits forever)
SAMPLE_TIMEOUT_S = 120.0
#: how often the node's job list is read while samples are in flight (adds up to this much to each latency)
NODE_POLL_S = 0.01
#: final job states of the node
FINAL_STATES = ("screened", "failed", "skipped")
_BOUNDARY = "cxredgeloadgenboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A ``cxr-edge serve`` or ``cxr-edge node`` process started on loopback for one run, stopped after it."""

    what: str  # "serve" | "node"
    cmd: list[str]
    url: str
    dicom_port: int | None = None
    workdir: str | None = None
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> Service:
        fd, self.log_path = tempfile.mkstemp(prefix=f"cxr-loadgen-{self.what}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(self.url, self.proc, self.log_path)
        except BaseException:  # its log and working folder go with it
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to the process group (its decode workers too), SIGKILL if it has not exited in 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.log_path:
            os.unlink(self.log_path)
            self.log_path = None


def start_serve(artifact: str, flags: Sequence[str], extra: Sequence[str] = ()) -> Service:
    """``cxr-edge serve`` on 127.0.0.1 at a free port (tuning off: the backend and threads given are what runs);
    ``flags``: engine and batching flags, ``extra``: the user's, last, so they win."""
    port = free_port()
    cmd = [sys.executable, "-m", "cxr_edge.cli", "serve", artifact, "--host", "127.0.0.1", "--port", str(port),
           "--tuning", "off", *flags, *extra]
    return Service("serve", cmd, f"http://127.0.0.1:{port}").start()


def start_node(artifact: str, flags: Sequence[str], extra: Sequence[str] = ()) -> Service:
    """``cxr-edge node`` on loopback (DICOM and HTTP ports free ones; a temporary working folder, removed after);
    no Grad-CAM heatmaps, so it does what ``/v1/predict`` does (``--service-args "--heatmaps all"`` adds them)."""
    port, dport = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="cxr-loadgen-node-")
    cmd = [sys.executable, "-m", "cxr_edge.cli", "node", artifact, "--workdir", workdir, "--allow-any-caller",
           "--dicom-host", "127.0.0.1", "--dicom-port", str(dport), "--host", "127.0.0.1", "--port", str(port),
           "--tuning", "off", "--heatmaps", "none", *flags, *extra]
    return Service("node", cmd, f"http://127.0.0.1:{port}", dicom_port=dport, workdir=workdir).start()


def wait_ready(url: str, proc: subprocess.Popen | None = None, log_path: str | None = None,
               timeout: float = READY_TIMEOUT_S) -> None:
    """Until ``/readyz`` answers 200; a process that exits first is an error quoting the end of its log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-1500:] if log_path else ""
            raise EngineError(f"the service exited with code {proc.returncode} before it was ready; its log ends:\n{tail}")
        try:
            if _get(url, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise EngineError(f"{url} did not become ready in {timeout:g} s: check that the service runs there (GET /readyz).")


def _get(url: str, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    parts = urlsplit(url)
    c = conn or http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, json.loads(body) if body else None
    finally:
        if conn is None:
            c.close()


def probabilities(result: dict, classes: Sequence[str]) -> np.ndarray | None:
    """A result's probabilities in the model's class order (None: the result has none, it failed)."""
    p = (result or {}).get("probabilities")
    if not p or any(c not in p for c in classes):
        return None
    return np.array([p[c] for c in classes], np.float32)


class _Probe:
    """Collects the answers of samples sent before LoadGen runs (the estimate), in place of LoadGen."""

    def __init__(self, n: int):
        self.left, self.done = n, threading.Event()
        self.failures, self.why = 0, None
        self.lock = threading.Lock()

    def __call__(self, ids, probs, why=None) -> None:
        with self.lock:
            self.failures += len(ids) if probs is None else 0
            self.why = self.why or why
            self.left -= len(ids)
            if self.left <= 0:
                self.done.set()


class NetworkSystem:
    """What the HTTP and DICOM systems share: samples are sent one by one as LoadGen issues them, answered when the
    service has answered, and the estimate is a short burst sent the same way."""

    kind = "encoded"
    target = "network"

    def __init__(self, library: SampleLibrary, respond: Responder, classes: Sequence[str], concurrency: int):
        self.library, self.respond, self.classes, self.concurrency = library, respond, list(classes), concurrency

    def submit(self, qid: int, index: int) -> None:
        raise NotImplementedError

    def issue_for(self, scenario: str) -> Callable[[list], None]:
        def issue(samples) -> None:
            for s in samples:
                try:
                    self.submit(s.id, s.index)
                except Exception as exc:  # never into LoadGen's thread: answered as failed instead
                    self.respond([s.id], None, f"{type(exc).__name__}: {exc}")

        return issue

    def end_scenario(self) -> dict[str, Any]:
        return {}

    def estimate(self, scenario: str, budget_s: float) -> Estimate:
        """One sample at a time (latency), then a burst of ``2 x concurrency`` samples at once (throughput); the same
        for every scenario, so the caller keeps the first (``budget_s``: unused, the burst is its own size)."""
        n = min(len(self.library.source), 2 * self.concurrency)
        idx = list(range(n))
        self.library.load(idx)
        saved = self.respond
        try:
            single = [self._burst([i]) for i in idx[: min(n, 5)]]
            burst = [idx[k % n] for k in range(2 * self.concurrency)]
            wall = self._burst(burst)
        finally:
            self.respond = saved
            self.library.unload(idx)
        return Estimate(float(np.median(single)), len(burst) / wall,
                        f"{self.target}: {min(n, 5)} samples one at a time, then {len(burst)} at once")

    def _burst(self, indices: list[int]) -> float:
        probe = _Probe(len(indices))
        self.respond = probe  # type: ignore[assignment]
        t = time.perf_counter()
        for k, i in enumerate(indices):
            self.submit(-1 - k, i)
        if not probe.done.wait(SAMPLE_TIMEOUT_S * 2):
            raise EngineError(f"{self.target}: the service did not answer {probe.left} of {len(indices)} samples in "
                              f"{SAMPLE_TIMEOUT_S * 2:g} s before the run; check its log.")
        if probe.failures == len(indices):
            raise EngineError(f"{self.target}: every sample sent before the run failed ({probe.why}); check the "
                              "service and the data.")
        return time.perf_counter() - t

    def close(self) -> None:
        pass


class HttpSystem(NetworkSystem):
    """Each sample one ``POST /v1/predict`` (multipart ``files``) on a pool of kept-alive loopback connections."""

    target = "serve"

    def __init__(self, url: str, library: SampleLibrary, respond: Responder, classes: Sequence[str], concurrency: int):
        super().__init__(library, respond, classes, concurrency)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"--url must be http://HOST:PORT of a running cxr-edge serve, got {url!r}.")
        self.host, self.port = parts.hostname, parts.port or 80
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loadgen-http", daemon=True)
        self.thread.start()
        self.slots = asyncio.run_coroutine_threadsafe(self._semaphore(), self.loop).result()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.concurrency)

    def submit(self, qid: int, index: int) -> None:
        data, ctype, name = self.library.loaded[index]
        head = (f"--{_BOUNDARY}\r\ncontent-disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                f"content-type: {ctype}\r\n\r\n").encode()
        body = b"".join((head, data, f"\r\n--{_BOUNDARY}--\r\n".encode()))
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._one(qid, body)))

    async def _one(self, qid: int, body: bytes) -> None:
        async with self.slots:
            conn = self.idle.pop() if self.idle else None
            try:
                status, doc, conn = await asyncio.wait_for(self._post(conn, body), SAMPLE_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.respond([qid], None, f"{type(exc).__name__}: {exc}")
                return
            if conn is not None:
                self.idle.append(conn)
        result = (doc.get("results") or [{}])[0] if status == 200 else {}
        probs = probabilities(result, self.classes)
        self.respond([qid], probs, None if probs is not None else f"HTTP {status}: {str(doc)[:200]}")

    async def _post(self, conn, body: bytes):
        """One POST on a kept-alive connection, reopened once if the server had closed it: (status, json, conn)."""
        for attempt in range(2):
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            try:
                writer.write(f"POST /v1/predict HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: multipart/form-data; "
                             f"boundary={_BOUNDARY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                data = await reader.readexactly(int(fields.get("content-length", 0)))
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                conn = None
                if attempt:
                    raise
                continue
            if fields.get("connection", "").lower() == "close":
                writer.close()
                conn = None
            return int(head[0].split()[1]), json.loads(data) if data else {}, conn
        raise ConnectionError("no answer")

    def close(self) -> None:
        async def shut():
            for _, w in self.idle:
                w.close()
            self.idle.clear()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class DicomSystem(NetworkSystem):
    """Each sample one C-STORE of a DX instance (new UIDs every time: the node screens an instance once) over a few
    associations, as X-ray rooms send; answered when ``GET /v1/jobs`` shows its job screened."""

    kind = "dicom"
    target = "node"

    def __init__(self, url: str, dicom_addr: tuple[str, int], ae_title: str, library: SampleLibrary,
                 respond: Responder, classes: Sequence[str], associations: int):
        super().__init__(library, respond, classes, associations)
        self.url, self.addr, self.ae_title = url, dicom_addr, ae_title
        self.pending: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()
        self.work: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self.stop = threading.Event()
        self.mark = self._newest_job()
        self.senders = [threading.Thread(target=self._send_loop, name=f"loadgen-cstore-{k}", daemon=True)
                        for k in range(associations)]
        self.poller = threading.Thread(target=self._poll_loop, name="loadgen-jobs", daemon=True)
        for t in [*self.senders, self.poller]:
            t.start()

    def _newest_job(self) -> int:
        status, doc = _get(self.url, "/v1/jobs?limit=1")
        if status != 200:
            raise EngineError(f"{self.url}/v1/jobs answered {status}: is this a cxr-edge node's HTTP port?")
        jobs = (doc or {}).get("jobs") or []
        return int(jobs[0]["id"]) if jobs else 0

    def submit(self, qid: int, index: int) -> None:
        self.work.put((qid, index))

    def _send_loop(self) -> None:
        import pynetdicom

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = pynetdicom.AE(ae_title="LOADGEN")
        ae.add_requested_context(DX_PRESENTATION, "1.2.840.10008.1.2.1")  # explicit VR little endian
        assoc = None
        while True:
            item = self.work.get()
            if item is None:
                break
            try:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate(*self.addr, ae_title=self.ae_title)
                self._store(assoc, *item)
            except Exception as exc:  # a sender that died would leave LoadGen waiting for its samples forever
                self.respond([item[0]], None, f"{type(exc).__name__}: {exc}")
        if assoc is not None and assoc.is_established:
            assoc.release()

    def _store(self, assoc, qid: int, index: int) -> None:
        pixels, patient = self.library.loaded[index]
        ds = dx_instance(pixels, patient)
        with self.lock:
            self.pending[str(ds.SOPInstanceUID)] = (qid, time.monotonic())
        try:
            why = self._send(assoc, ds)
        except Exception as exc:  # answered below, once: the pending entry goes first, so the poller cannot too
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            with self.lock:
                mine = self.pending.pop(str(ds.SOPInstanceUID), None) is not None
            if mine:  # else the poller answered it already (the node screened what it said it could not store)
                self.respond([qid], None, why)

    def _send(self, assoc, ds) -> str | None:
        """One C-STORE; None when the node stored the instance, else why not."""
        if not assoc.is_established:
            return f"no association with {self.ae_title}@{self.addr[0]}:{self.addr[1]}"
        code = getattr(assoc.send_c_store(ds), "Status", None)
        if code == 0x0000:
            return None
        return f"C-STORE status {code!r}" if code is not None else "C-STORE: no answer (association lost)"

    def _poll_loop(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
        while not self.stop.is_set():
            if not self.pending:
                time.sleep(NODE_POLL_S)
                continue
            try:
                status, doc = _get(self.url, f"/v1/jobs?after_id={self.mark}&limit=1000", conn)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                log.warning("reading the node's jobs failed (%s); retrying", exc)
                conn.close()
                time.sleep(0.2)
                continue
            self._take((doc or {}).get("jobs") or [] if status == 200 else [])
            self._expire()
            time.sleep(NODE_POLL_S)
        conn.close()

    def _take(self, jobs: list[dict]) -> None:
        """Answer the samples whose jobs are final; move the mark past the finished jobs at the front."""
        prefix = True
        for j in jobs:
            final = j.get("state") in FINAL_STATES
            if final:
                with self.lock:
                    got = self.pending.pop(str(j.get("sop_instance_uid")), None)
                if got is not None:
                    probs = probabilities(j.get("result") or {}, self.classes) if j["state"] == "screened" else None
                    self.respond([got[0]], probs, None if probs is not None else f"job {j['state']}: {j.get('reason')}")
            if prefix and final:
                self.mark = int(j["id"])
            else:
                prefix = False

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [(uid, q) for uid, (q, t) in self.pending.items() if now - t > SAMPLE_TIMEOUT_S]
            for uid, _ in late:
                del self.pending[uid]
        for uid, q in late:
            self.respond([q], None, f"no result for {uid} in {SAMPLE_TIMEOUT_S:g} s")

    def close(self) -> None:
        for _ in self.senders:
            self.work.put(None)
        for t in self.senders:
            t.join(timeout=30)
        self.stop.set()
        self.poller.join(timeout=10)
