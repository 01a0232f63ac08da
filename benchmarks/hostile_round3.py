"""Issue 26 ("hardening round 3") measured from outside: each failure class found against `cxr-edge serve` on
loopback, reproduced against the current tree and, in the same run, against a baseline checkout.

    python benchmarks/hostile_round3.py ARTIFACT NORMAL_IMAGE [--out benchmarks/results/hostile_round3_service]
                                        [--baseline-src DIR] [--cases a,b,...] [--serve-args "..."]

    # e.g. (the baseline is the revision before the round-3 fixes, checked out outside the repository):
    git worktree add /tmp/baseline-4dc6391 4dc6391
    python benchmarks/hostile_round3.py runs/real_small/artifacts/model.int8-cpu.onnx \\
        ../shared/data/cxr-dev/Normal/lundis__Normal-10042.png --baseline-src /tmp/baseline-4dc6391

Every case starts a fresh `cxr-edge serve` process (benchmarks/loadtest.py's LocalServer: default settings,
`--serve-args` added where that checkout's `serve --help` lists the flag) for each target, current tree first
then the baseline, and kills its process tree at the end, so one case's damage does not leak into the next.
Measured for every case: the answers (status codes, or reset / timeout), seconds, the RSS of the server's
process tree (server plus decode workers) above its idle level, sampled every 10 ms (hostile_decode.py's
/proc accounting; the tree itself is re-listed every 0.25 s because the full /proc scan of tree_rss_mb costs
~6 ms per call on this 2-core machine), and `/healthz` latency polled every 50 ms on a new connection (from
127.0.0.1), the way a load balancer probes, by a separate prober process (a thread of this harness would wait
for the harness's own GIL and report that as server latency). The harness shares the server's cores. Where stated, a normal client sends
the normal image to /v1/predict in a loop (keep-alive) and its latencies and answers are reported.
Hostile clients connect from 127.0.0.2, honest ones from 127.0.0.3 (127.1.x.y for the 256 honest clients),
in case a defence keys on the peer address. A harness guard kills the server if its tree passes
--rss-cap-mb above idle or the machine's available memory falls under 2 GB (reported as such).

Cases (all inputs generated in memory: tests/hostile_files.py, hostile_decode._many_element_dicom):
  ztxt               256x256 PNG with 990 zTXt chunks of 7.5 MiB inflated each (7.6 MB file), 2 uploads at once;
                     then (fresh server) 4 concurrent 1.5 MB variants (198 chunks) while a normal client runs
  restart_markers    FF D8 + 30 M restart markers (60 MB), 4 uploads at once, normal client running
  unread_explain     34 clients each POST 16 noise PNGs (1024x1024) to /v1/explain and never read the answer;
                     launched so that at most 2 are being processed (paced by the server's request counter in
                     /metrics: more at once are refused 503 by the decode backlog), sockets held until
                     --hold s after the last launch; when the server closes each socket (its fd, from /proc),
                     what a final read finds, and RSS before and after the sockets close
  slowloris          520 sockets send half a request header and one byte every 3 s, each reopened as soon as the
                     server closes it, for --slowloris-s; meanwhile 60 honest predictions spaced over the period
  honest_256         256 concurrent honest clients x 4 normal predictions each; then (fresh server) 4 concurrent
                     honest 60 MB uploads (16-bit gray noise PNG, 5500x5500) with a normal client running
  dicom_preamble     DICOM whose 128-byte preamble holds e0 7f 10 00, then 1 M tiny private elements (10 MB)
  decode_pool_fairness  16 concurrent DICOMs with 200 k elements (2 MB header, under the limit; ~2 s of decoding
                     each) from one client while another sends a small plain DICOM: its latency
  header_limits      a request with 10,000 header fields; a request with a 100 kB URL
(The "signed is not what runs" swap race is tested in tests/test_trust.py and not repeated here.)

Outputs in --out: hostile_round3.json (everything, including RSS and /healthz time series), hostile_round3.md
(command line, tables side by side) and hostile_round3.png (RSS above idle and /healthz latency over time).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import hostile_files as H  # noqa: E402
from hostile_decode import _many_element_dicom, tree_rss_mb  # noqa: E402
from loadtest import LocalServer  # noqa: E402

HOSTILE_ADDR, HONEST_ADDR, PROBE_ADDR = "127.0.0.2", "127.0.0.3", "127.0.0.1"
CASES = ["ztxt", "restart_markers", "unread_explain", "slowloris", "honest_256", "dicom_preamble",
         "decode_pool_fairness", "header_limits"]


# ---------------------------------------------------------------------------------------------- process tree
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, rss bytes), from /proc/*/stat (the accounting of hostile_decode.tree_rss_mb)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (int(f[1]), int(f[21]) * 4096)
            except (OSError, IndexError, ValueError):
                continue
    return out


def tree_pids(root: int) -> set[int]:
    table = _proc_table()
    tree = {root}
    for _ in range(3):  # server -> decode workers (and their helpers), as tree_rss_mb
        tree |= {pid for pid, (ppid, _) in table.items() if ppid in tree}
    return {p for p in tree if p in table}


def pids_rss_mb(pids) -> float:
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[21]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def kill_tree(root: int, pids=None) -> None:
    """SIGKILL the server and its descendants (only processes of the tree this harness started)."""
    pids = set(pids or ()) | tree_pids(root)
    for p in sorted(pids, key=lambda p: p == root):  # children first
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------- server
def serve_help(src: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    return subprocess.run([sys.executable, "-m", "cxr_edge.cli", "serve", "--help"], env=env, cwd=src,
                          capture_output=True, text=True, timeout=120, check=False).stdout


def flag_default(help_text: str, flag: str) -> str | None:
    """The "(default: X)" of ``flag`` in argparse help, or None when the flag is not listed."""
    m = re.search(rf"\n  {re.escape(flag)} [A-Z_]+\n?(.*?)(?=\n  -|\Z)", help_text, re.S)
    if not m:
        return None
    d = re.search(r"\(default:\s*([^)]*)\)", " ".join(m.group(1).split()))
    return d.group(1) if d else "listed"


def split_flags(args: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


class Server(LocalServer):
    """LocalServer with its stderr kept in a log file (outside the repository) and a hard stop of the whole tree
    (a graceful drain with unread responses open takes up to --timeout; nothing of it is measured)."""

    def __init__(self, artifact, src, extra, log_path: Path):
        super().__init__(artifact, extra=extra, src=src)
        self.log_path = log_path

    def __enter__(self):
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = self._subprocess.Popen(self.cmd, stdout=self._log, stderr=self._subprocess.STDOUT,
                                           env=self.env, cwd=self.cwd)
        t = time.monotonic()
        while time.monotonic() - t < 180:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(self.cmd)}; "
                                   f"log {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    self.start_s = time.monotonic() - t
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("server did not become ready in 180 s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __exit__(self, *exc):
        pids = tree_pids(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except self._subprocess.TimeoutExpired:
            pass
        kill_tree(self.proc.pid, pids)
        try:
            self.proc.wait(timeout=10)
        except self._subprocess.TimeoutExpired:
            pass
        self._log.close()


# ---------------------------------------------------------------------------------------------- raw HTTP
def http_raw(port: int, request: bytes, timeout: float = 30.0, source: str | None = None, keep_body: bool = True):
    """One request on a new connection (``Connection: close`` expected in ``request``). Returns a dict with
    status (None without an answer), outcome (answered / reset / timeout / closed without answer / ...),
    seconds, body (bytes) and send_error (the server may answer before reading all of a refused request)."""
    t = time.perf_counter()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    res = {"status": None, "outcome": "", "body": b"", "send_error": None}
    try:
        if source:
            s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            res["send_error"] = type(exc).__name__
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
        if b"\r\n\r\n" not in buf:
            res["outcome"] = "closed without answer" if not buf else "partial answer"
            return _done(res, t)
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        res["status"] = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        n = int(fields["content-length"]) if fields.get("content-length", "").isdigit() else None
        res["outcome"] = "answered, then reset"  # if the read below is cut off
        while n is None or len(body) < n:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            body += chunk if keep_body else b""
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = _dechunk(body)
        res["body"], res["outcome"] = body, "answered"
    except TimeoutError:
        res["outcome"] = "timeout" if res["status"] is None else "answered, then timeout"
    except ConnectionResetError:
        res["outcome"] = "reset" if res["status"] is None else res["outcome"]
    except OSError as exc:
        res["outcome"] = f"{type(exc).__name__}: {exc}"[:80]
    finally:
        s.close()
    return _done(res, t)


def _dechunk(data: bytes) -> bytes:
    out, i = b"", 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return out
        try:
            n = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            return out
        if n == 0:
            return out
        out += data[j + 2 : j + 2 + n]
        i = j + 4 + n


def _done(res: dict, t: float) -> dict:
    res["seconds"] = time.perf_counter() - t
    return res


def post_request(path: str, body: bytes, ctype: str = "application/octet-stream", close: bool = True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def multipart(files: list[bytes], field: str = "files") -> tuple[bytes, str]:
    boundary = "hostile-round3-boundary-7d1c"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"n{k}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for k, f in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def answer_text(status, body: bytes) -> str:
    """What the server said: the first result's error or label, or the detail; the raw text otherwise."""
    try:
        res = json.loads(body)
        item = (res.get("results") or [{}])[0]
        return str(item.get("error") or item.get("label") or res.get("detail"))[:140]
    except (ValueError, AttributeError):
        return body[:140].decode("latin-1", "replace")


