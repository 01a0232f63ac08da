"""`cxr-edge kiosk`: service + Chromium started headless, a dead browser restarted, SIGTERM stops both."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return "zombie" not in open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0]
    except OSError:
        return False


def test_kiosk_starts_restarts_the_browser_and_stops_cleanly(tiny_export, tmp_path):
    pytest.importorskip("uvicorn")
    import httpx

    art = next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "kiosk", str(art), "--mode", "headless",
                             "--port", str(port), "--status-file", str(status), "--serve-args", "--decode-workers 1 --tuning off"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if status.exists() and json.loads(status.read_text())["pids"].get("browser"):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        doc = json.loads(status.read_text())
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200  # the page, offline, local
        browser = doc["pids"]["browser"]
        time.sleep(1.0)
        assert _alive(browser)
        os.killpg(browser, signal.SIGKILL)  # the browser dies: the supervisor starts another
        deadline = time.time() + 30
        while time.time() < deadline:
            d = json.loads(status.read_text())
            if d["restarts"]["browser"] == 1 and d["pids"]["browser"] != browser:
                break
            time.sleep(0.3)
        d = json.loads(status.read_text())
        assert d["restarts"]["browser"] == 1 and _alive(d["pids"]["browser"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        final = json.loads(status.read_text())
        assert final["stopping"] and not any(_alive(p) for p in final["pids"].values() if p)
    finally:
        if proc.poll() is None:
            proc.kill()
