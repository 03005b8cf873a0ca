"""The service's web page: the page and its small API routes (TestClient), and the whole dub flow
in a real headless Chromium (Debian ``chromium`` driven by playwright; never ``playwright install``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    assert_error,
    browser_or_skip,
    check_controls,
    live,
    option_controls,
    speech,
)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient

from latentdub.options import DubOptions
from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"

# -- without a browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, ServiceSettings]]:
    settings = ServiceSettings(data_dir=tmp_path_factory.mktemp("web") / "data")
    app = create_app(settings)  # no weights: the page and /verify need none
    with TestClient(app) as c:
        key, _ = create_key(app.state.store.engine, "web-tests")
        yield c, key, settings


def test_page_is_served_with_nothing_external(client: tuple[TestClient, str, ServiceSettings]) -> None:
    c, _, _ = client
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for tab in ("Dub", "Verify", "Jobs"):
        assert f'data-tab="{tab.lower()}"' in html
    refs = re.findall(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']([^"']*)""", html, re.I)
    assert refs and all(not re.match(r"(?i)(https?:)?//", ref) for ref in refs), refs
    for ref in refs:  # the page's own files, served without a key
        asset = c.get(ref)
        assert asset.status_code == 200 and asset.text, ref
        assert not re.search(r"https?://", asset.text), ref  # nor do they load anything external
    # The option controls are not in the page: app.js makes them from /api/v1/info's schema.
    script = c.get("/static/app.js").text
    assert 'id="options"' in html and "buildOptions(info.options)" in script
    for name in DubOptions.model_fields:
        assert f'name="{name}"' not in html and f'"{name}"' not in script, name
    assert_error(c.get("/static/../app.py"), 404)
    assert_error(c.get("/static/index.py"), 404)


def test_info_needs_no_key_and_says_whether_auth_is_on(client: tuple[TestClient, str, ServiceSettings],
                                                       tmp_path: Path) -> None:
    import latentdub

    c, _, _ = client
    r = c.get("/api/v1/info")
    assert r.status_code == 200
    assert r.json() == {"auth_enabled": True, "version": latentdub.__version__,
                        "options": DubOptions.model_json_schema()}
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "open", auth_enabled=False))) as open_client:
        assert open_client.get("/api/v1/info").json()["auth_enabled"] is False
        assert "authentication is off" in open_client.get("/").text.lower()


def test_verify_route_reports_json_and_leaves_no_upload(client: tuple[TestClient, str, ServiceSettings],
                                                        media_dir: Path) -> None:
    c, key, settings = client
    auth = {"Authorization": f"Bearer {key}"}
    video = (media_dir / VIDEO).read_bytes()
    uploads = settings.data_dir / "uploads"
    assert_error(c.post("/api/v1/verify", files={"video": ("v.mp4", video, "video/mp4")}), 401, "API key")

    r = c.post("/api/v1/verify", files={"video": ("../../v.mp4", video, "video/mp4")}, headers=auth)
    assert r.status_code == 200, r.text
    report = r.json()
    assert set(report) == {"watermark", "c2pa", "marked"}
    assert report["marked"] is False and report["watermark"]["found"] is False
    assert report["watermark"]["frames_checked"] > 0 and report["c2pa"]["present"] is False
    assert str(settings.data_dir) not in r.text

    err = assert_error(c.post("/api/v1/verify", files={"video": ("v.mp4", b"just text\n" * 40, "video/mp4")},
                              headers=auth), 415)
    assert err["field"] == "video" and str(settings.data_dir) not in err["message"]
    assert_error(c.post("/api/v1/verify", files={"video": ("v.mp4", b"", "video/mp4")}, headers=auth), 422, "empty")
    assert_error(c.post("/api/v1/verify", data={"x": "1"}, headers=auth), 422, "video")
    assert_error(c.post("/api/v1/verify", files={"video": ("v.mp4", video, "video/mp4")}, data={"max_frames": "0"},
                        headers=auth), 422, "max_frames")
    assert not uploads.exists() or not list(uploads.iterdir())


