"""Bounded, loopback-only load test of `cxr-edge serve`: dynamic batching on vs off.

    python benchmarks/loadtest.py ARTIFACT IMAGES_DIR [--concurrency 1,8,32,64] [--requests 256]
                                  [--time-limit 60] [--out benchmarks/results/serve]

Starts `cxr-edge serve` as its own process on 127.0.0.1 (a random free port) for each mode, sends a fixed number of
requests per concurrency level (and stops at the time limit), and checks that every request is answered
exactly once with the answer for its own image (compared with the same engine run locally).
Reports throughput, p50/p99 latency, errors by status, and the engine batch-size distribution.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import numpy as np


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`cxr-edge serve` in its own process on 127.0.0.1 (a client in the same process would share its GIL)."""

    def __init__(self, artifact, max_batch=32, max_delay_ms=5.0, max_queue=256, threads=None, extra=(), src=None):
        import subprocess
        import sys

        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "cxr_edge.cli", "serve", str(Path(artifact).resolve()), "--host", "127.0.0.1",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
                    "--max-queue", str(max_queue)] + (["--threads", str(threads)] if threads else []) + list(extra)
        self._subprocess = subprocess
        # another checkout's code (e.g. the commit before a change) serving the same artifact, for same-run ratios;
        # run from inside that checkout, since `python -m` puts the working directory first on sys.path
        self.env = {**os.environ, "PYTHONPATH": str(src)} if src else None
        self.cwd = str(src) if src else None

    def __enter__(self):
        import httpx

        self.proc = self._subprocess.Popen(self.cmd, stdout=self._subprocess.DEVNULL, stderr=self._subprocess.DEVNULL,
                                           env=self.env, cwd=self.cwd)
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def cpu_seconds(self) -> float:
        """User + system CPU of the service process and its live children (decode workers), from /proc."""
        stats = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))
        tree, total = {self.proc.pid}, 0
        for _ in range(3):  # server -> pebble workers (and their helpers)
            tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
        total = sum(stats[pid][1] for pid in tree if pid in stats)
        return total / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except self._subprocess.TimeoutExpired:
            self.proc.kill()


def batch_histogram(metrics_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'cxr_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', metrics_text)}


async def _post(conn, host: str, port: int, body: bytes, rid: str):
    """One HTTP/1.1 POST on a kept-alive connection (reopened when the server closed it): (status, json, conn).

    A few lines of asyncio streams instead of an HTTP client library: the load generator shares the CPU with
    the server, and a cheap client disturbs the measurement least.
    """
    for attempt in range(2):
        if conn is None:
            conn = await asyncio.open_connection(host, port)
        reader, writer = conn
        try:
            writer.write(f"POST /v1/predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\n"
                         f"content-length: {len(body)}\r\nx-request-id: {rid}\r\n\r\n".encode() + body)
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


async def run_level(url, payloads, expected, concurrency, n_requests, time_limit):
    """``concurrency`` clients, each on its own keep-alive connection sending one request at a time, as that
    many kiosks would. (One shared httpx pool for all of them, as this test had before, held some requests
    inside the client for up to 1.9 s when a batch's answers arrived together: the server's traces showed
    those requests reaching it late while its event loop never stalled. That was the "concurrency-64 stall".)
    """
    host, port = url.split("//")[1].split(":")
    lat, statuses, mismatches, answered = [], {}, 0, {}
    t_end = time.perf_counter() + time_limit

    async def client(w: int):
        nonlocal mismatches
        conn = None
        for k in range(w, n_requests, concurrency):
            if time.perf_counter() > t_end:
                break
            img = k % len(payloads)
            t0 = time.perf_counter()
            status, body, conn = await _post(conn, host, int(port), payloads[img], f"req-{k}")
            lat.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                answered[body["request_id"]] = answered.get(body["request_id"], 0) + 1
                got = np.array(list(body["results"][0]["probabilities"].values()))
                if np.abs(got - expected[img]).max() > 1e-4:
                    mismatches += 1
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    lat_ms = 1e3 * np.array(lat) if lat else np.array([np.nan])
    return {"concurrency": concurrency, "sent": len(lat), "statuses": statuses, "throughput_rps": ok / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "answered_twice": sum(1 for v in answered.values() if v > 1),
            "answered": sum(answered.values()), "wrong_answers": mismatches, "wall_s": wall}