def answer_key(r: dict) -> str:
    return str(r["status"]) if r["status"] is not None else r["outcome"]


# ---------------------------------------------------------------------------------------------- monitors
#: the /healthz prober (its own process): a new connection every 50 ms; prints "wall_time ms status" per probe
PROBE = r"""
import socket, sys, time
port, src = int(sys.argv[1]), sys.argv[2]
req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
while True:
    t, t0, status = time.time(), time.perf_counter(), ""
    s = socket.socket()
    s.settimeout(10)
    try:
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(req)
        buf = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            buf += c
        status = buf[9:12].decode() if buf.startswith(b"HTTP/") else "closed_without_answer"
    except TimeoutError:
        status = "timeout"
    except ConnectionResetError:
        status = "reset"
    except OSError as e:
        status = type(e).__name__
    finally:
        s.close()
    dt = time.perf_counter() - t0
    print(f"{t:.4f} {dt * 1e3:.2f} {status}", flush=True)
    time.sleep(max(0.0, 0.05 - dt))
"""

class Monitor:
    """Tree RSS every 10 ms (peak, series) and /healthz every 50 ms on a new connection, from a thread each."""

    def __init__(self, srv: Server, cap_mb: float, healthz: bool = True):
        self.srv, self.cap_mb, self.do_healthz = srv, cap_mb, healthz
        self.stop_ev = threading.Event()
        self.rss: list[tuple[float, float]] = []
        self.health: list[tuple[float, float, str]] = []
        self.killed: str | None = None
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self):
        pid = self.srv.proc.pid
        self.pids = tree_pids(pid)
        samples = []
        for _ in range(10):
            samples.append(pids_rss_mb(self.pids))
            time.sleep(0.05)
        self.idle = float(np.median(samples))
        self.idle_tree_rss_mb = tree_rss_mb(pid)  # hostile_decode's full scan, for comparison
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        self.threads = [threading.Thread(target=self._sample, daemon=True)]
        if self.do_healthz:
            self.threads.append(threading.Thread(target=self._healthz, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def mark(self, name: str) -> None:
        self.marks[name] = round(self.now(), 3)

    def rss_now(self) -> float:
        return pids_rss_mb(self.pids) - self.idle

    def _sample(self):
        last_scan = time.perf_counter()
        pid = self.srv.proc.pid
        while not self.stop_ev.is_set():
            if time.perf_counter() - last_scan > 0.25:
                self.pids = tree_pids(pid) or self.pids
                last_scan = time.perf_counter()
            above = pids_rss_mb(self.pids) - self.idle
            self.rss.append((self.now(), above))
            if self.killed is None and (above > self.cap_mb or mem_available_mb() < 2048):
                self.killed = (f"harness killed the server at +{above:.0f} MB above idle "
                               f"(cap {self.cap_mb:.0f} MB, {mem_available_mb():.0f} MB available)")
                kill_tree(pid, self.pids)
            time.sleep(0.01)

    def _healthz(self):
        """The prober runs in its own process: in a thread here it would wait for this harness's GIL."""
        self.probe = subprocess.Popen([sys.executable, "-c", PROBE, str(self.srv.port), PROBE_ADDR],
                                      stdout=subprocess.PIPE, text=True)
        for line in self.probe.stdout:
            try:
                t, ms, status = line.split()
                self.health.append((float(t) - self.t0_wall, float(ms), status.replace("_", " ")))
            except ValueError:
                continue

    def stop(self) -> dict:
        self.stop_ev.set()
        if getattr(self, "probe", None) is not None:
            self.probe.terminate()
            self.probe.wait(timeout=10)
        for t in self.threads:
            t.join(timeout=15)
        peak = max([v for _, v in self.rss] or [0.0])
        out = {"rss_idle_mb": round(self.idle), "rss_idle_mb_tree_rss_mb": round(self.idle_tree_rss_mb),
               "rss_peak_above_mb": round(peak), "rss_samples": len(self.rss), "killed_by_harness": self.killed,
               "marks": self.marks, "rss_series": _downsample(self.rss, 0.1)}
        if self.do_healthz:
            ms = np.array([m for _, m, _ in self.health]) if self.health else np.array([np.nan])
            out["healthz"] = {"n": len(self.health), "answers": dict(Counter(s for _, _, s in self.health)),
                              "p50_ms": _r(np.percentile(ms, 50)), "p99_ms": _r(np.percentile(ms, 99)),
                              "max_ms": _r(ms.max()), "over_100ms": int((ms > 100).sum()),
                              "series": [(round(t, 3), round(m, 1), s) for t, m, s in self.health]}
        return out


def _downsample(series, step: float):
    """Max per ``step`` seconds (peaks survive)."""
    out: dict[int, tuple[float, float]] = {}
    for t, v in series:
        k = int(t / step)
        if k not in out or v > out[k][1]:
            out[k] = (t, v)
    return [(round(t, 2), round(v, 1)) for t, v in out.values()]


def _r(x, nd: int = 1):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def latency_summary(lat: list[tuple[float, float, str]]) -> dict:
    """(t, seconds, answer) -> counts and p50/p99/max in ms."""
    if not lat:
        return {"n": 0, "answers": {}}
    ms = 1e3 * np.array([s for _, s, _ in lat])
    return {"n": len(lat), "answers": dict(Counter(a for _, _, a in lat)), "p50_ms": _r(np.percentile(ms, 50)),
            "p99_ms": _r(np.percentile(ms, 99)), "max_ms": _r(ms.max())}


class NormalClient:
    """A normal client sending the normal image to /v1/predict in a loop on a kept-alive connection."""

    def __init__(self, srv: Server, image: bytes, mon: Monitor, source: str = HONEST_ADDR):
        import httpx

        self.srv, self.image, self.mon = srv, image, mon
        self.client = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=source))
        self.lat: list[tuple[float, float, str]] = []
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_ev.is_set():
            t = time.perf_counter()
            try:
                r = self.client.post(self.srv.url + "/v1/predict", content=self.image)
                ans = str(r.status_code)
            except Exception as exc:  # every failure is an answer here
                ans = type(exc).__name__
                time.sleep(0.1)
            self.lat.append((self.mon.now(), time.perf_counter() - t, ans))

    def stop(self) -> dict:
        self.stop_ev.set()
        self.thread.join(timeout=40)
        self.client.close()
        return latency_summary(self.lat)


