"""Issue 17 §5, against a live server (uvicorn in a thread): owner-less rows stay hidden from keys,
no server path in the job JSON or its webhook, 422 (not 500) for hostile text, Range as RFC 9110
says, unknown form fields refused, face points checked at submit, security headers, offline /docs."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Receiver,
    assert_error,
    browser_or_skip,
    live,
    speech,
)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

import httpx

from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"  # 590x590, 5 s
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
FINAL = ("succeeded", "failed", "cancelled")


class Live:
    """A live server with the tiny model and auth on, one key, and a finished job with a webhook."""

    def __init__(self, base: str, key: str, settings: ServiceSettings, weights: Path, files: dict[str, Path]) -> None:
        self.base = base
        self.auth = {"Authorization": f"Bearer {key}"}
        self.settings = settings
        self.weights = weights
        self.files = files
        self.http = httpx.Client(base_url=base, timeout=60)
        self.job: dict[str, Any] = {}
        self.hook_body = b""

    def submit(self, data: dict[str, Any] | None = None, *, path: str = "/api/v1/jobs",
               files: dict[str, Any] | None = None) -> httpx.Response:
        form = {"consent": json.dumps(CONSENT), "steps": "1", "length_policy": "cut", **(data or {})}
        if files is None:
            files = {"video": ("v.mp4", self.files["video"].read_bytes(), "video/mp4"),
                     "audio": ("a.wav", self.files["audio"].read_bytes(), "audio/wav")}
        return self.http.post(path, data={k: v for k, v in form.items() if v is not None}, files=files,
                              headers=self.auth)

    def asset(self, kind: str, path: Path) -> str:
        r = self.http.post("/api/v1/assets", data={"kind": kind}, files={"file": (path.name, path.read_bytes())},
                           headers=self.auth)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def wait(self, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.http.get(f"/api/v1/jobs/{job_id}", headers=self.auth).json()
            if job["status"] in FINAL:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.1)

    def uploads(self) -> set[Path]:
        folder = self.settings.data_dir / "uploads"
        return set(folder.iterdir()) if folder.exists() else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, media_dir: Path) -> Iterator[Live]:
    """One real tiny-model job, with a segment's own audio asset and a webhook, run to the end."""
    from latentdub.pipeline import LipSyncPipeline

    root = tmp_path_factory.mktemp("hardening")
    settings = ServiceSettings(data_dir=root / "data", key_concurrency=0, key_daily_quota=0,
                               webhook_backoff_s=0.1, allow_private_webhooks=True)
    app = create_app(settings, pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"),
                     preload=True)
    key, _ = create_key(app.state.store.engine, "hardening")
    files = {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "speech.wav", 1.0)}
    Receiver.got.clear()
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        with live(app, probe="/readyz") as base:
            svc = Live(base, key, settings, tiny_weights, files)
            segment_audio = svc.asset("audio", files["audio"])
            segments = json.dumps([{"start": 0, "end": 1, "audio": segment_audio}])
            r = svc.submit({"webhook_url": f"http://127.0.0.1:{hooks.server_address[1]}/hook", "segments": segments})
            assert r.status_code == 202, r.text
            svc.job = svc.wait(r.json()["id"])
            assert svc.job["status"] == "succeeded", svc.job
            deadline = time.monotonic() + 15
            while not Receiver.got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert Receiver.got, "the webhook did not arrive"
            svc.hook_body = Receiver.got[0][1]
            yield svc
            svc.http.close()
    finally:
        hooks.shutdown()


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


# -- no server path in what a client sees ----------------------------------------------------------
def test_job_json_and_webhook_body_hold_no_server_path(server: Live) -> None:
    job = server.http.get(f"/api/v1/jobs/{server.job['id']}", headers=server.auth).json()
    listed = server.http.get("/api/v1/jobs", headers=server.auth).json()["jobs"]
    hook = json.loads(server.hook_body)
    assert hook["data"]["id"] == job["id"] and job["result"]["frames"] > 0
    secret = [str(server.settings.data_dir), str(server.weights), tempfile.gettempdir(), str(Path.home())]
    for name, doc in (("job", job), ("list", listed), ("webhook", hook)):
        for where, text in _strings(doc):
            if where.endswith(".result_url"):
                assert text.startswith("/api/v1/jobs/"), (name, where, text)
                continue
            assert not text.startswith("/"), (name, where, text)
            assert not any(s in text for s in secret), (name, where, text)
    # What a client needs is still there, the model named without its folder.
    result = job["result"]
    assert {"frames", "duration_s", "tracks", "silence", "speakers", "timings", "warnings"} <= set(result)
    assert result["model"]["version"] and result["model"]["random_weights"] is True and "source" not in result["model"]
    assert result["provenance"]["watermark"]["on"] is True and result["provenance"]["audit"]["hash"]
    assert "output" not in result and "log" not in result["provenance"]["audit"]
    assert result["options"]["segments"] == job["options"]["segments"]  # asset ids, not the stored files


