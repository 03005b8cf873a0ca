"""The service takes its per-dub options from one place, ``ServiceSettings.options_model``: a
DubOptions subclass with a field no service code knows shows up in the API (OpenAPI form and
/api/v1/info), is accepted in a job and reaches the pipeline, and gets a control on the web page.
Also: the Runner protocol both runners satisfy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ExtraOptions,
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
from latentdub.service.runner import InProcessRunner, Runner
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}


class FakeResult:
    def to_dict(self) -> dict[str, Any]:
        return {"frames": 1}


class RecordingPipe:
    """Stands in for the pipeline: records the options each dub gets (no model needed)."""

    def __init__(self) -> None:
        self.options: list[DubOptions] = []
        self.called = threading.Event()

    def __call__(self, video: Path, audio: Path, output: Path, opts: DubOptions, **_: Any) -> FakeResult:
        self.options.append(opts)
        self.called.set()
        return FakeResult()


@pytest.fixture()
def extra_app(tmp_path: Path) -> Iterator[tuple[TestClient, RecordingPipe, ServiceSettings]]:
    pipe = RecordingPipe()
    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False, options_model=ExtraOptions)
    with TestClient(create_app(settings, pipe_factory=lambda: pipe)) as client:
        yield client, pipe, settings


def _files(media_dir: Path, tmp_path: Path) -> dict[str, Any]:
    audio = speech(media_dir, tmp_path / "speech.wav", 1.0)
    return {"video": ("clip.mp4", (media_dir / VIDEO).read_bytes(), "video/mp4"),
            "audio": ("speech.wav", audio.read_bytes(), "audio/wav")}


def test_settings_take_the_model_as_a_class_or_an_import_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    assert ServiceSettings(data_dir=tmp_path).options_model is DubOptions
    monkeypatch.setenv("LATENTDUB_OPTIONS_MODEL", "service_helpers.ExtraOptions")  # as a worker process reads it
    assert ServiceSettings(data_dir=tmp_path).options_model is ExtraOptions
    with pytest.raises(ValidationError):
        ServiceSettings(data_dir=tmp_path, options_model=dict)  # not a DubOptions


def test_an_added_field_is_published_in_info_and_openapi(extra_app: tuple[TestClient, RecordingPipe, ServiceSettings],
                                                        tmp_path: Path) -> None:
    client, _, _ = extra_app
    schema = client.get("/api/v1/info").json()["options"]
    assert schema["properties"]["lip_gain"] == {
        "default": 1.0, "description": "Test-only: how strongly the mouth moves.", "maximum": 2.0,
        "minimum": 0.25, "title": "Lip Gain", "type": "number",
    }
    assert schema["properties"]["mood"]["enum"] == ["calm", "lively"]
    assert set(DubOptions.model_fields) < set(schema["properties"])
    spec = client.get("/openapi.json").json()
    for route in ("create_job_api_v1_jobs_post", "sync_dub_api_v1_sync_post"):
        form = spec["components"]["schemas"][f"Body_{route}"]["properties"]
        assert "lip_gain" in form and "Test-only" in form["lip_gain"]["description"], route
    # The stock app does not know the field.
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "stock", auth_enabled=False))) as stock:
        assert "lip_gain" not in stock.get("/api/v1/info").json()["options"]["properties"]
        assert "lip_gain" not in json.dumps(stock.get("/openapi.json").json())


def test_an_added_field_is_accepted_validated_and_reaches_the_pipeline(
    extra_app: tuple[TestClient, RecordingPipe, ServiceSettings], media_dir: Path, tmp_path: Path
) -> None:
    client, pipe, _ = extra_app
    files = _files(media_dir, tmp_path)
    err = assert_error(client.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT), "lip_gain": "9"},
                                   files=files), 422, "lip_gain", "at most 2")
    assert err["code"] == "invalid_option" and err["field"] == "lip_gain"
    r = client.post("/api/v1/jobs", files=files,
                    data={"consent": json.dumps(CONSENT), "lip_gain": "1.5", "mood": "lively", "steps": "3"})
    assert r.status_code == 202, r.text
    assert r.json()["options"]["lip_gain"] == 1.5 and r.json()["options"]["mood"] == "lively"
    assert pipe.called.wait(60), "the job never reached the pipeline"
    opts = pipe.options[0]
    assert isinstance(opts, ExtraOptions) and opts.lip_gain == 1.5 and opts.mood == "lively" and opts.steps == 3


def test_the_stock_model_does_not_take_the_field(tmp_path: Path, media_dir: Path) -> None:
    # A form field that is no option of this server's model is refused, naming it (as any other
    # unknown form field), rather than silently dropped.
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "stock", auth_enabled=False))) as client:
        r = client.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT), "lip_gain": "1.5"},
                        files=_files(media_dir, tmp_path))
        err = assert_error(r, 422, "lip_gain", field="lip_gain")
        assert err["code"] == "unknown_field"


def test_the_page_builds_a_control_for_the_added_field(tmp_path: Path) -> None:
    # Without a browser: the page has no option written in; its script builds them from the schema
    # of /api/v1/info, which lists the added field.
    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False, options_model=ExtraOptions)
    with TestClient(create_app(settings)) as client:
        script = client.get("/static/app.js").text
        assert 'api("GET", "/api/v1/info")' in script and "buildOptions(info.options)" in script
        assert "lip_gain" not in client.get("/").text and "lip_gain" not in script
        assert "lip_gain" in client.get("/api/v1/info").json()["options"]["properties"]


def test_the_page_shows_and_sends_the_added_field_in_chromium(tmp_path: Path, media_dir: Path) -> None:
    sync_playwright = browser_or_skip()
    pipe = RecordingPipe()
    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False, options_model=ExtraOptions)
    audio = speech(media_dir, tmp_path / "speech.wav", 1.0)
    with live(create_app(settings, pipe_factory=lambda: pipe)) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready=true]")
            controls = option_controls(page)
            check_controls(controls, ExtraOptions.model_json_schema())
            assert controls["lip_gain"]["type"] == "number" and controls["mood"]["tag"] == "select"
            page.set_input_files("#video", str(media_dir / VIDEO))
            page.set_input_files("#audio", str(audio))
            page.fill("input[name=lip_gain]", "0.5")
            page.select_option("select[name=mood]", "lively")
            page.uncheck("input[name=deepcache]")
            for field, value in CONSENT.items():
                page.fill(f"#consent-{field.replace('_', '-')}", value)
            page.click("#dub-submit")
            page.wait_for_function("() => document.getElementById('job-status').dataset.status === 'succeeded'"
                                   " || !document.getElementById('dub-error').hidden", timeout=60_000)
            assert not errors, errors
        finally:
            browser.close()
    opts = pipe.options[0]
    assert isinstance(opts, ExtraOptions) and opts.lip_gain == 0.5 and opts.mood == "lively"
    assert opts.deepcache is False and opts.steps == 20  # untouched: the server's default


def test_both_runners_are_runners(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "data")
    assert isinstance(InProcessRunner(settings, None), Runner)
    assert not isinstance(object(), Runner)
    pytest.importorskip("celery")
    from latentdub.service.celery_app import CeleryRunner

    assert isinstance(CeleryRunner(settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})), Runner)


def test_one_added_field_reaches_the_cli_the_api_and_the_page(tmp_path: Path) -> None:
    """Declared once: the subclass's fields become flags of dub and batch, fields of the API's
    published schema, and controls on the page, with no other edit anywhere."""
    import typer
    from typer.testing import CliRunner

    from latentdub.cli.batch import batch_command
    from latentdub.cli.dub import dub_command

    cli = typer.Typer()
    cli.command("dub")(dub_command(ExtraOptions))
    cli.command("batch")(batch_command(ExtraOptions))
    for command in ("dub", "batch"):
        shown = CliRunner().invoke(cli, [command, "--help"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "--lip-gain" in shown.stdout and "how strongly the mouth moves" in shown.stdout, command
        assert "--mood" in shown.stdout and "lively" in shown.stdout, command
    stock = typer.Typer()
    stock.command("dub")(dub_command(DubOptions))
    stock.command("batch")(batch_command(DubOptions))
    assert "--lip-gain" not in CliRunner().invoke(stock, ["dub", "--help"], env={"COLUMNS": "250"}).stdout

    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False, options_model=ExtraOptions)
    with live(create_app(settings, pipe_factory=RecordingPipe)) as base:
        import httpx

        schema = httpx.get(base + "/api/v1/info", timeout=10).json()["options"]
        assert schema["properties"]["lip_gain"]["maximum"] == 2.0
        assert schema["properties"]["mood"]["enum"] == ["calm", "lively"]
        sync_playwright = browser_or_skip()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(base + "/")
                page.wait_for_selector("body[data-ready=true]")
                controls = option_controls(page)
            finally:
                browser.close()
    assert controls["lip_gain"]["type"] == "number" and controls["lip_gain"]["max"] == "2"
    assert controls["mood"]["tag"] == "select" and controls["mood"]["choices"] == ["calm", "lively"]