def concurrent_posts(port: int, path: str, bodies: list[bytes], timeout: float, source: str = HOSTILE_ADDR,
                     ctype: str = "application/octet-stream") -> list[dict]:
    """All ``bodies`` at once, one connection each; answers in order."""
    with ThreadPoolExecutor(len(bodies)) as ex:
        futs = [ex.submit(http_raw, port, post_request(path, b, ctype), timeout, source) for b in bodies]
        rs = [f.result() for f in futs]
    return [{"status": r["status"], "outcome": r["outcome"], "seconds": round(r["seconds"], 2),
             "answer": answer_text(r["status"], r["body"]) if r["status"] else r["outcome"]} for r in rs]


# ---------------------------------------------------------------------------------------------- inputs
class Inputs:
    """Every case's bytes, built once and shared by both targets."""

    def __init__(self, normal: bytes):
        self.normal = normal
        self._cache: dict[str, object] = {}

    def get(self, key: str):
        if key not in self._cache:
            self._cache[key] = getattr(self, "_" + key)()
        return self._cache[key]

    @staticmethod
    def _ztxt_big():
        return H.png_with_text_chunks(256, 256, n=990, inflated=int(7.5 * 2**20))

    @staticmethod
    def _ztxt_small():
        return H.png_with_text_chunks(256, 256, n=198, inflated=int(7.5 * 2**20))

    @staticmethod
    def _restart():
        return H.jpeg_restart_run(H.jpeg(H.gradient(512, 512)), 30_000_000)

    @staticmethod
    def _explain_body():
        import cv2

        rng = np.random.default_rng(26)
        pngs = [cv2.imencode(".png", rng.integers(0, 256, (1024, 1024), np.uint8))[1].tobytes() for _ in range(16)]
        return multipart(pngs)

    @staticmethod
    def _big_png():
        import cv2

        img = np.random.default_rng(60).integers(0, 65536, (5500, 5500), np.uint16)
        return cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()

    @staticmethod
    def _dicom_preamble():
        data = bytearray(_many_element_dicom(1_000_000))
        data[:128] = bytes(60) + b"\xe0\x7f\x10\x00OW\x00\x00" + bytes(60)  # the pixel data tag, in the preamble
        return bytes(data)

    @staticmethod
    def _dicom_slow():
        return _many_element_dicom(200_000)

    @staticmethod
    def _dicom_plain():
        return H.dicom_plain()


# ---------------------------------------------------------------------------------------------- cases
def case_ztxt_big(srv, mon, inp, a):
    body = inp.get("ztxt_big")
    mon.mark("send")
    answers = concurrent_posts(srv.port, "/v1/predict", [body] * 2, timeout=a.client_timeout)
    mon.mark("answered")
    return {"bytes_each": len(body), "hostile": answers}


def case_ztxt_small(srv, mon, inp, a):
    body = inp.get("ztxt_small")
    mon.mark("send")
    answers = concurrent_posts(srv.port, "/v1/predict", [body] * 4, timeout=a.client_timeout)
    mon.mark("answered")
    return {"bytes_each": len(body), "hostile": answers}


def case_restart_markers(srv, mon, inp, a):
    body = inp.get("restart")
    mon.mark("send")
    answers = concurrent_posts(srv.port, "/v1/predict", [body] * 4, timeout=a.client_timeout)
    mon.mark("answered")
    return {"bytes_each": len(body), "hostile": answers}


def _server_socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    except OSError:
        pass
    return out


