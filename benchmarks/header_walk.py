"""What the header checks of hostile uploads cost, now and at a baseline revision, in one run (issue 26.1/26.2).

    python benchmarks/header_walk.py [--baseline-rev 4dc6391] [--markers 30000000] [--out benchmarks/results/hostile_round3]

Cases, built in memory (tests/hostile_files.py): a baseline JPEG with ``--markers`` restart markers after its
start-of-image marker (60 MB at 30 M), and a 256x256 PNG with 990 zTXt chunks. For each: the full JPEG header
walk (which a worker or the inline thread runs) and the routing decision ``header_bounded`` (which runs on the
service's event loop), timed once each (seconds-long cases; the ratio, not the noise, is the point), with the
baseline revision's ``image_headers.jpeg_header`` loaded from git beside the current one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _baseline_module(rev: str, name: str):
    """``cxr_edge/<name>.py`` as it was at ``rev``, imported inside the package (its relative imports resolve)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:cxr_edge/{name}.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"cxr_edge._{name}_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def _timed(fn, *args):
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as exc:  # a refusal is an answer too
        out = f"{type(exc).__name__}: {exc}"[:120]
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default="4dc6391")
    ap.add_argument("--markers", type=int, default=30_000_000)
    ap.add_argument("--out", default="benchmarks/results/hostile_round3")
    a = ap.parse_args(argv)

    import hostile_files as H

    from cxr_edge import image_headers
    from cxr_edge.cpu_isa import isa_facts
    from cxr_edge.decode_workers import header_bounded

    old = _baseline_module(a.baseline_rev, "image_headers")
    old_routing = _baseline_module(a.baseline_rev, "decode_workers").header_bounded
    jpeg = H.jpeg_restart_run(H.jpeg(H.gradient(128, 128)), a.markers)
    png = H.png_with_text_chunks(n=990, inflated=1 << 16)
    header_bounded(H.jpeg(H.gradient(64, 64)), 16 << 20)  # imports done before timing
    rows = []
    for case, data in ((f"JPEG + {a.markers:,} restart markers", jpeg), ("PNG 256x256 + 990 zTXt chunks", png)):
        row = {"case": case, "bytes": len(data)}
        if data is jpeg:
            row["walk_s_now"], _ = _timed(image_headers.jpeg_header, data, "x")
            row["walk_s_baseline"], _ = _timed(old.jpeg_header, data, "x")
        row["routing_s_now"], row["inline_now"] = _timed(header_bounded, data, 16 << 20)
        # the baseline routing imports jpeg_header from the package at call time: give it the baseline walk
        now_walk, image_headers.jpeg_header = image_headers.jpeg_header, old.jpeg_header
        try:
            row["routing_s_baseline"], row["inline_baseline"] = _timed(old_routing, data, 16 << 20)
        finally:
            image_headers.jpeg_header = now_walk
        rows.append(row)
    res = {"machine": isa_facts(), "baseline_rev": a.baseline_rev,
           "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), "rows": rows}
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "header_walk.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Header checks of hostile uploads ({res['machine']['cpu']}, {res['machine']['isa']})", "",
             f"Command: `{res['command']}`; baseline = revision {a.baseline_rev}, in the same run.", "",
             "| case | MB | full JPEG walk s (baseline -> now) | routing on the event loop s (baseline -> now) | "
             "decoded inline (baseline -> now) |", "|---|---|---|---|---|"]
    for r in rows:
        walk = f"{r['walk_s_baseline']:.2f} -> {r['walk_s_now']:.2f}" if "walk_s_now" in r else "-"
        lines.append(f"| {r['case']} | {r['bytes'] / 1e6:.1f} | {walk} | {r['routing_s_baseline']:.4f} -> "
                     f"{r['routing_s_now']:.4f} | {r['inline_baseline']} -> {r['inline_now']} |")
    (out / "header_walk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
