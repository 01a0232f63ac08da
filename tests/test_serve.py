"""The screening service: answers, per-image errors, batching, queue bound, body limit, metrics, shutdown."""

import asyncio
import base64

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from cxr_edge.serve.schemas import ScreenResponse


@pytest.fixture(scope="module")
def artifact(tiny_export):
    return next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu"), tiny_export.data


def test_service_screener_and_cli_share_one_result_shape(artifact):
    """The same image gives the same JSON keys (and values) from the Python API and from the service."""
    from cxr_edge.runtime import Screener

    art, data = artifact
    img = sorted((data / "COVID").iterdir())[0]
    with Screener(art, device="cpu") as s:
        local = s.predict([img, b"nope"])
    with _client(art) as c:
        body = c.post("/v1/predict", files=[("files", (img.name, _png(img), "image/png")),
                                            ("files", ("nope.bin", b"nope", "application/octet-stream"))]).json()
    for mine, theirs in zip(local, body["results"]):
        d = mine.to_dict()
        assert set(d) == set(theirs)
        for k in ("ok", "status", "label", "threshold", "backend", "precision"):
            assert d[k] == theirs[k], k
        if mine.ok:
            assert all(abs(d["probabilities"][c] - theirs["probabilities"][c]) < 1e-6 for c in d["probabilities"])
    assert body["results"][1]["status"] == 422 and local[1].status == 422


def _client(artifact, **cfg):
    from fastapi.testclient import TestClient

    from cxr_edge.serve.app import ServeConfig, create_app

    return TestClient(create_app(artifact, ServeConfig(**cfg)))


def _png(path):
    return path.read_bytes()


