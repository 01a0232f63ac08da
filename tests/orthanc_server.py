"""A throwaway Orthanc PACS for tests (Debian's `orthanc` and `orthanc-dicomweb`): the node delivers to it for real.

Not a test file: tests import from here (tests/ is on sys.path)::

    from orthanc_server import orthanc  # noqa: F401  (a fixture)

    def test_delivery(orthanc):  # noqa: F811
        orthanc.dicom_url   # "dicom://ORTHANC@127.0.0.1:PORT"
        orthanc.stow_url    # "http://127.0.0.1:PORT/dicom-web"
        orthanc.instances_of_study(study_uid)

`OrthancServer(folder)` writes a configuration (its own storage and index under ``folder``, free DICOM and HTTP
ports, no authentication, the DICOMweb plugin) and can be stopped and started again on the same storage (the
outage tests). When CI=true and Orthanc is missing the fixture fails instead of skipping: .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
DICOMWEB_PLUGIN = next((p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                                    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so") if os.path.exists(p)), None)
READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """One Orthanc process on a storage folder it keeps across stop()/start()."""

    def __init__(self, folder: Path, aet: str = "ORTHANC"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port, self.http_port = _free_port(), _free_port()
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "cxr-edge-test-pacs", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "Plugins": [DICOMWEB_PLUGIN] if DICOMWEB_PLUGIN else [], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
            # an instance stored twice is kept once (the default, said out loud: the exactly-once tests rely on it)
            "OverwriteInstances": False,
        }
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))

    # ---- lifecycle
    def start(self) -> OrthancServer:
        with open(self.folder / "orthanc.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(ORTHANC), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}); see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                if DICOMWEB_PLUGIN:
                    self.get("/dicom-web/studies", accept="application/dicom+json")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {READY_TIMEOUT_S:.0f} s; see {self.folder / 'orthanc.log'}")

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (Orthanc closes its index cleanly, ~3 s) or, ``hard``, SIGKILL (a crash, or a test's teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    # ---- addresses
    @property
    def dicom_url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def stow_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    # ---- REST
    def get(self, path: str, accept: str = "application/json"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if "json" in accept else body

    def post(self, path: str, payload) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Every instance Orthanc holds in the study, with its tags (MainDicomTags of instance and series)."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        out = []
        for inst in found:  # type: ignore[union-attr]
            series = self.get(f"/series/{inst['ParentSeries']}")
            out.append({"id": inst["ID"], "sop_instance_uid": inst["MainDicomTags"].get("SOPInstanceUID"),
                        "series_uid": series["MainDicomTags"].get("SeriesInstanceUID"),
                        "modality": series["MainDicomTags"].get("Modality"),
                        "series_description": series["MainDicomTags"].get("SeriesDescription")})
        return out

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file", accept="application/dicom")

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


@pytest.fixture
def orthanc(tmp_path_factory):
    """A started Orthanc on fresh storage, stopped after the test."""
    if not ORTHANC or not DICOMWEB_PLUGIN:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc and its DICOMweb plugin are not installed (.ci/run installs Debian's orthanc, "
                        "orthanc-dicomweb)")
        pytest.skip("Orthanc (Debian: orthanc, orthanc-dicomweb) is not installed")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop(hard=True)