def _server_side_sockets(server_port: int) -> dict[int, tuple[int, int]]:
    """client port -> (inode, tx_queue bytes) of the server-side TCP sockets on ``server_port`` (/proc/net/tcp)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        lport = int(f[1].split(":")[1], 16)
        if lport == server_port:
            out[int(f[2].split(":")[1], 16)] = (int(f[9]), int(f[4].split(":")[0], 16))
    return out


def _explain_finished(port: int) -> float | None:
    r = http_raw(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=3,
                 source=PROBE_ADDR)
    if r["status"] != 200:
        return None
    return sum(float(m.group(1)) for m in re.finditer(rb'cxr_requests_total\{endpoint="explain",[^}]*\} ([0-9.e+]+)',
                                                      r["body"]))


def case_unread_explain(srv, mon, inp, a):
    body, ctype = inp.get("explain_body")
    request = post_request("/v1/explain", body, ctype, close=False)
    socks: list[dict] = []
    done0 = _explain_finished(srv.port) or 0.0
    held: dict[int, float] = {}
    polling = threading.Event()

    def poll():  # who holds each client's socket: the server's fds (/proc/PID/fd) against /proc/net/tcp, every 0.5 s
        while not polling.is_set() and srv.alive():
            inodes = _server_socket_inodes(srv.proc.pid)
            side = _server_side_sockets(srv.port)
            t = mon.now()
            for rec in list(socks):
                p = rec.get("port")
                if p is None or "server_closed_at" in rec:
                    continue
                ino = side.get(p, (0, 0))[0]
                if ino and ino in inodes:
                    held[p] = t
                elif p in held:  # the server held it and no longer does
                    rec["server_closed_at"] = round(t, 2)
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    mon.mark("first_send")
    for i in range(a.unread_clients):
        t_wait = time.perf_counter()
        while time.perf_counter() - t_wait < a.unread_pace_max_s:  # at most 2 being processed at once
            fin = _explain_finished(srv.port)
            if fin is None or (len(socks) - (fin - done0)) < 2:
                break
            time.sleep(0.1)
        s = socket.socket()
        s.settimeout(60)
        rec = {"client": i, "sent_at": None, "send_error": None}
        try:
            s.bind((HOSTILE_ADDR, 0))
            s.connect(("127.0.0.1", srv.port))
            rec["port"] = s.getsockname()[1]
            s.sendall(request)
        except OSError as exc:
            rec["send_error"] = f"{type(exc).__name__}: {exc}"[:80]
        rec["sent_at"] = round(mon.now(), 2)
        rec["sock"] = s
        socks.append(rec)
    mon.mark("last_send")
    fin = _explain_finished(srv.port)
    time.sleep(a.hold)
    polling.set()
    poller.join(timeout=10)
    mon.mark("hold_end")
    rss_end_hold = mon.rss_now()
    still_held = sum(1 for r in socks if r.get("port") in held and "server_closed_at" not in r)
    for rec in socks:  # the final read: what did the server leave on this socket?
        s = rec.pop("sock")
        got, outcome = b"", "open (nothing more within 0.5 s)"
        s.settimeout(0.5)
        try:
            while len(got) < 200 * 2**20:
                chunk = s.recv(1 << 20)
                if not chunk:
                    outcome = "EOF"
                    break
                got += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            outcome = "RST"
        except OSError as exc:
            outcome = type(exc).__name__
        status, complete = None, False
        if got.startswith(b"HTTP/1.1 "):
            status = int(got[9:12])
            head, _, rest = got.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            complete = bool(m) and len(rest) >= int(m.group(1))
        rec.update(final_read=outcome, bytes_read=len(got), status=status, response_complete=complete)
        s.close()
    mon.mark("closed")
    time.sleep(5)
    after = []
    for _ in range(10):
        after.append(mon.rss_now())
        time.sleep(0.1)
    rss_after = float(np.mean(after))
    closes = [r["server_closed_at"] - r["sent_at"] for r in socks if "server_closed_at" in r]
    return {"clients": len(socks), "request_bytes": len(request), "explain_requests_finished_at_last_send":
            None if fin is None else fin - done0,
            "final_read": dict(Counter(r["final_read"] for r in socks)),
            "statuses_read": dict(Counter(str(r["status"]) for r in socks)),
            "responses_complete": sum(r["response_complete"] for r in socks),
            "bytes_read_total_mb": round(sum(r["bytes_read"] for r in socks) / 2**20, 1),
            "server_closed_before_hold_end": len(closes), "server_still_held_at_hold_end": still_held,
            "never_seen_held": sum(1 for r in socks if r.get("port") not in held),
            "close_s_after_send": {"min": _r(min(closes)) if closes else None,
                                   "median": _r(np.median(closes)) if closes else None,
                                   "max": _r(max(closes)) if closes else None},
            "rss_above_idle_at_hold_end_mb": round(rss_end_hold), "rss_above_idle_5s_after_close_mb": round(rss_after),
            "sockets": socks}


def case_slowloris(srv, mon, inp, a):
    stats = Counter()
    lifetimes: list[float] = []
    honest: list[tuple[float, float, str]] = []
    stop = threading.Event()
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"X-Slow: ")
    duration = a.slowloris_s

    async def loris(i: int):
        await asyncio.sleep(i * 1.0 / a.slowloris_sockets)  # the 520 open within a second
        while not stop.is_set():
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port,
                                                                      local_addr=(HOSTILE_ADDR, 0)), 5)
            except (OSError, asyncio.TimeoutError) as exc:
                stats[f"connect failed ({type(exc).__name__})"] += 1
                await asyncio.sleep(0.2)
                continue
            stats["opened"] += 1
            t_open = time.perf_counter()
            try:
                w.write(head)
                while not stop.is_set():
                    try:
                        data = await asyncio.wait_for(r.read(4096), 3.0 + (i % 7) * 0.01)
                    except asyncio.TimeoutError:
                        w.write(b"a")
                        await w.drain()
                        continue
                    if not data:
                        stats["closed by server (EOF)"] += 1
                    else:
                        stats[f"answered {data[9:12].decode('latin-1', 'replace')}"] += 1
                    lifetimes.append(time.perf_counter() - t_open)
                    break
            except (ConnectionError, OSError) as exc:
                stats[f"closed by server ({type(exc).__name__})"] += 1
                lifetimes.append(time.perf_counter() - t_open)
            finally:
                w.close()

    async def attack():
        tasks = [asyncio.create_task(loris(i)) for i in range(a.slowloris_sockets)]
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.wait(tasks, timeout=10)

    def honest_one():
        r = http_raw(srv.port, post_request("/v1/predict", inp.normal), timeout=30, source=HONEST_ADDR)
        honest.append((mon.now(), r["seconds"], answer_key(r)))

    mon.mark("attack_start")
    th = threading.Thread(target=lambda: asyncio.run(attack()), daemon=True)
    th.start()
    time.sleep(2.0)  # the sockets are open
    n = a.slowloris_honest
    gap = (duration - 3.0) / n
    with ThreadPoolExecutor(16) as ex:
        for _ in range(n):
            ex.submit(honest_one)
            time.sleep(gap)
    th.join(timeout=duration + 30)
    mon.mark("attack_end")
    lt = np.array(lifetimes) if lifetimes else np.array([np.nan])
    return {"sockets": a.slowloris_sockets, "seconds": duration, "attack": dict(stats),
            "socket_lifetime_s": {"p50": _r(np.percentile(lt, 50)), "min": _r(np.nanmin(lt)), "max": _r(np.nanmax(lt))},
            "honest": latency_summary(honest), "honest_ok": sum(1 for *_, s in honest if s == "200"),
            "honest_sent": len(honest)}


def case_honest_256(srv, mon, inp, a):
    statuses, details = Counter(), Counter()
    lat: list[tuple[float, float, str]] = []
    body = inp.normal
    req = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def client(k: int):
        addr = f"127.1.{k // 250}.{k % 250 + 1}"
        conn = None
        for _ in range(a.honest_repeats):
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port, local_addr=(addr, 0)), 30)
                reader, writer = conn

                async def one(reader, writer):
                    writer.write(req)
                    await writer.drain()
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                    data = await reader.readexactly(int(fields.get("content-length", 0)))
                    return int(head[0].split()[1]), fields.get("connection", "").lower() == "close", data

                status, close, data = await asyncio.wait_for(one(reader, writer), 60)
                ans = str(status)
                if status != 200:
                    details[f"{status} {re.sub(r'[0-9]+', 'N', answer_text(status, data))[:90]}"] += 1
                if close:
                    writer.close()
                    conn = None
            except asyncio.TimeoutError:
                ans = "timeout"
                conn = _drop(conn)
            except asyncio.IncompleteReadError:
                ans = "closed mid-answer"
                conn = _drop(conn)
            except (ConnectionError, OSError) as exc:
                ans = "reset" if isinstance(exc, ConnectionResetError) else type(exc).__name__
                conn = _drop(conn)
            statuses[ans] += 1
            lat.append((mon.now(), time.perf_counter() - t, ans))
        _drop(conn)

    async def run():
        await asyncio.gather(*(client(k) for k in range(a.honest_clients)))

    mon.mark("start")
    t = time.perf_counter()
    asyncio.run(run())
    mon.mark("end")
    wall = time.perf_counter() - t
    return {"clients": a.honest_clients, "requests_each": a.honest_repeats, "wall_s": round(wall, 2),
            "honest": latency_summary(lat), "honest_ok": statuses.get("200", 0), "honest_sent": len(lat),
            "non_200_answers": dict(details), "throughput_rps": round(statuses.get("200", 0) / wall, 1)}


def _drop(conn):
    if conn is not None:
        conn[1].close()
    return None


def case_honest_60mb(srv, mon, inp, a):
    body = inp.get("big_png")
    mon.mark("send")
    answers = concurrent_posts(srv.port, "/v1/predict", [body] * 4, timeout=a.client_timeout, source=HONEST_ADDR,
                               ctype="image/png")
    mon.mark("answered")
    return {"bytes_each": len(body), "honest_big": answers,
            "honest_ok": sum(1 for x in answers if x["status"] == 200), "honest_sent": len(answers),
            "count_408": sum(1 for x in answers if x["status"] == 408)}


def case_dicom_preamble(srv, mon, inp, a):
    body = inp.get("dicom_preamble")
    mon.mark("send")
    answers = concurrent_posts(srv.port, "/v1/predict", [body], timeout=a.client_timeout, ctype="application/dicom")
    mon.mark("answered")
    return {"bytes_each": len(body), "hostile": answers}


def case_decode_pool_fairness(srv, mon, inp, a):
    slow, plain = inp.get("dicom_slow"), inp.get("dicom_plain")
    honest_req = post_request("/v1/predict", plain, "application/dicom")
    idle = [http_raw(srv.port, honest_req, 30, HONEST_ADDR) for _ in range(3)]
    mon.mark("send")
    honest: list[tuple[float, float, str]] = []
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(concurrent_posts, srv.port, "/v1/predict", [slow] * 16, a.client_timeout, HOSTILE_ADDR,
                        "application/dicom")
        time.sleep(0.5)  # the 16 are in the decode queue
        while not fut.done() and len(honest) < 10:
            r = http_raw(srv.port, honest_req, a.client_timeout, HONEST_ADDR)
            honest.append((mon.now(), r["seconds"], answer_key(r)))
        answers = fut.result()
    mon.mark("answered")
    return {"bytes_each": len(slow), "hostile": answers,
            "honest_idle_ms": [round(1e3 * r["seconds"], 1) for r in idle],
            "honest_first_ms": round(1e3 * honest[0][1], 1) if honest else None,
            "honest": latency_summary(honest), "honest_ok": sum(1 for *_, s in honest if s == "200"),
            "honest_sent": len(honest)}


def case_header_limits(srv, mon, inp, a):
    many = (b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-Pad-%d: %d\r\n" % (i, i) for i in range(10_000)) + b"Connection: close\r\n\r\n")
    url = b"GET /healthz?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    out = {}
    for name, req in (("10000_headers", many), ("100kB_url", url)):
        rs = []
        for _ in range(3):
            r = http_raw(srv.port, req, timeout=15, source=HOSTILE_ADDR)
            rs.append({"status": r["status"], "outcome": r["outcome"], "seconds": round(r["seconds"], 3),
                       "send_error": r["send_error"], "answer": r["body"][:100].decode("latin-1", "replace")})
        out[name] = {"bytes": len(req), "answers": rs}
    after = http_raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 10)
    out["healthz_after"] = answer_key(after)
    out["hostile"] = [dict(x, case=k) for k in ("10000_headers", "100kB_url") for x in out[k]["answers"]]
    return out


#: (case, subcase, title, function, normal client loop, healthz, extra flags key)
SUBCASES = [
    ("ztxt", "ztxt_7.6MB_x2", "PNG, 990 zTXt chunks x 7.5 MiB (7.6 MB), 2 at once", case_ztxt_big, True),
    ("ztxt", "ztxt_1.5MB_x4", "PNG, 198 zTXt chunks x 7.5 MiB (1.5 MB), 4 at once", case_ztxt_small, True),
    ("restart_markers", "restart_markers", "JPEG FF D8 + 30 M restart markers (60 MB), 4 at once",
     case_restart_markers, True),
    ("unread_explain", "unread_explain", "{a.unread_clients} clients x 16 noise PNGs 1024^2 to /v1/explain, never read",
     case_unread_explain, False),
    ("slowloris", "slowloris", "{a.slowloris_sockets} half-header sockets, 1 byte / 3 s, reopened, {a.slowloris_s:.0f} s; "
     "{a.slowloris_honest} honest predictions",
     case_slowloris, False),
    ("honest_256", "honest_256", "{a.honest_clients} concurrent honest clients x {a.honest_repeats} predictions", case_honest_256, False),
    ("honest_256", "honest_60MB_x4", "4 concurrent honest 60 MB uploads (16-bit PNG 5500^2)", case_honest_60mb, True),
    ("dicom_preamble", "dicom_preamble", "DICOM, e0 7f 10 00 in the preamble, 1 M tiny elements (10 MB)",
     case_dicom_preamble, True),
    ("decode_pool_fairness", "decode_pool_fairness", "16 DICOMs x 200 k elements (2 MB) + 1 honest plain DICOM",
     case_decode_pool_fairness, False),
    ("header_limits", "header_limits", "10,000 header fields; a 100 kB URL (3 each)", case_header_limits, False),
]


def server_metrics(port: int) -> dict:
    """The server's own counters at the end of a case: requests by status, images by outcome, replaced decode
    workers, and (where the tree has them) the transport guards' events."""
    r = http_raw(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=5,
                 source=PROBE_ADDR)
    if r["status"] != 200:
        return {"unavailable": answer_key(r)}
    keep = ("cxr_requests_total", "cxr_images_total", "cxr_decode_workers_replaced", "cxr_transport_guard_events")
    out = {}
    for line in r["body"].decode("latin-1").splitlines():
        if line.startswith(keep):
            name, _, value = line.rpartition(" ")
            if float(value):
                out[name] = float(value)
    return out


