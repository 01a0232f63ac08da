"""The DICOM node against the HTTP path, in one run: instances/s and last-instance-to-result latency.

    python benchmarks/node_throughput.py ARTIFACT [--studies 100] [--per-study 3] [--associations 1,8]
                                         [--out benchmarks/results/node]

For each number of simultaneous associations, a fresh `cxr-edge node` (its own process, SQLite store, fsync on
every instance) receives the same studies from that many DCMTK `storescu` processes (the X-ray rooms); then
`cxr-edge serve` (same artifact, same engine and decode settings) receives the same DICOM files as raw
`POST /v1/predict` and `/v1/explain` bodies from as many concurrent HTTP clients. Reported:

- instances/s: DICOM = instances / (first send -> last committed result); HTTP = requests / wall time;
- latency, per study: the study's last instance arriving (its job row's received_at) -> the last result of that
  study committed (screened_at), p50 / p99. Each screened job also produces a Grad-CAM overlay, so the DICOM
  path is compared with both /v1/predict (no heatmap) and /v1/explain (heatmap inline).

Test studies are made from ../shared/data/cxr-dev (tests/dicom_studies.py) in a temporary folder, never committed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv's `storescu` is pynetdicom's example app


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready in time")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (as systemd stops a unit), SIGKILL if it has not exited in 30 s.
    os.killpg, not `kill -TERM -PID`: procps' kill reads a negative PID without `--` as an option."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _service_flags(args) -> list[str]:
    return ["--tuning", "off", "--decode-workers", str(args.decode_workers)]


def _run_node(args, files: list[Path], groups: int, tmp: Path, heatmaps: str) -> dict:
    data = tmp / f"node-{groups}-{heatmaps}"
    dport, hport = _port(), _port()
    cmd = [sys.executable, "-m", "cxr_edge.cli", "node", str(args.artifact), "--data", str(data), "--allow-any-caller",
           "--dicom-port", str(dport), "--port", str(hport), "--stable-after", "2", "--heatmaps", heatmaps,
           *_service_flags(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{hport}", proc)
        chunks = [files[k::groups] for k in range(groups)]
        t0 = time.time()
        senders = [subprocess.Popen([STORESCU, "-aet", f"XRAY{k + 1}", "-aec", "CXREDGE", "-nh", "127.0.0.1", str(dport),
                                     *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for k, chunk in enumerate(chunks)]
        for s in senders:
            s.wait(timeout=1800)
        db = sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            (left,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'screening')").fetchone()
            (n,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if left == 0 and n >= len(files):
                break
            time.sleep(0.05)
        rows = db.execute("SELECT study_uid, state, received_at, screened_at FROM jobs").fetchall()
        db.close()
    finally:
        _stop(proc)
    screened = [r for r in rows if r[1] == "screened"]
    per_study: dict[str, list] = {}
    for study, _, rec, done in screened:
        per_study.setdefault(study, []).append((rec, done))
    lat = [max(d for _, d in v) - max(r for r, _ in v) for v in per_study.values()]
    last = max(r[3] for r in screened)
    return {"path": f"DICOM C-STORE -> node (--heatmaps {heatmaps})", "associations": groups, "instances": len(files), "screened": len(screened),
            "failed": sum(1 for r in rows if r[1] == "failed"), "wall_s": last - t0,
            "instances_per_s": len(screened) / (last - t0),
            "study_latency_p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "study_latency_p99_ms": 1e3 * float(np.percentile(lat, 99))}


async def _http_clients(url: str, files: list[Path], concurrency: int) -> tuple[float, list[float], dict[int, int]]:
    import httpx

    queue = list(files)
    lat: list[float] = []
    codes: dict[int, int] = {}

    async def client(c: httpx.AsyncClient):
        while queue:
            body = queue.pop().read_bytes()
            t = time.perf_counter()
            r = await c.post(url, content=body, headers={"Content-Type": "application/dicom"})
            lat.append(time.perf_counter() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        return time.perf_counter() - t0, lat, codes


def _run_http(args, files: list[Path], concurrency: int) -> list[dict]:
    hport = _port()
    cmd = [sys.executable, "-m", "cxr_edge.cli", "serve", str(args.artifact), "--port", str(hport), *_service_flags(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = []
    try:
        url = f"http://127.0.0.1:{hport}"
        _wait_http(url, proc)
        for endpoint in ("predict", "explain"):
            wall, lat, codes = asyncio.run(_http_clients(f"{url}/v1/{endpoint}", files, concurrency))
            out.append({"path": f"HTTP POST /v1/{endpoint}", "associations": concurrency, "instances": len(files),
                        "screened": codes.get(200, 0), "failed": len(files) - codes.get(200, 0), "wall_s": wall,
                        "instances_per_s": codes.get(200, 0) / wall,
                        "request_latency_p50_ms": 1e3 * float(np.percentile(lat, 50)),
                        "request_latency_p99_ms": 1e3 * float(np.percentile(lat, 99))})
    finally:
        _stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--per-study", type=int, default=3)
    ap.add_argument("--associations", default="1,8")
    ap.add_argument("--max-side", type=int, default=2048, help="longest side of the test images (sources are smaller)")
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--heatmaps", default="all,none", help="the node's --heatmaps settings to run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "node")
    args = ap.parse_args()
    from dicom_studies import make_frontal_instances

    from cxr_edge.machine import machine_facts
    from cxr_edge.manifest import read_manifest

    tmp = Path(tempfile.mkdtemp(prefix="cxr-node-bench-"))
    try:
        rows = []
        for k, c in enumerate(int(x) for x in args.associations.split(",")):
            made = make_frontal_instances(tmp / f"set{k}", args.studies * args.per_study, seed=k,
                                          max_side=args.max_side, per_study=args.per_study)
            files = [i.path for i in made]
            for h in args.heatmaps.split(","):
                rows.append(_run_node(args, files, c, tmp, h))
            rows += _run_http(args, files, c)
            print(json.dumps(rows[-4:], indent=1), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = read_manifest(args.artifact)
    for r in rows:
        if r["path"].startswith("DICOM"):
            same = [h for h in rows if h["associations"] == r["associations"] and h["path"].startswith("HTTP")]
            for h in same:
                r["x_" + h["path"].split("/")[-1]] = r["instances_per_s"] / h["instances_per_s"]
    facts = machine_facts()
    doc = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "artifact": {"file": m.file, "recipe": m.recipe, "precision": m.precision, "sha256": m.sha256},
           "machine": {"cpu": facts.cpu, "cores": facts.usable_cores, "isa": facts.isa}, "studies": args.studies, "per_study": args.per_study,
           "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "node_vs_http.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# DICOM node vs HTTP service, {doc['date']}", "", f"Command: `{doc['command']}`", "",
             f"Artifact: {m.file} ({m.recipe}, {m.precision}, sha256 {m.sha256[:12]}...); machine: {facts.cpu}, "
             f"{facts.usable_cores} usable cores. {args.studies} studies x {args.per_study} frontal DX instances (explicit VR LE, "
             "from ../shared/data/cxr-dev), the same files on every path.", "",
             "| path | concurrent associations / clients | screened | instances/s | DICOM / HTTP | "
             "latency p50 ms | latency p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        dicom = r["path"].startswith("DICOM")
        ratio = (f"{r['x_predict']:.2f}x predict, {r['x_explain']:.2f}x explain" if dicom else "")
        p50 = r["study_latency_p50_ms"] if dicom else r["request_latency_p50_ms"]
        p99 = r["study_latency_p99_ms"] if dicom else r["request_latency_p99_ms"]
        lines.append(f"| {r['path']} | {r['associations']} | {r['screened']}/{r['instances']} | {r['instances_per_s']:.1f} | "
                     f"{ratio} | {p50:.0f} | {p99:.0f} |")
    lines += ["", "DICOM latency: a study's last instance arriving -> the last result of that study committed to the job "
              "store (received_at -> screened_at; with --heatmaps all each result includes a Grad-CAM overlay written to disk, with none the decision only, as /v1/predict). HTTP latency: "
              "one request, upload to answer. DICOM throughput counts the instance fsynced and its job committed before "
              "each C-STORE answer."]
    (args.out / "node_vs_http.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
