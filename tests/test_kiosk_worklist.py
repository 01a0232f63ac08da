"""The kiosk's worklist in a real headless Chromium (Debian's package, driven by Playwright) against a live DICOM node.

A ``cxr-edge node`` subprocess on free ports receives two studies by C-STORE (pynetdicom's SCU): study A is a PA image
and a lateral (skipped by the selection rules), study B one AP image; the instances are made from the real images in
the shared cxr-dev folder (never committed; the test skips without them). The page must list the studies, list a
study's images with the skip reason, show a screened image's overlay, and clear the previous selection before it
fetches anything for the next one; answers for a selection that is no longer current are dropped. Requests are held
back with Playwright routes, so the order of answers is fixed by the test, not by timing. On plain ``serve`` (no node,
404 for /v1/studies) the worklist stays hidden.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REAL_DATA
from test_kiosk_browser import CHROMIUM, VIEWPORTS, _no_horizontal_overflow, _shot, browser  # noqa: F401  (browser: the fixture)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")

NODE_AE = "CXREDGE"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, alive=lambda: True, timeout: float = 60) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert alive(), "the service exited before it was ready"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not become ready")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from tiny_models import write_artifact_set

    from cxr_edge.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("worklist_art")
    data = write_synthetic_dataset(root / "data", per_class=10, sizes=(64,), seed=5)
    s = write_artifact_set(root / "art", data, variants=("fp32", "int8-cpu"))
    return next(a.path for a in s.artifacts if a.variant == "int8-cpu")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """Study A (PA + lateral) and study B (AP), from one COVID and one Normal image of the shared folder."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CXR data not found at {REAL_DATA}")
    pytest.importorskip("pydicom")
    from dicom_studies import make_instance

    covid = sorted((REAL_DATA / "COVID").glob("*.png"))[:1] or pytest.skip("no COVID images in the shared folder")
    normal = sorted((REAL_DATA / "Normal").glob("*.png"))[:1] or pytest.skip("no Normal images in the shared folder")
    out = tmp_path_factory.mktemp("worklist_dicom")
    a, b = "1.2.826.0.1.3680043.10.1.111111", "1.2.826.0.1.3680043.10.1.222222"
    return {"A": [make_instance(covid[0], out / "a_pa.dcm", "pa", study_uid=a, patient_id="WL-A", max_side=384),
                  make_instance(covid[0], out / "a_lat.dcm", "lateral", study_uid=a, patient_id="WL-A", max_side=384)],
            "B": [make_instance(normal[0], out / "b_ap.dcm", "ap", study_uid=b, patient_id="WL-B", max_side=384)]}