# -- in Chromium ---------------------------------------------------------------------------------
@pytest.fixture()
def live_server(tmp_path: Path, tiny_weights: Path) -> Iterator[tuple[str, str]]:
    from latentdub.pipeline import LipSyncPipeline

    settings = ServiceSettings(data_dir=tmp_path / "data", key_concurrency=0, key_daily_quota=0)
    app = create_app(settings, pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"),
                     preload=True)
    key, _ = create_key(app.state.store.engine, "browser")
    with live(app, probe="/readyz") as base:
        yield base, key


def test_dub_preview_download_and_verify_in_chromium(live_server: tuple[str, str], tmp_path: Path,
                                                     media_dir: Path) -> None:
    sync_playwright = browser_or_skip()
    base, key = live_server
    audio = speech(media_dir, tmp_path / "speech1.wav", 1.0)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(accept_downloads=True)
            external: list[str] = []
            page.on("request", lambda req: None if req.url.startswith((base, "blob:", "data:"))
                    else external.append(req.url))
            console_errors: list[str] = []
            page.on("pageerror", lambda err: console_errors.append(str(err)))
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert page.is_visible("#api-key") and not page.is_visible("#auth-off")
            check_controls(option_controls(page), DubOptions.model_json_schema())

            # A wrong key: the API's JSON error is shown on the page.
            page.fill("#api-key", "ld_00000000_" + "x" * 40)
            page.click("#tab-jobs")
            page.wait_for_selector("#jobs-error:not([hidden])")
            assert "API key" in (page.text_content("#jobs-error") or "")
            assert "unauthorized" in (page.text_content("#jobs-error") or "")
            page.click("#tab-dub")

            page.fill("#api-key", key)
            assert page.evaluate("localStorage.getItem('latentdub.apiKey')") == key
            page.set_input_files("#video", str(media_dir / VIDEO))
            page.set_input_files("#audio", str(audio))
            page.fill("input[name=steps]", "1")
            page.select_option("select[name=length_policy]", "cut")
            page.fill("#consent-subject", "Test Woman")
            page.fill("#consent-granted-by", "Test Woman")
            page.fill("#consent-method", "signed release form")
            page.fill("#consent-evidence", "doc-1")
            page.click("#dub-submit")

            page.wait_for_function(
                "['succeeded','failed','cancelled','error'].includes(document.getElementById('job-status').dataset.status)",
                timeout=120_000,
            )
            assert page.text_content("#job-status") == "done", page.text_content("#dub-error")
            assert not page.is_visible("#dub-error")
            assert page.eval_on_selector("#upload-bar", "e => e.value") == 1
            assert page.eval_on_selector("#job-bar", "e => e.value") == 1

            # The preview: metadata loaded (readyState ≥ HAVE_METADATA) with the dub's duration.
            page.wait_for_function("document.getElementById('result-video').readyState >= 1", timeout=30_000)
            duration = page.eval_on_selector("#result-video", "v => v.duration")
            assert abs(duration - 1.0) < 0.15, duration
            page.screenshot(path=str(shots / "dub-done.png"), full_page=True)

            with page.expect_download() as info:
                page.click("#download-link")
            download = info.value
            saved = tmp_path / "downloaded.mp4"
            download.save_as(str(saved))
            data = saved.read_bytes()
            assert len(data) > 1000 and data[4:8] == b"ftyp"

            # Verify the downloaded file on the Verify tab.
            page.click("#tab-verify")
            page.set_input_files("#verify-video", str(saved))
            page.click("#verify-submit")
            page.wait_for_selector("#verify-result:not([hidden]), #verify-error:not([hidden])", timeout=60_000)
            assert not page.is_visible("#verify-error"), page.text_content("#verify-error")
            assert page.text_content("#wm-status") == "found"
            assert page.get_attribute("#verify-result", "data-marked") == "true"
            page.screenshot(path=str(shots / "verify.png"), full_page=True)

            # The jobs list shows the job as succeeded (no Cancel button for it).
            page.click("#tab-jobs")
            row = page.wait_for_selector("#jobs-table tbody tr[data-id]")
            assert "succeeded" in (row.text_content() or "")
            assert page.query_selector("#jobs-table tr[data-id] button.cancel") is None
            page.screenshot(path=str(shots / "jobs.png"), full_page=True)
            assert not console_errors, console_errors
            assert not external, external
        finally:
            browser.close()
    assert (shots / "dub-done.png").stat().st_size > 0