def run_subcase(target: dict, sub, inp: Inputs, a) -> dict:
    case, key, title, fn, normal_loop = sub
    extra = list(target["extra"])
    if key == "unread_explain":
        for flag, val in (("--write-timeout", a.write_timeout), ("--max-unsent-mb", a.max_unsent_mb)):
            if val is not None and flag_default(target["help"], flag) is not None:
                extra += [flag, str(val)]
    row = {"case": case, "subcase": key, "title": title.format(a=a), "target": target["name"], "server_flags": extra}
    t = time.perf_counter()
    srv = Server(a.artifact, target["src"], extra, Path(a.log_dir) / f"{target['name']}_{key}.log")
    try:
        with srv:
            row["server_start_s"] = round(srv.start_s, 1)
            import httpx

            for _ in range(3):  # warm: the first requests allocate
                httpx.post(srv.url + "/v1/predict", content=inp.normal, timeout=30)
            mon = Monitor(srv, a.rss_cap_mb).start()
            normal = NormalClient(srv, inp.normal, mon) if normal_loop else None
            try:
                time.sleep(0.3)
                row.update(fn(srv, mon, inp, a))
                time.sleep(0.5)
            except Exception as exc:  # the case's result, not the run's end
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                if normal is not None:
                    row["normal_client"] = normal.stop()
                row["server_metrics_end"] = server_metrics(srv.port) if srv.alive() else {}
                row.update(mon.stop())
                row["server_alive_at_end"] = srv.alive()
                row["server_exit_code"] = srv.proc.returncode
    except Exception as exc:  # start failures too
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-2000:]
    row["case_wall_s"] = round(time.perf_counter() - t, 1)
    return row