def test_predict_explain_health_metrics(artifact):
    art, data = artifact
    imgs = sorted((data / "COVID").iterdir())[:2]
    with _client(art) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["precision"] == "int8" and ready["provider"] == "CPUExecutionProvider"
        r = c.post("/v1/predict", files=[("files", (p.name, _png(p), "image/png")) for p in imgs])
        assert r.status_code == 200
        body = r.json()
        assert [x["source"] for x in body["results"]] == [p.name for p in imgs]
        ScreenResponse.model_validate(body)  # the answer is what /docs says it is
        assert all(abs(sum(x["probabilities"].values()) - 1) < 1e-3 for x in body["results"])
        raw = c.post("/v1/predict", content=_png(imgs[0]), headers={"content-type": "application/octet-stream"})
        assert raw.status_code == 200 and raw.json()["results"][0]["label"] == body["results"][0]["label"]
        e = c.post("/v1/explain", files=[("files", (imgs[0].name, _png(imgs[0]), "image/png"))]).json()
        ScreenResponse.model_validate(e)
        png = base64.b64decode(e["results"][0]["explanation"]["overlay_png_base64"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and e["results"][0]["explanation"]["method"] == "engine-native"
        assert e["results"][0]["explanation"]["target"] == e["results"][0]["label"]
        m = c.get("/metrics").text
        assert 'cxr_requests_total{endpoint="predict",status="200"} 2.0' in m and "cxr_batch_size_bucket" in m
        assert "cxr_preprocess_on_gpu 0.0" in m  # which preprocessing path runs is on /metrics too
        api = c.get("/openapi.json").json()
        assert "/v1/predict" in api["paths"] and "ScreeningResultModel" in api["components"]["schemas"]
        ok_schema = api["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok_schema["$ref"].endswith("/ScreenResponse")
        assert "cxr-edge screening" in c.get("/").text


def test_bad_images_are_4xx_per_image_and_the_service_survives(artifact):
    art, data = artifact
    good = sorted((data / "Normal").iterdir())[0]
    with _client(art) as c:
        r = c.post("/v1/predict", files=[("files", ("good.png", _png(good), "image/png")),
                                         ("files", ("bad.png", b"\x89PNG\r\n\x1a\ngarbage", "image/png")),
                                         ("files", ("trunc.png", _png(good)[:300], "image/png"))])
        assert r.status_code == 200
        res = r.json()["results"]
        assert [x["ok"] for x in res] == [True, False, False] and res[1]["status"] == 422
        assert "truncated" in res[2]["error"]
        only_bad = c.post("/v1/predict", content=b"hello", headers={"content-type": "application/octet-stream"})
        assert only_bad.status_code == 422 and "not a recognised image" in only_bad.json()["results"][0]["error"]
        assert c.post("/v1/predict").status_code == 400
        assert c.get("/healthz").status_code == 200 and c.post("/v1/predict", content=_png(good)).status_code == 200


def test_body_limit_and_image_count_limit(artifact):
    art, data = artifact
    good = sorted((data / "Normal").iterdir())[0]
    with _client(art, max_body_mb=0.01, max_images_per_request=2) as c:
        r = c.post("/v1/predict", content=b"\0" * 20_000, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413
    with _client(art, max_images_per_request=2) as c:
        files = [("files", (f"{i}.png", _png(good), "image/png")) for i in range(3)]
        assert c.post("/v1/predict", files=files).status_code == 413


def test_dynamic_batcher_merges_requests_and_answers_each_exactly_once(artifact):
    from cxr_edge.runtime.backends.registry import open_backend
    from cxr_edge.serve.batcher import DynamicBatcher, QueueFull

    art, _ = artifact
    eng = open_backend(art, device="cpu").load()
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, (40, *eng.spec.input_shape), dtype=np.uint8)
    expected = eng.infer(xs)["probs"]
    sizes = []

    class _Sink:
        def __init__(self, into=None):
            self.into = into

        def observe(self, v):
            if self.into is not None:
                self.into.append(v)

        def set(self, v):
            pass

    class M:  # minimal metrics sink
        batch_size, inference_seconds, queue_depth = _Sink(sizes), _Sink(), _Sink()

    async def main():
        b = DynamicBatcher(eng, max_batch=16, max_delay_ms=20, max_queue=100, metrics=M())
        await b.start()
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        small = DynamicBatcher(eng, max_batch=4, max_delay_ms=50, max_queue=3)
        await small.start()
        tasks = [asyncio.create_task(small.submit(x)) for x in xs[:3]]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await small.submit(xs[3])
        done = await asyncio.gather(*tasks)
        await b.stop()
        await small.stop()
        return outs, done

    outs, done = asyncio.run(main())
    got = np.stack([o["probs"] for o in outs])
    assert np.allclose(got, expected, atol=1e-5)  # each request got its own answer, in order
    assert sum(sizes) == 40 and max(sizes) > 1  # requests were merged into batches
    assert len(done) == 3


def test_shutdown_answers_what_is_queued(artifact):
    from cxr_edge.runtime.backends.registry import open_backend
    from cxr_edge.serve.batcher import DynamicBatcher, ShuttingDown

    art, _ = artifact
    eng = open_backend(art, device="cpu").load()
    xs = np.zeros((10, *eng.spec.input_shape), np.uint8)

    async def main():
        b = DynamicBatcher(eng, max_batch=2, max_delay_ms=1, max_queue=100)
        await b.start()
        tasks = [asyncio.create_task(b.submit(x)) for x in xs]
        await asyncio.sleep(0)
        await b.stop()
        with pytest.raises(ShuttingDown):
            await b.submit(xs[0])
        return await asyncio.gather(*tasks, return_exceptions=True)

    res = asyncio.run(main())
    assert all(isinstance(r, dict) and r["probs"].shape == (2,) for r in res)


def test_failing_engine_fails_the_batch_not_the_service(artifact):
    from cxr_edge.runtime.backends.registry import open_backend
    from cxr_edge.serve.batcher import DynamicBatcher

    art, _ = artifact
    eng = open_backend(art, device="cpu").load()
    real = eng.infer
    calls = {"n": 0}

    def flaky(x, outputs=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine exploded")
        return real(x, outputs)

    eng.infer = flaky
    x = np.zeros(eng.spec.input_shape, np.uint8)

    async def main():
        b = DynamicBatcher(eng, max_batch=1, max_delay_ms=1)
        await b.start()
        first = await asyncio.gather(b.submit(x), return_exceptions=True)
        second = await b.submit(x)
        await b.stop()
        return first[0], second

    first, second = asyncio.run(main())
    assert isinstance(first, RuntimeError) and second["probs"].shape == (2,)


def test_load_generator_every_request_answered_once_with_its_own_answer(artifact):
    """The benchmarks/loadtest.py machinery on loopback, small: no loss, no duplicates, no mix-ups."""
    import importlib.util

    from conftest import REPO

    from cxr_edge.runtime import Screener

    spec = importlib.util.spec_from_file_location("loadtest", REPO / "benchmarks" / "loadtest.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    art, data = artifact
    files = sorted((data / "COVID").iterdir())[:4] + sorted((data / "Normal").iterdir())[:4]
    with Screener(art, device="cpu") as s:
        expected = [np.array(list(r.probabilities.values())) for r in s.predict(files)]
    payloads = [f.read_bytes() for f in files]
    with lt.LocalServer(art, max_batch=8, max_delay_ms=10, extra=["--tuning", "off"]) as srv:
        r = asyncio.run(lt.run_level(srv.url, payloads, expected, concurrency=16, n_requests=64, time_limit=60))
        import httpx

        hist = lt.batch_histogram(httpx.get(srv.url + "/metrics").text)
    assert r["statuses"] == {200: 64} and r["answered"] == 64 and r["answered_twice"] == 0 and r["wrong_answers"] == 0
    assert hist["1.0"] < hist["+Inf"]  # some engine batches held more than one request
    # tuning off: which backend the tuner picks depends on the machine, and another backend's INT8 answers
    # differ from ONNX Runtime's by more than the 1e-4 this mix-up check compares with
    with lt.LocalServer(art, max_batch=8, max_delay_ms=50, max_queue=2, extra=["--tuning", "off"]) as srv:
        r = asyncio.run(lt.run_level(srv.url, payloads, expected, concurrency=32, n_requests=64, time_limit=60))
    assert set(r["statuses"]) <= {200, 503} and r["statuses"].get(503, 0) > 0  # deliberate refusals, nothing else
    assert r["answered_twice"] == 0 and r["wrong_answers"] == 0


def test_uploads_stay_in_memory_and_are_kept_only_under_save_dir(artifact, tmp_path, monkeypatch):
    """Starlette spools multipart files over 1 MB to disk; the service must not (patient privacy)."""
    import tempfile

    import cv2

    art, data = artifact
    rolled = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(1))
    noisy = np.random.default_rng(0).integers(0, 255, (1100, 1100), dtype=np.uint8)  # incompressible: ~1.2 MB PNG
    big = cv2.imencode(".png", noisy)[1].tobytes()
    assert len(big) > 1024 * 1024
    with _client(art) as c:
        r = c.post("/v1/predict", files=[("files", ("../../etc/evil.png", big))])
    assert r.status_code == 200 and r.json()["results"][0]["ok"] and not rolled
    save = tmp_path / "kept"
    with _client(art, save_dir=str(save)) as c:
        r = c.post("/v1/predict", files=[("files", ("../../etc/evil.png", big))], headers={"x-request-id": "abc-1"})
        assert r.status_code == 200
        r = c.post("/v1/predict", content=big, headers={"x-request-id": "../../x\nforged log line"})
        assert r.status_code == 200 and "\n" not in r.json()["request_id"] and "/" not in r.json()["request_id"]
    kept = sorted(p.relative_to(save) for p in save.rglob("*") if p.is_file())
    assert len(kept) == 2 and all(len(p.parts) == 2 for p in kept)  # DAY/REQUESTID-K-RANDOM.png, nothing else
    assert kept[0].name.startswith("abc-1-0-") or kept[1].name.startswith("abc-1-0-")
    assert not any("evil" in str(p) for p in kept) and all(p.suffix == ".png" for p in kept)
    assert all((save / p).stat().st_mode & 0o077 == 0 for p in kept)
    assert not (tmp_path / "etc").exists()


def test_engine_threads_follow_model_cost(artifact, monkeypatch):
    from cxr_edge.serve import app as app_mod

    art, _ = artifact
    assert app_mod.default_engine_threads(art, cores=8) == 4  # the tiny CNN: decoding dominates
    monkeypatch.setattr(app_mod, "LIGHT_MODEL_GMACS", 0.0)
    assert app_mod.default_engine_threads(art, cores=8) == 8  # treated as heavy: all cores
    assert app_mod.default_engine_threads("model.keras", cores=8) is None


def test_kiosk_never_inserts_markup_from_the_service():
    """Class names come from the artifact's manifest: the page must build them as text, not HTML."""
    from importlib import resources

    page = resources.files("cxr_edge.serve").joinpath("kiosk.html").read_text()
    assert "innerHTML" not in page and "outerHTML" not in page and "insertAdjacentHTML" not in page
    assert "document.write" not in page


def test_every_front_end_screens_through_the_one_screening_step(artifact, monkeypatch):
    """Screener (files) and the HTTP service (predict and explain) make their results in ScreeningStep.results and
    nowhere else; the same image gets the same decision and the same Grad-CAM from both."""
    import numpy as np

    from cxr_edge.runtime import Screener
    from cxr_edge.runtime.screening_step import ScreeningStep

    made = []
    real = ScreeningStep.results

    def spy(self, indices, *a, **k):
        out = real(self, indices, *a, **k)
        made.extend(id(r) for r in out)
        return out

    monkeypatch.setattr(ScreeningStep, "results", spy)
    art, data = artifact
    img = sorted((data / "COVID").iterdir())[0]
    with Screener(art, device="cpu") as s:
        local = s.predict([img], explain=True)
    assert made and id(local[0]) in made
    made.clear()
    with _client(art) as c:
        e = c.post("/v1/explain", files=[("files", (img.name, _png(img), "image/png"))]).json()["results"][0]
        p = c.post("/v1/predict", files=[("files", (img.name, _png(img), "image/png"))]).json()["results"][0]
    assert len(made) >= 2  # the service's warm-up goes around the step; each answered image went through it
    assert e["label"] == p["label"] == local[0].label and e["explanation"]["method"] == "engine-native"
    assert abs(e["explanation"]["peak"] - local[0].explanation.peak) < 1e-4
    assert np.isfinite(local[0].explanation.cam).all()
