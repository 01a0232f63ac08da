"""The kiosk page in a real headless Chromium (Debian's package) driven by Playwright, against a live server."""

import shutil
import socket
import threading
import time

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tiny_export):
    pytest.importorskip("uvicorn")
    import uvicorn

    from cxr_edge.serve.app import ServeConfig, create_app

    s, data = tiny_export, tiny_export.data
    art = next(a.path for a in s.artifacts if a.variant == "int8-cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(art, ServeConfig()), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    import httpx

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("server did not become ready")
    yield f"http://127.0.0.1:{port}", data
    srv.should_exit = True
    t.join(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_kiosk_upload_shows_label_heatmap_and_handles_a_corrupt_file(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, data = server
    img = sorted((data / "COVID").iterdir())[0]
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        assert "cxr-edge screening" in page.title()
        page.set_input_files("#file", str(img))
        page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=30_000)
        label = page.text_content("#label")
        assert label in ("COVID", "Normal")
        assert page.locator("#overlay").count() == 1
        assert page.eval_on_selector("#overlay", "el => el.naturalWidth") > 0
        assert "%" in page.text_content("#bars") and "ms" in page.text_content("#meta")
        shot = tmp_path / "kiosk.png"
        page.screenshot(path=str(shot))
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "Could not read this image" in page.text_content("#error")
        assert page.text_content("#label") == ""
        browser.close()
    import cv2

    pic = cv2.imread(str(shot))
    assert pic.shape[:2] == (800, 1280)
    # the screenshot is a rendered page with the heatmap, not a blank or error page
    assert pic.std() > 20 and len(np.unique(pic.reshape(-1, 3), axis=0)) > 500