def _c_store(port: int, instances) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="WLROOM")
    for sop_class in {str(dcmread(i.path, stop_before_pixels=True).SOPClassUID) for i in instances}:
        ae.add_requested_context(sop_class, [i.transfer_syntax for i in instances])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "the node refused the association"
    try:
        for inst in instances:
            status = assoc.send_c_store(dcmread(inst.path))
            assert status and status.Status == 0, f"C-STORE of {inst.kind}: {status}"
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def node(artifact, studies, tmp_path_factory):
    """A `cxr-edge node` with both studies received, screened and complete: (url, {"A": uid, "B": uid})."""
    pytest.importorskip("pynetdicom")
    import httpx

    http_port, dicom_port = _free_port(), _free_port()
    data = tmp_path_factory.mktemp("worklist_node")
    log = (data / "node.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "node", str(artifact), "--data", str(data / "node"),
                             "--allow-any-caller", "--stable-after", "1", "--tuning", "off", "--ae-title", NODE_AE,
                             "--dicom-host", "127.0.0.1", "--dicom-port", str(dicom_port), "--port", str(http_port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(url, alive=lambda: proc.poll() is None)
        _c_store(dicom_port, studies["A"] + studies["B"])
        uids = {k: v[0].study_uid for k, v in studies.items()}
        deadline = time.time() + 30
        while time.time() < deadline:
            rows = {s["study_uid"]: s for s in httpx.get(url + "/v1/studies").json()["studies"]}
            if all(rows.get(u, {}).get("state") == "complete" for u in uids.values()):
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"studies not complete: {rows}")
        assert rows[uids["A"]]["screened"] == 1 and rows[uids["A"]]["skipped"] == 1
        yield url, uids
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def plain_serve(artifact):
    """Plain `serve` (no node) in-process, as test_kiosk_browser runs it."""
    pytest.importorskip("uvicorn")
    import uvicorn

    from cxr_edge.serve.app import ServeConfig, create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(artifact, ServeConfig(decode_workers=1)), host="127.0.0.1", port=port,
                                        log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    yield url
    srv.should_exit = True
    t.join(timeout=30)


class Gate:
    """Holds back the requests a route matches until ``release``: the test decides when an answer arrives."""

    def __init__(self, page, pattern):
        self.page, self.pattern, self.held, self.open = page, pattern, [], False
        page.route(pattern, self._handle)

    def _handle(self, route):
        if self.open:
            route.continue_()
        else:
            self.held.append(route)

    def release(self):
        """Let the held requests through and wait until their answers reached the page."""
        self.open = True
        held, self.held = self.held, []
        assert held, f"no request to {self.pattern} was held"
        for route in held:
            url = route.request.url
            with self.page.expect_response(lambda r, u=url: r.url == u):
                route.continue_()
        self.page.wait_for_timeout(300)  # the page's handlers run after the answer (a grace, not a timing assert)
        self.page.unroute(self.pattern, self._handle)


def _study_row(page, uid):
    return page.locator(f'#studies button[data-study="{uid}"]')


def _job_rows(page):
    return page.locator("#jobs button")


def _job(page, state):
    return page.locator(f'#jobs button[data-state="{state}"]')


def _screen_is_empty(page):
    assert page.get_attribute("#base", "src") is None and page.is_hidden("#viewer")
    for part in ("#label", "#decision", "#error", "#bars", "#meta"):
        assert page.text_content(part) == "", part
    assert not page.is_visible("#borderline")


def _show_overlay(page, uid):
    """Choose the study, then its screened image; wait for the overlay; the job's id."""
    _study_row(page, uid).click()
    page.wait_for_function("document.querySelectorAll('#jobs button').length > 0", timeout=10_000)
    screened = _job(page, "screened")
    screened.click()
    page.wait_for_function("(document.getElementById('base').getAttribute('src') || '').startsWith('blob:') && "
                           "document.getElementById('base').naturalWidth > 0", timeout=15_000)
    return screened.get_attribute("data-job")


def test_worklist_lists_studies_images_and_overlays_and_never_mixes_patients(node, browser, tmp_path):  # noqa: F811
    url, uids = node
    a, b = uids["A"], uids["B"]
    page = browser.new_page(viewport=VIEWPORTS["kiosk"])
    page.goto(url + "/")
    page.wait_for_function(f"document.querySelector('#studies button[data-study=\"{b}\"]') !== null", timeout=15_000)
    assert page.is_visible("#worklist")
    row_a = _study_row(page, a).text_content()
    assert "Study \u2026" + a[-8:] in row_a and "complete" in row_a and "p(COVID) " in row_a
    assert "1 screened" in row_a and "1 skipped" in row_a and "0 failed" in row_a
    assert "COVID" in row_a or "Normal" in row_a

    # study A: its images, the lateral with the reason it was skipped; nothing on screen yet
    _study_row(page, a).click()
    page.wait_for_function("document.querySelectorAll('#jobs button').length === 2", timeout=10_000)
    assert _study_row(page, a).get_attribute("aria-pressed") == "true"
    lateral = _job(page, "skipped").text_content()
    assert "LL" in lateral and "Skipped: view LL is not frontal" in lateral
    _screen_is_empty(page)
    _job(page, "skipped").click()  # a skipped image says why, with no image and no bars
    assert page.text_content("#label") == "Not screened" and "view LL is not frontal" in page.text_content("#decision")
    assert page.get_attribute("#base", "src") is None and page.text_content("#bars") == ""

    # the screened image of A: decision, model and the overlay (heatmap blended in: no separate layer to toggle)
    _show_overlay(page, a)
    assert page.text_content("#label") in ("COVID", "Normal")
    assert "threshold 0.50" in page.text_content("#decision") and page.text_content("#bars").count("%") == 2
    assert "model.int8-cpu.onnx" in page.text_content("#meta")
    assert page.is_hidden("#heat") and page.is_visible("#legend")
    _shot(page, tmp_path, "worklist-overlay")

    # study B while its images are held back: A's overlay, result and image list are gone before B's arrive
    gate_b = Gate(page, f"**/v1/jobs?*study={b}*")
    _study_row(page, b).click()
    _screen_is_empty(page)
    assert _job_rows(page).count() == 0 and b[-8:] in page.text_content("#jobs-title")
    # ... then A again; B's late answer must not replace A's images
    _study_row(page, a).click()
    page.wait_for_function("document.querySelectorAll('#jobs button').length === 2", timeout=10_000)
    gate_b.release()
    assert a[-8:] in page.text_content("#jobs-title") and _job_rows(page).count() == 2
    assert page.locator("#jobs button", has_text="LL").count() == 1

    # A's overlay held back, B chosen meanwhile: the late overlay never appears beside study B
    job_a = _job(page, "screened").get_attribute("data-job")
    gate_overlay = Gate(page, f"**/v1/jobs/{job_a}/overlay.jpg")
    _job(page, "screened").click()
    assert page.text_content("#label") in ("COVID", "Normal")  # the text is there; the overlay is on its way
    _study_row(page, b).click()
    _screen_is_empty(page)
    page.wait_for_function("document.querySelectorAll('#jobs button').length === 1", timeout=10_000)
    gate_overlay.release()
    _screen_is_empty(page)

    # B's own overlay shows normally
    _show_overlay(page, b)
    assert b[-8:] in page.text_content("#status") and "AP" in page.text_content("#status")

    # an upload on the node's page still screens, and the worklist image is no longer marked as the one on screen
    page.set_input_files("#file", str(sorted((REAL_DATA / "Normal").glob("*.png"))[0]))
    page.wait_for_function("document.getElementById('heat').naturalWidth > 0", timeout=30_000)
    assert page.get_attribute("#base", "src").startswith("data:image/jpeg") and page.is_visible("#heat")
    assert page.is_visible("#controls") and page.locator('#jobs button[aria-pressed="true"]').count() == 0
    page.close()


def test_worklist_fits_a_phone(node, browser, tmp_path):  # noqa: F811
    url, uids = node
    page = browser.new_page(viewport=VIEWPORTS["phone"])
    page.goto(url + "/")
    page.wait_for_selector("#studies button", timeout=15_000)
    _show_overlay(page, uids["A"])
    _no_horizontal_overflow(page)
    _shot(page, tmp_path, "phone-worklist")
    page.close()


def test_worklist_is_hidden_on_plain_serve(plain_serve, browser):  # noqa: F811
    page = browser.new_page(viewport=VIEWPORTS["kiosk"])
    with page.expect_response(lambda r: r.url.endswith("/v1/studies?limit=30")) as studies:
        page.goto(plain_serve + "/")
    assert studies.value.status == 404
    page.wait_for_function("document.getElementById('model').textContent.includes('sha256')", timeout=15_000)
    assert page.is_hidden("#worklist")
    page.close()


def test_worklist_flags_borderline_and_shows_server_text_as_text(plain_serve, browser):  # noqa: F811
    """Crafted node answers (routes) with markup in labels and reasons: flags visible, nothing interpreted."""
    evil = '<img src=x onerror="window.pwned=1">'
    uid = "1.2.3.4.5.6.7.8.987654321"
    study = {"study_uid": uid, "state": "receiving", "instances": 3, "first_arrival": "2026-01-02T03:04:05.000Z",
             "last_arrival": "2026-01-02T03:04:06.000Z", "completed_at": None, "screened": 1, "skipped": 0, "failed": 1,
             "pending": 1, "label": evil, "p_covid": 0.48, "deciding_job": 7, "borderline": True, "job_ids": [7, 8, 9],
             "delivery": {"dead": 1, "delivered": 2}}
    decision = {"label": evil, "probability": 0.52, "rule": "threshold", "threshold": 0.5, "covid_probability": 0.48,
                "margin": -0.02, "borderline": True, "borderline_band": 0.05, "reason": f"{evil}: p(COVID) 0.48 < 0.50"}
    base = {"study_uid": uid, "series_uid": "1.2", "view": "PA", "source": "ROOM@10.0.0.1",
            "received_at": "2026-01-02T03:04:05.000Z", "screened_at": None, "threshold": 0.5, "weak_map": None,
            "has_overlay": False, "label": None, "p_covid": None, "borderline": None, "reason": None, "result": None}
    jobs = [{**base, "id": 7, "state": "screened", "label": evil, "p_covid": 0.48, "borderline": True, "weak_map": True,
             "screened_at": "2026-01-02T03:04:06.000Z",
             "result": {"label": evil, "probabilities": {"COVID": 0.48, evil: 0.52}, "decision": decision,
                        "model": {"artifact": evil, "version": "v1", "sha256": "ab" * 32}},
             "delivery": {"state": "dead", "objects": [
                 {"destination": "pacs", "kind": "sr", "state": "dead", "attempts": 8, "last_error": f"rejected {evil}"},
                 {"destination": "pacs", "kind": "sc", "state": "delivered", "attempts": 1, "last_error": None}]}},
            {**base, "id": 8, "state": "failed", "reason": f"decode error {evil}"},
            {**base, "id": 9, "state": "received"}]
    page = browser.new_page(viewport=VIEWPORTS["kiosk"])
    page.route("**/v1/studies*", lambda r: r.fulfill(status=200, content_type="application/json",
                                                     body=json.dumps({"studies": [study]})))
    page.route("**/v1/jobs?*", lambda r: r.fulfill(status=200, content_type="application/json",
                                                   body=json.dumps({"jobs": jobs[::-1]})))
    page.goto(plain_serve + "/")
    page.wait_for_selector("#studies button", timeout=15_000)
    row = _study_row(page, uid)
    flags = row.locator(".flag")
    assert flags.all_text_contents() == ["BORDERLINE", "NOT DELIVERED: 1 dead letter"] and flags.first.is_visible()
    text = row.text_content()
    assert evil in text and "p(COVID) 0.480" in text and "1 pending" in text and "receiving" in text
    assert "2 delivered" in text
    row.click()
    page.wait_for_function("document.querySelectorAll('#jobs button').length === 3", timeout=10_000)
    first, failed, waiting = (_job_rows(page).nth(i).text_content() for i in range(3))  # oldest first
    assert "BORDERLINE" in first and "no localised evidence" in first and evil in first and "NOT DELIVERED" in first
    assert f"Failed: decode error {evil}" in failed and "received" in waiting
    _job_rows(page).nth(1).click()
    assert page.text_content("#error") == f"Screening failed: decode error {evil}"
    _job_rows(page).nth(0).click()
    assert page.is_visible("#borderline") and "Borderline" in page.text_content("#borderline")
    assert page.text_content("#label") == evil and evil in page.text_content("#meta") and page.is_visible("#weak")
    assert page.text_content("#error") == (f"SR not delivered to pacs after 8 attempts: rejected {evil}. Fix the "
                                           "destination, then restart the node with --redeliver.")
    _job_rows(page).nth(2).click()
    assert page.text_content("#decision") == "Waiting to be screened." and not page.is_visible("#borderline")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#worklist img").count() == 0 and page.locator("#result img").count() == 0
    page.close()
