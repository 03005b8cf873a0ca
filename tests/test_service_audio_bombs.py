"""Audio bombs against the live service (issue 17 §1): every one is a JSON 413 in under 2 s,
with under 200 MB of extra server memory and nothing left on disk.

The server runs in this process (uvicorn in a thread, ``service_helpers.live``), so the process's
peak RSS is the server's. Its model never loads: upload checks need none. The bombs (made with
PyAV by ``test_audio_bombs``) are the attacks as reported: a 2 MB Opus file of two hours (it took
65 s and 4 GB before the 413), a header that says one second over two hours of packets, and
~1 KB files whose timestamps jump by two hours or by 10^6 s (1.4 GB, and a 500).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_helpers import assert_error, live, speech
from test_audio_bombs import declare_mkv_duration, jump_opus, long_opus, overlap_opus

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("psutil")

import httpx
import psutil

from latentdub.service.app import create_app
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
MB = 1 << 20
MAX_S = 2.0
MAX_RSS_MB = 200.0


class Server:
    def __init__(self, base: str, settings: ServiceSettings) -> None:
        self.base = base
        self.settings = settings
        self.client = httpx.Client(base_url=base, timeout=60)

    @property
    def uploads(self) -> set[Path]:
        folder = self.settings.data_dir / "uploads"
        return set(folder.iterdir()) if folder.exists() else set()

    def post(self, path: str, **kw: Any) -> tuple[httpx.Response, float, float]:
        """The answer, its time (s) and the server's peak RSS above the start (MB) meanwhile."""
        proc = psutil.Process()
        start = peak = proc.memory_info().rss
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, proc.memory_info().rss)
                done.wait(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            r = self.client.post(path, **kw)
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            sampler.join()
        return r, seconds, (max(peak, proc.memory_info().rss) - start) / MB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[Server]:
    settings = ServiceSettings(data_dir=tmp_path_factory.mktemp("bombs") / "data", auth_enabled=False)
    assert settings.max_duration_s == 600  # the default limit: the bombs are sized against it
    app = create_app(settings)  # no weights: alive, never ready, uploads still checked
    with live(app) as base:
        srv = Server(base, settings)
        # Warm up (imports, PyAV, allocator arenas) with a good upload, out of every measurement.
        good = speech(media_dir, tmp_path_factory.mktemp("speech") / "speech.wav", 2.0)
        r = srv.client.post("/api/v1/assets", data={"kind": "audio"}, files={"file": ("a.wav", good.read_bytes())})
        assert r.status_code == 201, r.text
        srv.good = good  # type: ignore[attr-defined]
        try:
            yield srv
        finally:
            srv.client.close()


BOMBS = {
    # declared in the header: refused before decoding
    "2 h of Opus in Ogg": lambda d: long_opus(d / "b.ogg", 7200, "ogg"),
    "2 h of Opus in Matroska": lambda d: long_opus(d / "b.mkv", 7200, "matroska"),
    "a 10^6 s jump, declared": lambda d: jump_opus(d / "b.mkv", 1e6),
    # the header lies: only decoding tells
    "2 h behind a 1 s header": lambda d: declare_mkv_duration(long_opus(d / "b.mkv", 7200, "matroska"), 1.0),
    "a 2 h jump behind a 2.4 s header": lambda d: declare_mkv_duration(jump_opus(d / "b.mkv", 7200), 2.4),
    "a 10^6 s jump behind a 2.4 s header": lambda d: declare_mkv_duration(jump_opus(d / "b.mkv", 1e6), 2.4),
    "2 h of frames overlapping in 60 s": lambda d: overlap_opus(d / "b.mkv", 60000),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_an_audio_bomb_asset_is_a_quick_cheap_413(server: Server, tmp_path: Path, name: str) -> None:
    bomb = BOMBS[name](tmp_path)
    assert bomb.stat().st_size < 3 * MB
    before = server.uploads
    r, seconds, rss_mb = server.post(
        "/api/v1/assets", data={"kind": "audio"}, files={"file": ("speech.wav", bomb.read_bytes(), "audio/wav")}
    )
    err = assert_error(r, 413, "limit", field="file")
    assert err["code"] == "too_long", err
    assert str(server.settings.data_dir) not in err["message"] and bomb.name not in err["message"], err
    assert seconds < MAX_S, (name, seconds)
    assert rss_mb < MAX_RSS_MB, (name, rss_mb)
    assert server.uploads == before  # nothing left on disk


def test_an_audio_bomb_in_a_job_leaves_nothing_and_the_server_serves_on(
    server: Server, tmp_path: Path, media_dir: Path
) -> None:
    bomb = declare_mkv_duration(long_opus(tmp_path / "b.mkv", 7200, "matroska"), 1.0)
    before = server.uploads
    files = {"video": ("clip.mp4", (media_dir / VIDEO).read_bytes(), "video/mp4"),
             "audio": ("speech.mkv", bomb.read_bytes(), "audio/x-matroska")}
    r, seconds, rss_mb = server.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT)}, files=files)
    err = assert_error(r, 413, "limit", field="audio")
    assert err["code"] == "too_long", err
    assert seconds < MAX_S + 1.0 and rss_mb < MAX_RSS_MB, (seconds, rss_mb)  # + the video's probe
    assert server.uploads == before  # the video stored first is removed too

    good = server.good  # type: ignore[attr-defined]
    r = server.client.post("/api/v1/assets", data={"kind": "audio"}, files={"file": ("a.wav", good.read_bytes())})
    assert r.status_code == 201, r.text
    assert server.client.get("/healthz").status_code == 200


def test_audio_just_over_the_limit_is_still_413_not_422(tmp_path: Path, media_dir: Path) -> None:
    # A real recording over a small limit: the same code and status as a bomb, as before the fix.
    settings = ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False, max_duration_s=3.0)
    with live(create_app(settings)) as base, httpx.Client(base_url=base, timeout=60) as client:
        audio = speech(media_dir, tmp_path / "five.wav", 5.0)
        r = client.post("/api/v1/assets", data={"kind": "audio"}, files={"file": ("a.wav", audio.read_bytes())})
        err = assert_error(r, 413, "limit", field="file")
        assert err["code"] == "too_long"
        short = speech(media_dir, tmp_path / "two.wav", 2.0)
        r = client.post("/api/v1/assets", data={"kind": "audio"}, files={"file": ("a.wav", short.read_bytes())})
        assert r.status_code == 201, r.text
