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
    assert set(report) >= {"watermark", "c2pa", "marked", "status", "segments", "attribution"}
    assert report["marked"] is False and report["watermark"]["found"] is False and report["status"] == "not_found"
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

            # Functions, not expressions: the page's CSP (no 'unsafe-eval') blocks playwright's eval
            # of an expression string once it has to poll.
            page.wait_for_function(
                "() => ['succeeded','failed','cancelled','error'].includes(document.getElementById('job-status').dataset.status)",
                timeout=120_000,
            )
            assert page.text_content("#job-status") == "done", page.text_content("#dub-error")
            assert not page.is_visible("#dub-error")
            assert page.eval_on_selector("#upload-bar", "e => e.value") == 1
            assert page.eval_on_selector("#job-bar", "e => e.value") == 1

            # The preview: metadata loaded (readyState ≥ HAVE_METADATA) with the dub's duration.
            page.wait_for_function("() => document.getElementById('result-video').readyState >= 1", timeout=30_000)
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
            # read with the service's own key; the picture is the job's output, and the page says so
            assert page.text_content("#verify-status") == "marked"
            assert page.locator("#verify-segments tbody tr[data-status=marked]").count() >= 1
            assert "made by job" in (page.text_content("#verify-attribution") or "")
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


def test_face_strip_pins_a_face_and_shows_who_speaks_in_chromium(live_server: tuple[str, str], tmp_path: Path,
                                                                  media_dir: Path) -> None:
    """Picking a two-face video shows thumbnails with both faces boxed and the speaker bar;
    clicking a face sets the face option to its track, and the dub runs on the uploaded asset
    with that face pinned."""
    import httpx

    from test_service_analysis import two_faces

    sync_playwright = browser_or_skip()
    base, key = live_server
    clip = two_faces(media_dir, tmp_path / "two.mp4")
    audio = speech(media_dir, tmp_path / "speech1.wav", 1.0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            external: list[str] = []
            page.on("request", lambda req: None if req.url.startswith((base, "blob:", "data:"))
                    else external.append(req.url))
            posts: list[str] = []
            page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
            console_errors: list[str] = []
            page.on("pageerror", lambda err: console_errors.append(str(err)))
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#api-key", key)
            face = page.locator("#options [name=face]")
            default = DubOptions.model_fields["face"].default
            assert face.input_value() == default

            page.set_input_files("#video", str(clip))
            page.wait_for_selector("#analysis[data-state=ready], #analysis[data-state=error]", timeout=120_000)
            assert page.get_attribute("#analysis", "data-state") == "ready", page.text_content("#analysis-error")
            page.screenshot(path=str(tmp_path / "analysis.png"), full_page=True)

            # Every thumbnail is a decoded picture with two boxes, one on each half, drawn where the
            # faces are; one colour per face.
            thumbs = page.eval_on_selector_all("#face-strip .thumb", """ts => ts.map(t => {
                const q = t.getBoundingClientRect(), img = t.querySelector('img');
                return {w: img.naturalWidth, h: img.naturalHeight, boxes: [...t.querySelectorAll('.face-box')].map(b => {
                    const r = b.getBoundingClientRect();
                    return {track: b.dataset.track, cx: (r.left + r.width / 2 - q.left) / q.width,
                            cy: (r.top + r.height / 2 - q.top) / q.height, colour: getComputedStyle(b).borderTopColor};
                })};
            })""")
            assert 6 <= len(thumbs) <= 8, thumbs
            sides: dict[str, set[str]] = {"left": set(), "right": set()}
            colours: dict[str, str] = {}
            for t in thumbs:
                assert t["w"] > 0 and abs(t["w"] / t["h"] - 2) < 0.05, t
                assert len(t["boxes"]) == 2, t
                for b in t["boxes"]:
                    sides["left" if b["cx"] < 0.5 else "right"].add(b["track"])
                    assert 0.2 < b["cy"] < 0.8, b
                    assert colours.setdefault(b["track"], b["colour"]) == b["colour"]
            assert len(sides["left"]) == len(sides["right"]) == 1 and sides["left"] != sides["right"], sides
            (left,), (right,) = sides["left"], sides["right"]
            assert colours[left] != colours[right]
            assert page.get_attribute("#face-auto", "aria-pressed") == "true"

            # Clicking a face pins its track; "auto" un-pins.
            page.click(f"#face-strip .thumb:nth-of-type(3) .face-box[data-track='{right}']")
            assert face.input_value() == f"track:{right}"
            pressed = page.eval_on_selector_all(".face-box", "bs => bs.map(b => [b.dataset.track, b.classList.contains('selected')])")
            assert all(sel == (track == right) for track, sel in pressed), pressed
            assert page.get_attribute("#face-auto", "aria-pressed") == "false"
            page.click("#face-auto")
            assert face.input_value() == default
            assert not page.query_selector_all(".face-box.selected")
            page.click(f"#face-strip .thumb:last-of-type .face-box[data-track='{left}']")
            assert face.input_value() == f"track:{left}"

            # The bar: one segment per run of the server's timeline, placed by time, in the colour
            # of that face's boxes (grey where nobody speaks); the title gives times and confidence.
            analysis = httpx.get(f"{base}/api/v1/assets/{page.evaluate('videoAsset.id')}/analysis",
                                 headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
            runs = analysis["speakers"]["segments"]
            segs = page.eval_on_selector_all("#speaker-bar .seg", """ss => {
                const bar = ss[0].parentElement.getBoundingClientRect();
                return ss.map(s => {
                    const r = s.getBoundingClientRect();
                    return {track: s.dataset.track, x0: (r.left - bar.left) / bar.width, x1: (r.right - bar.left) / bar.width,
                            colour: getComputedStyle(s).backgroundColor, title: s.title};
                });
            }""")
            assert len(segs) == len(runs)
            duration = analysis["video"]["duration_s"]
            for seg, run in zip(segs, runs, strict=True):
                assert seg["track"] == ("none" if run["track"] is None else str(run["track"]))
                assert abs(seg["x0"] - run["start_s"] / duration) < 0.01 and abs(seg["x1"] - run["end_s"] / duration) < 0.01
                if run["track"] is not None:
                    assert seg["colour"] == colours[str(run["track"])], (seg, colours)
                assert f"{run['start_s']:.2f}" in seg["title"] and f"{run['end_s']:.2f}" in seg["title"]
                assert "confidence" in seg["title"] and f"{run['confidence']:.2f}" in seg["title"]
            assert {s["track"] for s in segs} >= {left, right}  # both faces speak in this clip
            assert abs(segs[0]["x0"]) < 0.01 and abs(segs[-1]["x1"] - 1) < 0.01

            # The dub names the uploaded asset (no second upload of the video) and the pinned face.
            page.set_input_files("#audio", str(audio))
            page.fill("input[name=steps]", "1")
            page.select_option("select[name=length_policy]", "cut")
            for field in ("subject", "granted-by", "method", "evidence"):
                page.fill(f"#consent-{field}", "Test Person")
            page.click("#dub-submit")
            page.wait_for_function(
                "() => ['succeeded','failed','cancelled','error'].includes(document.getElementById('job-status').dataset.status)",
                timeout=120_000,
            )
            assert page.text_content("#job-status") == "done", page.text_content("#dub-error")
            job = httpx.get(f"{base}/api/v1/jobs/{page.text_content('#job-id')}",
                            headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            assert job["video_asset_id"] == analysis["asset_id"] and job["options"]["face"] == f"track:{left}"
            assert [r for r in posts if r.endswith("/api/v1/assets")] == [base + "/api/v1/assets"]  # the video, once
            assert not console_errors, console_errors
            assert not external, external
        finally:
            browser.close()