# -- Range -----------------------------------------------------------------------------------------
def test_result_range_errors_are_json_416_and_an_invalid_range_is_ignored(server: Live) -> None:
    url = f"/api/v1/jobs/{server.job['id']}/result"
    whole = server.http.get(url, headers=server.auth)
    assert whole.status_code == 200
    size = len(whole.content)
    for bad in (f"bytes={size}-", f"bytes={size + 1000}-{size + 2000}", "bytes=-0"):
        r = server.http.get(url, headers={**server.auth, "Range": bad})
        err = assert_error(r, 416)
        assert err["code"] == "range_not_satisfiable" and r.headers["content-range"] == f"bytes */{size}", bad
    for invalid in ("bytes=abc", "bytes=5-2", "items=0-9", "bytes", "bytes=1-2-3", "bytes=--5"):
        r = server.http.get(url, headers={**server.auth, "Range": invalid})
        assert r.status_code == 200 and r.content == whole.content, (invalid, r.status_code, r.text[:200])
    r = server.http.get(url, headers={**server.auth, "Range": f"bytes=0-9, {size + 5}-"})  # one part satisfiable
    assert r.status_code == 206 and r.content == whole.content[:10]
    r = server.http.get(url, headers={**server.auth, "Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == whole.content[-10:]


# -- hostile text ------------------------------------------------------------------------------------
def test_bad_webhook_url_and_deeply_nested_json_are_422_not_500(server: Live) -> None:
    tiny = {"video": ("v.mp4", b"x", "video/mp4"), "audio": ("a.wav", b"x", "audio/wav")}
    err = assert_error(server.submit({"webhook_url": "http://[::1/"}, files=tiny), 422, field="webhook_url")
    assert err["code"] == "invalid_webhook_url"
    for deep in ("[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000, "[" * 40 + "]" * 40):
        err = assert_error(server.submit({"consent": deep}, files=tiny), 422, field="consent")
        assert err["code"] == "invalid_consent", err
    err = assert_error(server.submit({"consent": json.dumps({**CONSENT, "x": "a" * 300_000})}, files=tiny), 422)
    assert err["field"] == "consent" and "too long" in err["message"]
    err = assert_error(server.submit({"segments": "[" * 100_000}, files=tiny), 422, field="segments")
    assert err["code"] == "invalid_option"
    # Brackets inside strings are text, not nesting.
    consent = json.dumps({**CONSENT, "evidence": "[" * 1000})
    err = assert_error(server.submit({"consent": consent, "steps": "0"}, files=tiny), 422, field="steps")
    assert server.http.get("/healthz").status_code == 200


# -- unknown fields ----------------------------------------------------------------------------------
def test_unknown_form_fields_are_refused_naming_the_field(server: Live) -> None:
    before = server.uploads()
    for path in ("/api/v1/jobs", "/api/v1/sync"):
        for name, value in (("stepz", "5"), ("output", "/etc/x"), ("options", '{"steps": 2}')):
            err = assert_error(server.submit({name: value}, path=path), 422, name, "steps", field=name)
            assert err["code"] == "unknown_field"
    err = assert_error(server.submit({"timeout_s": "5"}), 422, field="timeout_s")  # a field of /sync only
    assert server.uploads() == before  # refused before any upload was stored


# -- face points ---------------------------------------------------------------------------------------
def test_a_face_point_outside_the_video_is_refused_at_submit(server: Live) -> None:
    before = server.uploads()
    cases = {"1e308,1e308@1": "590x590", "590,10@1": "590x590", "10,-1": "590x590", "nan,nan": "590x590",
             "10,10@5": "5.00 s", "10,10@1e308": "5.00 s"}
    for face, says in cases.items():
        err = assert_error(server.submit({"face": face}), 422, says, field="face")
        assert err["code"] == "invalid_option", (face, err)
    assert "X must be from 0 to 589" in assert_error(server.submit({"face": "1e308,1e308@1"}), 422)["message"]
    assert server.uploads() == before  # the refused uploads are removed again
    video = server.asset("video", server.files["video"])
    seg = json.dumps([{"start": 0, "end": 1, "face": "100,100@9"}])
    files = {"audio": ("a.wav", server.files["audio"].read_bytes(), "audio/wav")}
    err = assert_error(server.submit({"segments": seg, "video_asset_id": video}, files=files), 422, "segment 1",
                       "5.00 s", field="segments")
    # A point in the picture at a time in the video is a job.
    r = server.submit({"face": "295,200@0.5"})
    assert r.status_code == 202, r.text
    server.http.post(f"/api/v1/jobs/{r.json()['id']}/cancel", headers=server.auth)
    server.wait(r.json()["id"])


# -- security headers and /docs --------------------------------------------------------------------------
def test_every_response_has_the_security_headers_and_docs_need_no_cdn(server: Live) -> None:
    answers = {
        "page": server.http.get("/"), "script": server.http.get("/static/app.js"),
        "info": server.http.get("/api/v1/info"), "health": server.http.get("/healthz"),
        "404": server.http.get("/nope"), "401": server.http.get("/api/v1/jobs"),
        "422": server.submit({"stepz": "1"}), "job": server.http.get(f"/api/v1/jobs/{server.job['id']}", headers=server.auth),
        "docs": server.http.get("/docs"), "openapi": server.http.get("/openapi.json"),
    }
    for name, r in answers.items():
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (name, r.headers)
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("referrer-policy") == "no-referrer", name
    docs = answers["docs"]
    assert docs.status_code == 200 and not re.search(r"https?://", docs.text), docs.text
    linked = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert any(u.endswith(".js") for u in linked) and any(u.endswith(".css") for u in linked), linked
    for url in linked:
        assert server.http.get(url).status_code == 200, url
    assert_error(server.http.get("/docs/static/..%2Fsettings.py"), 404)


def test_docs_and_the_web_page_render_in_chromium_with_no_internet(server: Live) -> None:
    sync_playwright = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.route(re.compile(r"^(?!" + re.escape(server.base) + r")"),
                       lambda route: (outside.append(route.request.url), route.abort()))
            problems: list[str] = []
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
            page.goto(f"{server.base}/docs")
            page.wait_for_selector("text=Submit a dub job", timeout=30_000)
            assert "latentdub" in page.inner_text(".information-container")
            page.goto(f"{server.base}/")
            page.wait_for_selector("#options [name=steps]", timeout=30_000)  # app.js ran, built the controls
            assert not outside and not problems, (outside, problems)
        finally:
            browser.close()


# -- owner-less rows --------------------------------------------------------------------------------
def test_jobs_and_assets_made_without_auth_are_hidden_from_every_key(tmp_path: Path, media_dir: Path) -> None:
    data = tmp_path / "data"
    audio = speech(media_dir, tmp_path / "s.wav", 1.0)
    media = {"video": ("v.mp4", (media_dir / VIDEO).read_bytes(), "video/mp4"),
             "audio": ("a.wav", audio.read_bytes(), "audio/wav")}
    # --no-auth: no model, so the job waits queued; an asset of each kind too.
    with live(create_app(ServiceSettings(data_dir=data, auth_enabled=False))) as base, httpx.Client(base_url=base) as c:
        r = c.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT)}, files=media)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assets = {kind: c.post("/api/v1/assets", data={"kind": kind}, files={"file": media[kind]}).json()["id"]
                  for kind in ("video", "audio")}
    app = create_app(ServiceSettings(data_dir=data, auth_enabled=True))
    key, _ = create_key(app.state.store.engine, "later")
    with live(app) as base, httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
        job = f"/api/v1/jobs/{job_id}"
        for r in (c.get(job), c.get(f"{job}/result"), c.post(f"{job}/cancel"), c.delete(job)):
            assert_error(r, 404)
        assert job_id not in {j["id"] for j in c.get("/api/v1/jobs").json()["jobs"]}
        assert_error(c.get(f"/api/v1/assets/{assets['video']}"), 404)
        assert_error(c.get(f"/api/v1/assets/{assets['video']}/analysis"), 404)
        form = {"consent": json.dumps(CONSENT), "video_asset_id": assets["video"], "audio_asset_id": assets["audio"]}
        assert_error(c.post("/api/v1/jobs", data=form), 404, field="video_asset_id")
        seg = json.dumps([{"start": 0, "end": 1, "audio": assets["audio"]}])
        form = {"consent": form["consent"], "audio_asset_id": assets["audio"], "segments": seg}
        assert_error(c.post("/api/v1/jobs", data=form, files={"video": media["video"]}), 404, field="segments")
    from latentdub.service.db import open_database
    from latentdub.service.store import JobStore

    store = JobStore(open_database(ServiceSettings(data_dir=data).database_url))
    assert not store.get(job_id).cancel_requested  # still there, not cancelled: untouched by the key