def main() -> None:
    import httpx

    from cxr_edge.runtime import Screener

    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("images")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/serve")
    ap.add_argument("--modes", default="batching,batch1,queue", help="batching, batch1, queue (deliberate 503s)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions of batching/batch-1 per level")
    ap.add_argument("--server-args", default="", help="extra `cxr-edge serve` flags, e.g. '--threads 1'")
    ap.add_argument("--baseline-src", help="a checkout whose cxr_edge serves mode 'baseline' (same run, interleaved)")
    ap.add_argument("--reference", default="batch1", help="mode the summary table divides by")
    a = ap.parse_args()
    files = sorted(p for p in Path(a.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:: 7][: a.n_images]
    payloads = [f.read_bytes() for f in files]
    with Screener(a.artifact, device="cpu") as s:
        expected = [np.array(list(r.probabilities.values())) for r in s.predict(files)]
    levels = [int(c) for c in a.concurrency.split(",")]
    all_modes = {"batching": ("dynamic batching (max 32, 5 ms)", {"max_batch": 32, "max_delay_ms": 5}),
                 "batch1": ("batch-1 serving", {"max_batch": 1, "max_delay_ms": 0}),
                 "queue": ("queue bound 8 (deliberate 503s)", {"max_batch": 32, "max_delay_ms": 5, "max_queue": 8}),
                 "threads": ("batching, decoding in threads (--decode-workers 0)",
                             {"max_batch": 32, "max_delay_ms": 5, "extra": ["--decode-workers", "0"]}),
                 "baseline": ("batching, baseline checkout", {"max_batch": 32, "max_delay_ms": 5, "src": a.baseline_src})}
    chosen = [m.strip() for m in a.modes.split(",") if m.strip()]
    extra = a.server_args.split()
    results = []
    servers = {}
    try:
        for key in chosen:  # one long-lived server per mode; levels and repetitions interleave the modes
            opts = dict(all_modes[key][1])
            servers[key] = LocalServer(a.artifact, **{**opts, "extra": extra + opts.pop("extra", [])}).__enter__()
        plan = [(c, rep, key) for c in levels for rep in range(a.repeat) for key in chosen if key != "queue"]
        plan += [(max(levels), 0, "queue")] if "queue" in chosen else []
        for c, rep, key in plan:
            srv, mode = servers[key], all_modes[key][0]
            before = batch_histogram(httpx.get(srv.url + "/metrics").text)
            cpu0 = srv.cpu_seconds()
            r = asyncio.run(run_level(srv.url, payloads, expected, c, a.requests, a.time_limit))
            r["server_cpu_ms_per_request"] = 1e3 * (srv.cpu_seconds() - cpu0) / max(1, r["sent"])
            after = batch_histogram(httpx.get(srv.url + "/metrics").text)
            r["batch_size_cumulative"] = {k: after[k] - before.get(k, 0) for k in after}
            r["mode"], r["repetition"] = mode, rep
            results.append(r)
            print(f"{mode:34s} c={c:3d} rep {rep} {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  server CPU {r['server_cpu_ms_per_request']:.1f} ms/req  "
                  f"statuses {r['statuses']}  twice {r['answered_twice']}  wrong {r['wrong_answers']}")
    finally:
        for srv in servers.values():
            srv.__exit__(None, None, None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(json.dumps({"artifact": str(a.artifact), "results": results}, indent=2) + "\n")
    lines = ["# Load test: cxr-edge serve on loopback", "", f"Artifact `{Path(a.artifact).name}`, {len(payloads)} real images "
             f"rotated, {a.requests} requests per level, one image per request; server flags: `{a.server_args or '(defaults)'}`; "
             f"modes interleaved, {a.repeat} repetition(s) each. Command: `python {' '.join(sys.argv)}`", "",
             "| mode | concurrency | rep | req/s | p50 ms | p99 ms | server CPU ms/req | statuses | answered twice | wrong answers | engine batches by size (cumulative le) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hist = ", ".join(f"<={k}: {int(v)}" for k, v in r["batch_size_cumulative"].items() if k != "+Inf")
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['repetition']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['server_cpu_ms_per_request']:.1f} | {r['statuses']} | {r['answered_twice']} | "
                     f"{r['wrong_answers']} | {hist} |")
    summary = {}
    for r in results:
        if "queue" not in r["mode"]:
            summary.setdefault((r["concurrency"], r["mode"]), []).append(r["throughput_rps"])
    ref = all_modes[a.reference][0] if a.reference in all_modes else None
    modes_run = [all_modes[k][0] for k in chosen if k != "queue"]
    if summary and ref in modes_run:
        lines += ["", f"Median over repetitions (req/s, and the ratio to '{ref}' measured in the same run):", "",
                  "| concurrency | " + " | ".join(modes_run) + " |", "|---|" + "---|" * len(modes_run)]
        for c in levels:
            base = summary.get((c, ref))
            cells = []
            for m in modes_run:
                v = summary.get((c, m))
                cells.append(f"{np.median(v):.1f} ({np.median(v) / np.median(base):.2f}x)" if v and base else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    (out / "loadtest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