# ---------------------------------------------------------------------------------------------- report
def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def _ans_summary(row: dict) -> str:
    xs = row.get("hostile") or row.get("honest_big")
    if xs:
        c = Counter(f"{x['status'] if x['status'] is not None else x['outcome']}" for x in xs)
        texts = sorted({x["answer"][:70] for x in xs})
        return ", ".join(f"{k} x{v}" for k, v in c.items()) + (f" ({'; '.join(texts)[:150]})" if texts else "")
    if row["subcase"] == "unread_explain":
        return (f"read at end: {row.get('statuses_read')} complete {row.get('responses_complete')}/{row.get('clients')}; "
                f"final read {row.get('final_read')}")
    if row["subcase"] == "slowloris":
        return f"{row.get('attack')}"
    if row["subcase"] == "honest_256":
        return f"{row.get('honest', {}).get('answers')}"
    return ""


def _seconds(row: dict):
    xs = row.get("hostile") or row.get("honest_big")
    if xs:
        return max(x["seconds"] for x in xs)
    if row["subcase"] == "honest_256":
        return row.get("wall_s")
    return None


def _client_summary(row: dict) -> str:
    parts = []
    for k in ("normal_client", "honest"):
        c = row.get(k)
        if c and c.get("n"):
            parts.append(f"{'normal loop' if k == 'normal_client' else 'honest'}: {c['answers']} "
                         f"p50 {c.get('p50_ms')} / p99 {c.get('p99_ms')} / max {c.get('max_ms')} ms")
    if row["subcase"] == "decode_pool_fairness" and row.get("honest_first_ms") is not None:
        parts.append(f"first honest DICOM {row['honest_first_ms']} ms (idle {row.get('honest_idle_ms')})")
    if "honest_ok" in row:
        parts.append(f"honest lost {row['honest_sent'] - row['honest_ok']}/{row['honest_sent']}")
    return "; ".join(parts)


def _healthz(row: dict) -> str:
    h = row.get("healthz")
    if not h:
        return "-"
    bad = {k: v for k, v in h["answers"].items() if k != "200"}
    return f"{h['p50_ms']} / {h['p99_ms']} / {h['max_ms']} (n {h['n']}{', not 200: ' + str(bad) if bad else ''})"


def _notes(row: dict) -> str:
    notes = []
    if row.get("error"):
        notes.append(f"ERROR {row['error'][:160]}")
    if row.get("killed_by_harness"):
        notes.append(row["killed_by_harness"])
    if row.get("server_alive_at_end") is False:
        notes.append(f"server died (exit {row.get('server_exit_code')})")
    if row["subcase"] == "unread_explain" and "clients" in row:
        cs = row["close_s_after_send"]
        notes.append(f"server closed {row['server_closed_before_hold_end']}/{row['clients']} sockets before the hold ended "
                     f"(s after send: min {cs['min']}, median {cs['median']}, max {cs['max']}), still held at hold end "
                     f"{row['server_still_held_at_hold_end']}; RSS above idle at hold end {row['rss_above_idle_at_hold_end_mb']} MB, "
                     f"5 s after closing {row['rss_above_idle_5s_after_close_mb']} MB")
    if row["subcase"] == "slowloris" and "socket_lifetime_s" in row:
        notes.append(f"attack socket lifetime p50 {row['socket_lifetime_s']['p50']} s")
    if row.get("non_200_answers"):
        notes.append(f"non-200 answers: {row['non_200_answers']}")
    events = {k.split('"')[1]: int(v) for k, v in (row.get("server_metrics_end") or {}).items()
              if k.startswith("cxr_transport_guard_events")}
    if events:
        notes.append(f"server transport events: {events}")
    if row["subcase"] == "header_limits" and "healthz_after" in row:
        notes.append(f"/healthz after: {row['healthz_after']}")
    return "; ".join(notes)


