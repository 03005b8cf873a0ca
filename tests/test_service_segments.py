"""Segments through the HTTP API: a segment's audio is the id of an uploaded audio asset of the
same key, never a server path; the stored file replaces the id only right before the dub."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_helpers import assert_error, speech

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient

from latentdub.options import DubOptions
from latentdub.segments import Segment
from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
FINAL = ("succeeded", "failed", "cancelled")


class FakeResult:
    def to_dict(self) -> dict[str, Any]:
        return {"frames": 1}


class RecordingPipe:
    """Stands in for the pipeline: records each dub's options, and whether each segment's audio
    file was there when the dub started."""

    def __init__(self) -> None:
        self.options: list[DubOptions] = []
        self.present: list[list[bool]] = []

    def __call__(self, video: Path, audio: Path, output: Path, opts: DubOptions, **_: Any) -> FakeResult:
        self.options.append(opts)
        self.present.append([Path(s.audio).is_file() for s in opts.segments or () if s.audio is not None])
        return FakeResult()


class Client:
    def __init__(self, client: TestClient, key: str, other: str, data_dir: Path) -> None:
        self.client = client
        self.auth = {"Authorization": f"Bearer {key}"}
        self.other = {"Authorization": f"Bearer {other}"}
        self.data_dir = data_dir

    def asset(self, path: Path, kind: str, auth: dict[str, str] | None = None) -> str:
        r = self.client.post("/api/v1/assets", data={"kind": kind},
                             files={"file": ("x.bin", path.read_bytes(), "application/x")}, headers=auth or self.auth)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def submit(self, segments: Any, files: dict[str, Any] | None = None, **data: Any) -> Any:
        form = {"consent": json.dumps(CONSENT), **data,
                "segments": segments if isinstance(segments, str) else json.dumps(segments)}
        return self.client.post("/api/v1/jobs", data=form, files=files or {}, headers=self.auth)

    def wait(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.auth)
            assert r.status_code == 200, r.text
            if r.json()["status"] in FINAL:
                return dict(r.json())
            assert time.monotonic() < deadline, r.json()
            time.sleep(0.05)

    def job_count(self) -> int:
        r = self.client.get("/api/v1/jobs", headers=self.auth)
        assert r.status_code == 200, r.text
        return len(r.json()["jobs"])


@contextlib.contextmanager
def _app(data_dir: Path, pipe_factory: Any) -> Iterator[tuple[Client, Any]]:
    settings = ServiceSettings(data_dir=data_dir, key_concurrency=0, key_daily_quota=0)
    app = create_app(settings, pipe_factory=pipe_factory)
    with TestClient(app) as client:
        key, _ = create_key(app.state.store.engine, "segments")
        other, _ = create_key(app.state.store.engine, "someone else")
        yield Client(client, key, other, data_dir), app


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment-media")
    return {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "main.wav", 1.0),
            "voice": speech(media_dir, root / "voice.wav", 3.0)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, RecordingPipe]]:
    pipe = RecordingPipe()
    with _app(tmp_path_factory.mktemp("svc") / "data", lambda: pipe) as (api, _):
        yield api, pipe


def test_segment_audio_is_an_asset_id_and_the_dub_gets_the_stored_file(
    served: tuple[Client, RecordingPipe], media: dict[str, Path]
) -> None:
    api, pipe = served
    ids = {"video_asset_id": api.asset(media["video"], "video"), "audio_asset_id": api.asset(media["audio"], "audio")}
    voice = api.asset(media["voice"], "audio")
    segments = [{"start": 0, "end": 1, "face": "track:0", "audio": voice, "offset": 0.5},
                {"start": 1, "end": 2, "face": "track:1"}]
    r = api.submit(segments, **ids)
    assert r.status_code == 202, r.text
    done = api.wait(r.json()["id"])
    assert done["status"] == "succeeded", done
    # The job keeps the id: no server path is ever shown to the client.
    assert [s["audio"] for s in done["options"]["segments"]] == [voice, None]
    assert str(api.data_dir) not in json.dumps(done)
    # The dub got the stored upload of that asset in its place, present when it started.
    got = pipe.options[-1].segments
    assert got is not None and got[1] == Segment(start=1, end=2, face="track:1")
    stored = Path(got[0].audio or "")
    assert stored.is_absolute() and stored.parent == api.data_dir / "uploads" and pipe.present[-1] == [True]
    assert stored.read_bytes() == media["voice"].read_bytes()
    assert (got[0].start, got[0].end, got[0].face, got[0].offset) == (0, 1, "track:0", 0.5)


def test_a_segment_audio_that_is_no_asset_of_this_key_is_refused_at_submit(
    served: tuple[Client, RecordingPipe], media: dict[str, Path]
) -> None:
    api, _ = served
    ids = {"video_asset_id": api.asset(media["video"], "video"), "audio_asset_id": api.asset(media["audio"], "audio")}
    others = api.asset(media["voice"], "audio", auth=api.other)
    a_video = ids["video_asset_id"]
    before = api.job_count()
    uploads = sorted((api.data_dir / "uploads").iterdir())

    def bad(audio: str) -> list[dict[str, Any]]:
        return [{"start": 0, "end": 1}, {"start": 1, "end": 2, "face": "track:0", "audio": audio}]

    label = "segment 2 (1.00–2.00 s, track:0)"
    for path in ("/etc/passwd", "../uploads/x.wav", "voices\\a.wav", str(media["voice"])):
        err = assert_error(api.submit(bad(path), **ids), 422, label, "not a file path", field="segments")
        assert err["code"] == "invalid_option"
    for unknown in (others, "no-such-asset"):  # another key's asset looks like no asset at all
        err = assert_error(api.submit(bad(unknown), **ids), 404, label, f"no audio asset with id {unknown!r}",
                           field="segments")
        assert err["code"] == "asset_not_found"
    err = assert_error(api.submit(bad(a_video), **ids), 422, label, "is a video asset, not an audio asset",
                       field="segments")
    assert err["code"] == "wrong_asset_kind"
    # A refused request stores nothing: no job, and its uploaded files are not kept.
    files = {"video": ("clip.mp4", media["video"].read_bytes(), "video/mp4")}
    r = api.submit(bad("/etc/passwd"), audio_asset_id=ids["audio_asset_id"], files=files)
    assert_error(r, 422, label, field="segments")
    assert api.job_count() == before and sorted((api.data_dir / "uploads").iterdir()) == uploads


@pytest.mark.parametrize(
    ("segments", "words"),
    [
        ('[{"start": 0, "end": 1},', ["segments", "must be valid JSON", "line 1, column"]),
        ("segments.json", ["segments must be JSON text"]),
        ([{"start": 0, "end": 2}, {"start": 1, "end": 3}], ["segment 2 (1.00–3.00 s, auto): overlaps segment 1"]),
        ([{"start": 0, "end": 1, "face": "largest"}], ["segment 1 (0.00–1.00 s, largest)", "largest names no one face"]),
    ],
)
def test_bad_segments_are_a_422_naming_the_option(
    served: tuple[Client, RecordingPipe], media: dict[str, Path], segments: Any, words: list[str]
) -> None:
    api, _ = served
    ids = {"video_asset_id": api.asset(media["video"], "video"), "audio_asset_id": api.asset(media["audio"], "audio")}
    err = assert_error(api.submit(segments, **ids), 422, *words, field="segments")
    assert err["code"] == "invalid_option"


def test_an_asset_deleted_after_submit_fails_the_job_naming_the_segment(
    tmp_path: Path, media: dict[str, Path]
) -> None:
    gate = threading.Event()
    pipe = RecordingPipe()

    def slow_pipe() -> RecordingPipe:
        gate.wait(60)  # the job stays queued until the asset is gone
        return pipe

    with _app(tmp_path / "data", slow_pipe) as (api, app):
        ids = {"video_asset_id": api.asset(media["video"], "video"),
               "audio_asset_id": api.asset(media["audio"], "audio")}
        voice = api.asset(media["voice"], "audio")
        r = api.submit([{"start": 0.5, "end": 1.5, "audio": voice}], **ids)
        assert r.status_code == 202, r.text
        app.state.store.remove_assets([voice])
        gate.set()
        done = api.wait(r.json()["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "bad_input", done
        assert "segment 1 (0.50–1.50 s, auto)" in done["error"]["message"] and voice in done["error"]["message"]
        assert not pipe.options  # the dub never started


def test_the_published_schema_has_segments_and_the_page_leaves_lists_to_the_api(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False)
    with TestClient(create_app(settings)) as client:
        schema = client.get("/api/v1/info").json()["options"]
        prop = schema["properties"]["segments"]
        assert prop["default"] is None and "asset" in prop["description"]
        assert {"type": "array", "items": {"$ref": "#/$defs/Segment"}} in prop["anyOf"]
        assert set(schema["$defs"]["Segment"]["properties"]) == {"start", "end", "face", "audio", "offset"}
        assert schema["$defs"]["Segment"]["required"] == ["start", "end"]
        script = client.get("/static/app.js").text
        assert 'prop.type === "array" || prop.type === "object"' in script
