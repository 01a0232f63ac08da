"""``cxr-edge kiosk``: the screening service on localhost and a Chromium window on its page, kept running.

What a clinic runs on a Jetson or a small PC beside the viewing station: no network needed (the page and the
model are local), the browser in kiosk (full screen) or app (window) mode with a private profile, and a
small supervisor that restarts whichever of the two dies (with a back-off, so a broken installation does
not spin) and stops both on SIGTERM/SIGINT, so systemd can own it (see docs/kiosk/cxr-edge-kiosk.service).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, EngineError

log = logging.getLogger("cxr_edge.kiosk")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class KioskConfig:
    port: int = 8080
    browser: str | None = None  # path or name; default: the first of BROWSERS on PATH
    mode: str = "kiosk"  # kiosk (full screen) | app (a window without browser chrome) | headless (tests, checks)
    serve_args: tuple[str, ...] = ()
    max_restarts: int = 20  # per child, before giving up (a crash loop is an installation problem)
    ready_timeout_s: float = 180.0
    status_file: str | None = None
    extra_browser_args: tuple[str, ...] = field(default_factory=tuple)


def find_browser(name: str | None) -> str:
    for cand in ([name] if name else list(BROWSERS)):
        path = shutil.which(cand) if cand and os.sep not in cand else cand
        if path and Path(path).is_file():
            return path
    raise ConfigError(f"No Chromium found ({name or ', '.join(BROWSERS)}); install Debian's chromium "
                      "(apt-get install chromium) or pass --browser PATH.")


def browser_command(browser: str, url: str, mode: str, profile: Path, extra=()) -> list[str]:
    flags = ["--no-first-run", "--no-default-browser-check", "--noerrdialogs", "--disable-translate",
             "--disable-features=TranslateUI", "--disable-sync", "--disable-background-networking",
             "--disable-component-update", "--password-store=basic", f"--user-data-dir={profile}"]
    if mode == "kiosk":
        flags += ["--kiosk", url]
    elif mode == "app":
        flags += [f"--app={url}"]
    elif mode == "headless":
        flags += ["--headless=new", "--no-sandbox", "--disable-gpu", url]
    else:
        raise ConfigError(f"Unknown kiosk mode {mode!r}; use kiosk, app or headless.")
    if os.geteuid() == 0 and "--no-sandbox" not in flags:
        flags.insert(0, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return [browser, *flags, *extra]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Supervisor:
    """Runs the service and the browser; restarts each when it exits; stops both when asked."""

    def __init__(self, artifact: str | Path, config: KioskConfig):
        self.artifact, self.c = str(artifact), config
        self.url = f"http://127.0.0.1:{config.port}"
        self.browser = find_browser(config.browser)
        self.profile = Path(tempfile.mkdtemp(prefix="cxr-edge-kiosk-"))
        self.procs: dict[str, subprocess.Popen | None] = {"service": None, "browser": None}
        self.restarts = {"service": 0, "browser": 0}
        self.stopping = False

    def _service_cmd(self) -> list[str]:
        return [sys.executable, "-m", "cxr_edge.cli", "serve", self.artifact, "--host", "127.0.0.1",
                "--port", str(self.c.port), *self.c.serve_args]

    def _start(self, which: str) -> None:
        if which == "service":
            cmd = self._service_cmd()
        else:
            cmd = browser_command(self.browser, self.url + "/", self.c.mode, self.profile, self.c.extra_browser_args)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                                if which == "browser" else None, start_new_session=True)
        self.procs[which] = proc
        log.info("started %s (pid %d)", which, proc.pid)
        self._status()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.c.ready_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if _ready(self.url):
                return
            p = self.procs["service"]
            if p is not None and p.poll() is not None:
                raise EngineError(f"the screening service exited with code {p.returncode} while starting; run "
                                  f"`cxr-edge serve {self.artifact}` to see why.")
            time.sleep(0.3)
        if not self.stopping:
            raise EngineError(f"the screening service was not ready within {self.c.ready_timeout_s:.0f} s.")

    def _status(self) -> None:
        if self.c.status_file:
            doc = {"url": self.url, "pids": {k: (p.pid if p else None) for k, p in self.procs.items()},
                   "restarts": self.restarts, "stopping": self.stopping}
            tmp = Path(self.c.status_file).with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.c.status_file)

    def _stop_child(self, which: str) -> None:
        p = self.procs.get(which)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, *_args) -> None:
        self.stopping = True

    def run(self) -> int:
        if not _port_free(self.c.port):
            raise ConfigError(f"Port {self.c.port} is in use on 127.0.0.1; pass --port.")
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start("service")
            self._wait_ready()
            if not self.stopping:
                self._start("browser")
            backoff = {"service": 1.0, "browser": 1.0}
            while not self.stopping:
                time.sleep(0.5)
                for which in ("service", "browser"):
                    p = self.procs[which]
                    if self.stopping or p is None or p.poll() is None:
                        continue
                    if self.restarts[which] >= self.c.max_restarts:
                        raise EngineError(f"the {which} exited {self.restarts[which]} times; giving up (last exit code "
                                          f"{p.returncode}). Check the installation, then restart the kiosk.")
                    log.warning("%s exited with code %s; restarting in %.0f s", which, p.returncode, backoff[which])
                    time.sleep(backoff[which])
                    backoff[which] = min(backoff[which] * 2, 30.0)
                    self.restarts[which] += 1
                    self._start(which)
                    if which == "service":
                        self._wait_ready()
            return 0
        finally:
            self.stopping = True
            self._stop_child("browser")
            self._stop_child("service")
            self._status()
            shutil.rmtree(self.profile, ignore_errors=True)
            for sig, handler in previous.items():  # a supervisor run inside a larger program gives its signals back
                signal.signal(sig, handler)
            log.info("kiosk stopped")