def _key(row: dict) -> str:
    """The case's own headline number, for the before/after table."""
    k = row["subcase"]
    if row.get("error") and "rss_peak_above_mb" not in row:
        return "error: " + row["error"][:80]
    if k == "unread_explain" and "clients" in row:
        return (f"RSS at hold end +{row['rss_above_idle_at_hold_end_mb']} MB, 5 s after close +"
                f"{row['rss_above_idle_5s_after_close_mb']} MB; server closed {row['server_closed_before_hold_end']}/"
                f"{row['clients']} (median {row['close_s_after_send']['median']} s after send)")
    if k == "slowloris" and "honest" in row:
        return f"honest {row['honest']['answers']}; attack sockets opened {row['attack'].get('opened', 0)}"
    if k == "honest_256" and "honest" in row:
        return f"{row['honest']['answers']}, p99 {row['honest'].get('p99_ms')} ms"
    if k == "decode_pool_fairness" and row.get("honest_first_ms") is not None:
        return f"first honest DICOM {row['honest_first_ms']} ms; hostile {dict(Counter(str(x['status']) for x in row['hostile']))}"
    if k == "header_limits" and "hostile" in row:
        return "; ".join(f"{n}: {sorted({answer_key(x) if x['status'] is None else str(x['status']) + ('' if x['outcome'] == 'answered' else ' (' + x['outcome'] + ')') for x in row[n]['answers']})}"
                         for n in ("10000_headers", "100kB_url"))
    xs = row.get("hostile") or row.get("honest_big")
    if xs:
        return ", ".join(f"{a} x{n}" for a, n in Counter(str(x["status"]) if x["status"] else x["outcome"] for x in xs).items())
    return "-"


def _acceptance(row: dict) -> str:
    if row.get("error") and "rss_peak_above_mb" not in row:
        return "error"
    marks = ["RSS " + ("ok" if row.get("rss_peak_above_mb", 1e9) <= 1024 and not row.get("killed_by_harness") else "FAIL")]
    h = row.get("healthz")
    if h and h.get("max_ms") is not None:
        marks.append("healthz " + ("ok" if h["max_ms"] < 100 and set(h["answers"]) <= {"200"} else "FAIL"))
    if "honest_ok" in row:
        marks.append("honest " + ("ok" if row["honest_ok"] == row["honest_sent"] else "FAIL"))
    return ", ".join(marks)


def write_report(out: Path, meta: dict, rows: list[dict], echo: bool = False) -> None:
    slim = [{k: v for k, v in r.items()} for r in rows]
    (out / "hostile_round3.json").write_text(json.dumps({"meta": meta, "rows": slim}, indent=1, default=str) + "\n")
    targets = [t["name"] for t in meta["targets"]]
    lines = ["# Issue 26, hardening round 3: hostile clients against `cxr-edge serve` on loopback, before / after", "",
             f"Command: `{meta['command']}`", "",
             f"Measured {meta['started']} on {meta['machine']}. Current tree: HEAD `{meta['current']['head']}`, "
             f"`git status --short cxr_edge`: `{' '.join(meta['current']['status_cxr_edge'].split()) or 'clean'}` "
             f"(diff sha256 `{meta['current']['diff_sha256'][:12]}`). Baseline: "
             + (f"`{meta['baseline']['src']}` at `{meta['baseline']['head']}`." if meta.get("baseline") else "none.")
             + (" **The current tree changed during the run** (see `current_at_end` in the JSON)."
                if meta.get("current_changed_during_run") else ""),
             f"Artifact `{meta['artifact']}`; normal image `{meta['normal_image']}` ({meta['normal_bytes']:,} bytes). "
             "Each case: a fresh server per target with default settings (flags: per row), killed afterwards. "
             "RSS: server + decode workers above idle, sampled every 10 ms; /healthz polled every 50 ms on a new "
             "connection (p50 / p99 / max ms). Acceptance marks: RSS peak <= 1024 MB, /healthz max < 100 ms and all "
             "200, honest requests all 200.", "",
             "| case | target | answers | seconds | RSS peak above idle MB | /healthz p50 / p99 / max ms | normal / honest clients | notes | acceptance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["title"], r["target"], _ans_summary(r), _seconds(r) if _seconds(r) is not None else "-",
                 r.get("rss_peak_above_mb", "-"), _healthz(r), _client_summary(r) or "-", _notes(r) or "-", _acceptance(r)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if len(targets) == 2:
        lines += ["", f"Before ({targets[1]}) -> after ({targets[0]}), same run:", "",
                  "| case | answers / key result (before -> after) | seconds | RSS peak above idle MB | /healthz max ms | "
                  "/healthz p99 ms | honest lost |",
                  "|---|---|---|---|---|---|---|"]
        by = {(r["subcase"], r["target"]): r for r in rows}
        for _, key, *_ in SUBCASES:
            b, c = by.get((key, targets[1])), by.get((key, targets[0]))
            if not b or not c:
                continue
            title = c["title"]

            def pair(f, b=b, c=c):
                vb, vc = f(b), f(c)
                if vb is None and vc is None:
                    return "-"
                ratio = f" ({vb / vc:.0f}x)" if isinstance(vb, (int, float)) and isinstance(vc, (int, float)) and vc > 0 and vb / vc >= 2 else ""
                return f"{vb} -> {vc}{ratio}"

            lost = (lambda r: f"{r['honest_sent'] - r['honest_ok']}/{r['honest_sent']}" if "honest_ok" in r else None)
            lines.append(f"| {title} | {_cell(_key(b))} -> {_cell(_key(c))} | {pair(_seconds)} | {pair(lambda r: r.get('rss_peak_above_mb'))} | "
                         f"{pair(lambda r: (r.get('healthz') or {}).get('max_ms'))} | "
                         f"{pair(lambda r: (r.get('healthz') or {}).get('p99_ms'))} | "
                         f"{(lost(b) or '-') + ' -> ' + (lost(c) or '-') if 'honest_ok' in b or 'honest_ok' in c else '-'} |")
    lines += ["", "Server flags per target: " + "; ".join(f"{t['name']}: `{' '.join(t['extra']) or '(defaults)'}`"
                                                         for t in meta["targets"]),
              "Transport defaults per target (from `serve --help`): " + "; ".join(
                  f"{t['name']}: {t['defaults']}" for t in meta["targets"]), "",
              "Plot: `hostile_round3.png` (RSS above idle and /healthz latency over each case's time)."]
    (out / "hostile_round3.md").write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
    plot(out / "hostile_round3.png", rows, targets)


def plot(path: Path, rows: list[dict], targets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [s[1] for s in SUBCASES if any(r["subcase"] == s[1] for r in rows)]
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 2.3 * len(keys) + 0.6), squeeze=False)
    colours = {targets[0]: "tab:blue", **({targets[1]: "tab:red"} if len(targets) > 1 else {})}
    for i, key in enumerate(keys):
        for r in rows:
            if r["subcase"] != key or "rss_series" not in r:
                continue
            c = colours.get(r["target"], "k")
            t, v = zip(*r["rss_series"]) if r["rss_series"] else ((), ())
            axes[i][0].plot(t, v, color=c, lw=1, label=r["target"])
            h = (r.get("healthz") or {}).get("series") or []
            if h:
                axes[i][1].plot([x[0] for x in h], [max(x[1], 0.1) for x in h], ".", ms=2, color=c, label=r["target"])
                bad = [x for x in h if x[2] != "200"]
                if bad:
                    axes[i][1].plot([x[0] for x in bad], [max(x[1], 0.1) for x in bad], "x", ms=4, color=c)
        axes[i][0].set_ylabel("MB above idle", fontsize=8)
        axes[i][0].set_title(f"{key}: server tree RSS", fontsize=9)
        axes[i][1].set_yscale("log")
        axes[i][1].axhline(100, color="grey", ls="--", lw=0.8)
        axes[i][1].set_ylabel("ms", fontsize=8)
        axes[i][1].set_title(f"{key}: /healthz latency (x: not 200)", fontsize=9)
        for ax in axes[i]:
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the case started", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def _git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=False).stdout.strip()


