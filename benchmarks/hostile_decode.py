"""Hostile images against `cxr-edge serve` on loopback: time to answer, server memory, and the latency a
normal client sees meanwhile (issue 13's acceptance cases).

    python benchmarks/hostile_decode.py ARTIFACT NORMAL_IMAGE [--out benchmarks/results/hostile]

For each case the service (default settings: 4 decode workers, 5 s decode deadline, 1 GiB per worker) gets
the hostile request(s) while one client sends a normal image in a loop. Reported: status and answer of the
hostile request, seconds to answer, peak RSS of the server's process tree above its idle baseline (sampled
every 10 ms, server plus decode workers), and p50/p99 of the normal client's requests during the case.
Files are generated in memory (tests/hostile_files.py); nothing large is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_files as H
from loadtest import LocalServer


def tree_rss_mb(root: int) -> float:
    stats, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(d.name)] = int(f[1])
            rss[int(d.name)] = int(f[21]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    tree = {root}
    for _ in range(3):
        tree |= {pid for pid, ppid in stats.items() if ppid in tree}
    return sum(rss.get(p, 0) for p in tree) / 2**20


def _many_element_dicom(n: int) -> bytes:
    """``n`` tiny private elements before the pixel data, built as bytes (pydicom would take minutes)."""
    plain = H.dicom_plain()
    import struct

    # the first data-set element after the meta group (group 2 ends where a tag's group is not 0x0002)
    i = 132
    while struct.unpack("<H", plain[i : i + 2])[0] == 2:
        vr = plain[i + 4 : i + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            i += 12 + struct.unpack("<I", plain[i + 8 : i + 12])[0]
        else:
            i += 8 + struct.unpack("<H", plain[i + 6 : i + 8])[0]
    elems = np.zeros(n, dtype=[("g", "<u2"), ("e", "<u2"), ("vr", "S2"), ("len", "<u2"), ("v", "S2")])
    elems["g"], elems["e"] = 0x0009, 0x1000 + (np.arange(n) % 0xE000)
    elems["vr"], elems["len"], elems["v"] = b"LO", 2, b"x "
    return plain[:i] + elems.tobytes() + plain[i:]


def cases(full: bool):
    side = 7000 if full else 2000
    prog = H.jpeg(H.gradient(256, 256), progressive=True)
    gray8 = H.raw_png(side, side, 8, 0, b"".join(b"\x00" + bytes([k % 251]) * side for k in range(side)))
    return [
        ("49 MP 16-bit RGBA PNG", "/v1/predict", [H.png_wide(side, side, 4, 16)]),
        ("49 MP 16-bit RGBA TIFF (deflate)", "/v1/predict",
         [H.tiff(np.zeros((side, side, 4), np.uint16), compression="zlib", photometric="rgb")]),
        ("49 MP 8-bit gray PNG, /v1/explain", "/v1/explain", [gray8]),
        ("progressive JPEG repeating a scan 30,000 times", "/v1/predict", [H.jpeg_repeated_scans(prog, 30_000)]),
        ("4 PNGs inflating 2 GB each past their rows", "/v1/predict",
         [H.png_inflate_bomb(2000, 2000, extra=2_000_000_000 if full else 200_000_000)] * 4),
        ("deflated DICOM (4000x4000 of zeros)", "/v1/predict", [H.dicom_deflated(4000, 4000)]),
        ("DICOM with 4.8 M tiny elements (48 MB)", "/v1/predict", [_many_element_dicom(4_800_000 if full else 500_000)]),
        ("JPEG with 30 MB of fill bytes", "/v1/predict", [H.jpeg_fill_bytes(H.jpeg(H.gradient(512, 512)), 30_000_000)]),
    ]


def run_case(srv, endpoint, bodies, normal: bytes):
    import httpx

    base = tree_rss_mb(srv.proc.pid)
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mb(srv.proc.pid))
            time.sleep(0.01)

    lat: list[float] = []

    def normal_client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post(srv.url + "/v1/predict", content=normal)
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text

    threads = [threading.Thread(target=sample), threading.Thread(target=normal_client)]
    for t in threads:
        t.start()
    time.sleep(0.3)

    async def hostile():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(body):
                t = time.perf_counter()
                r = await c.post(srv.url + endpoint, content=body)
                res = r.json()
                item = (res.get("results") or [{}])[0]
                return r.status_code, item.get("error") or item.get("label") or res.get("detail"), time.perf_counter() - t
            return await asyncio.gather(*(one(b) for b in bodies))

    answers = asyncio.run(hostile())
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    ms = 1e3 * np.array(lat)
    return {"answers": [{"status": s, "answer": str(a)[:160], "seconds": round(sec, 2)} for s, a, sec in answers],
            "bytes_sent": sum(len(b) for b in bodies), "rss_baseline_mb": round(base), "rss_peak_above_mb": round(peak[0] - base),
            "normal_requests": len(lat), "normal_p50_ms": round(float(np.percentile(ms, 50)), 1),
            "normal_p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("normal_image")
    ap.add_argument("--small", action="store_true", help="2000 px instead of 7000 px cases (a quick look)")
    ap.add_argument("--server-args", default="", help="extra `cxr-edge serve` flags")
    ap.add_argument("--out", default="benchmarks/results/hostile")
    a = ap.parse_args()
    normal = Path(a.normal_image).read_bytes()
    rows = []
    with LocalServer(a.artifact, extra=a.server_args.split() + ["--max-body-mb", "128"]) as srv:
        for name, endpoint, bodies in cases(not a.small):
            r = run_case(srv, endpoint, bodies, normal)
            r["case"], r["endpoint"] = name, endpoint
            rows.append(r)
            print(f"{name:48s} {[x['status'] for x in r['answers']]} {max(x['seconds'] for x in r['answers']):6.2f} s  "
                  f"+{r['rss_peak_above_mb']:5d} MB  normal p99 {r['normal_p99_ms']:7.1f} ms ({r['normal_requests']} req)  "
                  f"{r['answers'][0]['answer'][:70]}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Hostile images against `cxr-edge serve` (loopback)", "",
             f"Command: `python {' '.join(sys.argv)}`. Server defaults (4 decode workers, 5 s decode deadline, "
             "1 GiB address space per worker) with `--max-body-mb 128`; one client sends a normal image in a loop "
             "during each case. RSS: server and decode workers together, sampled every 10 ms.", "",
             "| case | bytes sent | answer | seconds | server RSS peak above idle (MB) | normal client p50 / p99 ms (n) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ans = "; ".join(sorted({f"{x['status']} {x['answer'][:90]}" for x in r["answers"]}))
        lines.append(f"| {r['case']} | {r['bytes_sent']:,} | {ans} | {max(x['seconds'] for x in r['answers']):.2f} | "
                     f"{r['rss_peak_above_mb']} | {r['normal_p50_ms']} / {r['normal_p99_ms']} ({r['normal_requests']}) |")
    (out / "hostile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
