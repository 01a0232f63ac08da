"""predict streams its results: a line per image as it is made, predictions.jsonl appended and flushed, and
Ctrl-C keeps what was done and says how many were left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxr_edge.cli import main
from cxr_edge.cli.predict_stream import ResultStream
from cxr_edge.errors import ExitCode


def _r(i: int):
    return SimpleNamespace(index=i, ok=True, to_dict=lambda: {"index": i})


def test_results_made_out_of_order_are_shown_in_input_order(tmp_path, capsys):
    s = ResultStream(4, lambda r: f"line {r.index}", tmp_path, json_lines=False, progress=False)
    s(_r(1))
    assert capsys.readouterr().out == ""  # 0 is not done yet
    s(_r(0))
    assert capsys.readouterr().out.split() == ["line", "0", "line", "1"]
    s(_r(3))  # 2 never comes: interrupted
    done = s.close(interrupted=True)
    assert [r.index for r in done] == [0, 1, 3]
    assert [json.loads(x)["index"] for x in (tmp_path / "predictions.jsonl").read_text().splitlines()] == [0, 1, 3]
    doc = json.loads((tmp_path / "predictions.json").read_text())
    assert doc["interrupted"] and doc["screened"] == 3 and doc["total"] == 4
    assert "3 of 4 images screened, 1 left" in s.interrupted_message()


def test_predict_writes_a_json_line_per_image(tiny_export, tmp_path, capsys):
    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    images = sorted((Path(tiny_export.data) / "COVID").iterdir())[:5]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(art), *map(str, images), str(bad), "--out", str(tmp_path / "o"), "--json"]) == \
        ExitCode.SOME_ITEMS_FAILED
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["source"] for d in lines] == [*map(str, images), str(bad)] and not lines[-1]["ok"]
    stored = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert stored == lines and json.loads((tmp_path / "o" / "predictions.json").read_text()) == lines
    # a second run into the same folder keeps the first run's lines
    assert main(["predict", str(art), str(images[0]), "--out", str(tmp_path / "o"), "--json"]) == ExitCode.OK
    assert "is kept as" in capsys.readouterr().err
    kept = [p for p in (tmp_path / "o").glob("predictions.*.jsonl")]
    assert len(kept) == 1 and len(kept[0].read_text().splitlines()) == len(lines)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_ctrl_c_keeps_what_was_done(tiny_export, tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    import cv2

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    folder = tmp_path / "many"
    folder.mkdir()
    big = (np.random.default_rng(0).integers(0, 65535, (2500, 2500), dtype=np.uint16))  # slow to decode: 16-bit noise
    cv2.imwrite(str(folder / "000.png"), big)
    for k in range(1, 150):
        os.link(folder / "000.png", folder / f"{k:03d}.png")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "predict", str(art), str(folder), "--out", str(out),
                             "--batch-size", "2", "--backend", backend],
                            # as from a terminal: Ctrl-C is not ignored (a parent that ignores it would pass that on)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr[-2000:]
    doc = json.loads((out / "predictions.json").read_text())
    n = doc["screened"]
    assert doc["interrupted"] and 2 <= n < 150 and len(doc["results"]) == n
    assert len(jsonl.read_text().splitlines()) == n
    assert f"interrupted: {n} of 150 images screened, {150 - n} left" in stderr and "Traceback" not in stderr
    assert sum(line.startswith(("COVID", "Normal")) for line in stdout.splitlines()) == n  # each shown as it was made