def _tree_state() -> dict:
    return {"head": _git("rev-parse", "HEAD"), "status_cxr_edge": _git("status", "--short", "cxr_edge"),
            "diff_sha256": hashlib.sha256(_git("diff", "HEAD", "--", "cxr_edge").encode()).hexdigest()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("normal_image")
    ap.add_argument("--out", default="benchmarks/results/hostile_round3_service")
    ap.add_argument("--baseline-src", help="a checkout of the revision before the fixes (run with PYTHONPATH=it)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--serve-args", default="", help="extra `cxr-edge serve` flags, passed to each target whose "
                    "`serve --help` lists them")
    ap.add_argument("--write-timeout", type=float, help="unread_explain: pass --write-timeout S where listed "
                    "(default: the server's own default)")
    ap.add_argument("--max-unsent-mb", type=float, help="unread_explain: pass --max-unsent-mb where listed")
    ap.add_argument("--rss-cap-mb", type=float, default=12000, help="harness kills a server past this above idle")
    ap.add_argument("--client-timeout", type=float, default=180)
    ap.add_argument("--unread-clients", type=int, default=34)
    ap.add_argument("--unread-pace-max-s", type=float, default=10.0, help="longest wait before the next unread client")
    ap.add_argument("--hold", type=float, default=60.0, help="unread_explain: seconds sockets stay open after the last send")
    ap.add_argument("--slowloris-s", type=float, default=30.0)
    ap.add_argument("--slowloris-sockets", type=int, default=520)
    ap.add_argument("--slowloris-honest", type=int, default=60)
    ap.add_argument("--honest-clients", type=int, default=256)
    ap.add_argument("--honest-repeats", type=int, default=4)
    ap.add_argument("--log-dir", default="/tmp/hostile_round3_logs", help="server logs (outside the repository)")
    a = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    chosen = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = set(chosen) - set(CASES)
    if unknown:
        ap.error(f"unknown cases: {sorted(unknown)}")
    a.artifact = str(Path(a.artifact).resolve())
    normal = Path(a.normal_image).read_bytes()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    targets = [{"name": "current", "src": None}]
    if a.baseline_src:
        targets.append({"name": "baseline", "src": str(Path(a.baseline_src).resolve())})
    user_flags = split_flags(a.serve_args.split())
    for t in targets:
        t["help"] = serve_help(t["src"])
        if "--max-body-mb" not in t["help"]:
            sys.exit(f"`cxr-edge serve --help` failed for {t['name']}")
        t["extra"] = [x for g in user_flags if flag_default(t["help"], g[0]) is not None for x in g]
        t["flags_dropped"] = [g[0] for g in user_flags if flag_default(t["help"], g[0]) is None]
        t["defaults"] = {f: flag_default(t["help"], f) for f in ("--header-timeout", "--max-connections",
                         "--max-pending-headers", "--write-timeout", "--max-unsent-mb", "--body-timeout",
                         "--max-inflight-body-mb", "--decode-workers", "--decode-timeout")
                         if flag_default(t["help"], f) is not None}
        env = {**os.environ, "PYTHONPATH": t["src"]} if t["src"] else None
        t["cxr_edge_imported_from"] = subprocess.run([sys.executable, "-c", "import cxr_edge; print(cxr_edge.__file__)"],
                                                     env=env, cwd=t["src"], capture_output=True, text=True).stdout.strip()

    cmd = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": "python benchmarks/hostile_round3.py " + " ".join(shlex.quote(x) for x in cmd),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "artifact": os.path.relpath(a.artifact, REPO), "normal_image": a.normal_image, "normal_bytes": len(normal),
            "current": _tree_state(),
            "targets": [{k: v for k, v in t.items() if k != "help"} for t in targets], "cases": chosen,
            "options": {k: v for k, v in vars(a).items() if k not in ("artifact", "normal_image")}}
    if a.baseline_src:
        meta["baseline"] = {"src": a.baseline_src, "head": _git("rev-parse", "HEAD", cwd=a.baseline_src),
                            "status_cxr_edge": _git("status", "--short", "cxr_edge", cwd=a.baseline_src)}
    print(json.dumps({k: meta[k] for k in ("command", "current", "targets")}, default=str, indent=1))

    inp = Inputs(normal)
    rows = []
    t_run = time.perf_counter()
    for sub in SUBCASES:
        if sub[0] not in chosen:
            continue
        for t in targets:
            print(f"[{time.perf_counter() - t_run:6.0f} s] {sub[1]} on {t['name']} ...", flush=True)
            r = run_subcase(t, sub, inp, a)
            rows.append(r)
            print(f"    {_ans_summary(r)[:200]} | {_seconds(r)} s | RSS +{r.get('rss_peak_above_mb')} MB | "
                  f"healthz {_healthz(r)[:90]} | {_client_summary(r)[:160]} | {_notes(r)[:300]} | wall {r['case_wall_s']} s",
                  flush=True)
            write_report(out, {**meta, "wall_s": round(time.perf_counter() - t_run)}, rows)  # partial results survive
    meta["wall_s"] = round(time.perf_counter() - t_run)
    meta["current_at_end"] = _tree_state()
    if meta["current_at_end"] != meta["current"]:
        meta["current_changed_during_run"] = True
    write_report(out, meta, rows, echo=True)


if __name__ == "__main__":
    main()
