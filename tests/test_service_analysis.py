"""``GET /api/v1/assets/{id}/analysis``: faces, speakers and thumbnails of an uploaded video.

Real media: a side-by-side composite of two real talking heads (the woman left, the man right)
whose audio is the woman's own speech for the first half and the man's for the second.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from service_helpers import assert_error

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient

from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

LEFT = "retalking_face3_woman_25fps.mp4"  # 590x590, 25 fps, one frontal face, speech
RIGHT = "retalking_face2_man_25fps.mp4"  # 844x844, 25 fps, one frontal face, speech
SECONDS = 4.0
HEIGHT = 160
SR = 16000


def two_faces(media_dir: Path, out: Path, seconds: float = SECONDS, height: int = HEIGHT) -> Path:
    """``LEFT | RIGHT`` side by side, ``seconds`` long, with the left clip's own audio for the
    first half and the right clip's for the second (each at its own clip time, so in sync)."""
    from latentdub.media.audio_io import AudioClip, load_audio
    from latentdub.media.reader import iter_frames
    from latentdub.media.writer import VideoWriter

    fps = 25
    n = round(seconds * fps)
    frames = []
    for fa, fb in zip(iter_frames(media_dir / LEFT), iter_frames(media_dir / RIGHT), strict=False):
        if len(frames) >= n:
            break
        sides = [cv2.resize(im, (height, height), interpolation=cv2.INTER_AREA) for im in (fa.image, fb.image)]
        frames.append(np.hstack(sides))
    waves = [load_audio(media_dir / name).to_mono_16k() for name in (LEFT, RIGHT)]
    half = round(seconds / 2 * SR)
    wave = np.concatenate([waves[0][:half], waves[1][half : round(seconds * SR)]]).astype(np.float32)
    with VideoWriter(out, width=2 * height, height=height, time_base=Fraction(1, fps), fps=fps, crf=20,
                     preset="veryfast", audio=AudioClip(wave[:, None], SR)) as writer:  # fmt: skip
        for i, image in enumerate(frames):
            writer.write(image, pts=i)
    return out


@pytest.fixture(scope="module")
def clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_faces(media_dir, tmp_path_factory.mktemp("clips") / "two.mp4")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, ServiceSettings, str, str]]:
    settings = ServiceSettings(data_dir=tmp_path_factory.mktemp("analysis") / "data", analysis_max_s=4.5)
    app = create_app(settings)  # no weights: the analysis needs none
    with TestClient(app) as c:
        mine, _ = create_key(app.state.store.engine, "mine")
        other, _ = create_key(app.state.store.engine, "other")
        yield c, settings, mine, other


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload(c: TestClient, key: str, path: Path, kind: str = "video") -> str:
    r = c.post("/api/v1/assets", files={"file": ("x.bin", path.read_bytes())}, data={"kind": kind},
               headers=_auth(key))  # fmt: skip
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def analysed(service: tuple[TestClient, ServiceSettings, str, str], clip: Path) -> tuple[str, dict[str, Any], float]:
    """(asset id, the first answer, its wall time)."""
    c, _, mine, _ = service
    asset = _upload(c, mine, clip)
    t0 = time.monotonic()
    r = c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(mine))
    wall = time.monotonic() - t0
    assert r.status_code == 200, r.text
    return asset, r.json(), wall


def test_two_faces_their_boxes_and_the_pin_values(analysed: tuple[str, dict[str, Any], float]) -> None:
    asset, data, _ = analysed
    assert data["asset_id"] == asset
    video = data["video"]
    assert (video["width"], video["height"]) == (2 * HEIGHT, HEIGHT)
    assert video["frames"] == round(SECONDS * 25) and abs(video["fps"] - 25) < 0.01
    assert abs(video["duration_s"] - SECONDS) < 0.05
    assert data["pin"] == {"option": "face", "default": "auto"}  # DubOptions.face and its default

    # One face on each half, each seen through the whole clip.
    tracks = data["tracks"]
    assert len(tracks) == 2, tracks
    centre = {t["id"]: np.nanmean([(b[0] + b[2]) / 2 for b in t["boxes"] if b]) for t in tracks}
    left, right = sorted(centre, key=centre.get)
    assert centre[left] < HEIGHT < centre[right]
    for t in tracks:
        assert t["pin"] == f"track:{t['id']}"
        assert t["first_frame"] <= 3 and t["last_frame"] == video["frames"] - 1
        assert 0.3 * HEIGHT < t["mean_size"] < 1.0 * HEIGHT  # a head-and-shoulders crop
        assert len(t["boxes"]) == len(data["frames"])

    # ~8 evenly spaced thumbnails: real JPEGs, upright, with both faces' boxes inside the frame.
    frames = data["frames"]
    assert 6 <= len(frames) <= 8
    idx = [f["index"] for f in frames]
    assert idx == sorted(set(idx)) and idx[0] < video["frames"] / 6 and idx[-1] > video["frames"] * 5 / 6
    for k, f in enumerate(frames):
        image = cv2.imdecode(np.frombuffer(base64.b64decode(f["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (f["height"], f["width"])
        assert abs(f["width"] / f["height"] - 2.0) < 0.02
        assert {face["track"] for face in f["faces"]} == {left, right}
        for face in f["faces"]:
            x0, y0, x1, y1 = face["box"]
            assert 0 <= x0 < x1 <= 2 * HEIGHT and 0 <= y0 < y1 <= HEIGHT
            track = next(t for t in tracks if t["id"] == face["track"])
            assert track["boxes"][k] == face["box"]


def test_speaker_timeline_follows_the_audio(analysed: tuple[str, dict[str, Any], float], clip: Path) -> None:
    _, data, _ = analysed
    assert data["speakers_error"] is None
    speakers = data["speakers"]
    assert speakers is not None and sorted(speakers["track_ids"]) == sorted(t["id"] for t in data["tracks"])
    segments = speakers["segments"]
    n = data["video"]["frames"]
    # The runs tile the video: no gap, no overlap, times rising.
    assert segments[0]["start_frame"] == 0 and segments[-1]["stop_frame"] == n
    for a, b in itertools.pairwise(segments):
        assert a["stop_frame"] == b["start_frame"] and a["end_s"] == b["start_s"]
    assert abs(segments[-1]["end_s"] - SECONDS) < 0.05
    assert all(0.0 <= s["confidence"] <= 1.0 for s in segments)
    # The runs carry the library's per-frame decision exactly (a fresh run on the same file).
    from latentdub.service.analysis import faces_and_speakers

    _, timeline, _ = faces_and_speakers(clip, workers=1)
    assert timeline is not None
    per_frame = np.concatenate([[-1 if s["track"] is None else s["track"]] * (s["stop_frame"] - s["start_frame"])
                                for s in segments])  # fmt: skip
    assert per_frame.tolist() == timeline.track.tolist()
    for s in segments:
        assert abs(s["confidence"] - float(np.mean(timeline.confidence[s["start_frame"] : s["stop_frame"]]))) < 1e-3
    # The first half is the left face's own speech, the second the right one's: away from the
    # switch, the speaker is the face on that side.
    centre = {t["id"]: np.nanmean([(b[0] + b[2]) / 2 for b in t["boxes"] if b]) for t in data["tracks"]}
    left, right = sorted(centre, key=centre.get)
    assert per_frame[: n // 8].tolist() == [left] * (n // 8)
    assert per_frame[n - n // 8 :].tolist() == [right] * (n // 8)


def test_cached_once_per_asset_and_nothing_of_the_server_leaks(
    service: tuple[TestClient, ServiceSettings, str, str], analysed: tuple[str, dict[str, Any], float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from latentdub.service import analysis

    c, settings, mine, _ = service
    asset, first, wall = analysed
    cache = settings.data_dir / "analysis" / f"{asset}.json"
    assert cache.is_file()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the analysis ran again")

    monkeypatch.setattr(analysis, "analyze_video_asset", boom)
    t0 = time.monotonic()
    r = c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(mine))
    assert r.status_code == 200 and r.json() == first
    assert time.monotonic() - t0 < max(0.5, wall / 4)
    assert str(settings.data_dir) not in r.text and "uploads" not in r.text


def test_owner_kind_and_unknown_assets(service: tuple[TestClient, ServiceSettings, str, str],
                                       analysed: tuple[str, dict[str, Any], float], media_dir: Path,
                                       tmp_path: Path) -> None:
    from service_helpers import speech

    c, _, mine, other = service
    asset, _, _ = analysed
    # Another key's asset is as unknown as a made-up id (even once analysed and cached).
    assert_error(c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(other)), 404, field="asset_id")
    assert_error(c.get("/api/v1/assets/00000000-0000-4000-8000-000000000000/analysis", headers=_auth(mine)), 404)
    assert_error(c.get("/api/v1/assets/..%2F..%2Fservice.db/analysis", headers=_auth(mine)), 404)
    assert_error(c.get(f"/api/v1/assets/{asset}/analysis"), 401)
    audio = _upload(c, mine, speech(media_dir, tmp_path / "s.wav", 1.0), kind="audio")
    assert_error(c.get(f"/api/v1/assets/{audio}/analysis", headers=_auth(mine)), 422, "audio", field="asset_id")


def test_too_long_is_refused_before_any_work(service: tuple[TestClient, ServiceSettings, str, str],
                                             media_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentdub.service import analysis

    c, settings, mine, _ = service
    asset = _upload(c, mine, media_dir / LEFT)  # 5.04 s; this service's limit is 4.5 s
    ran: list[int] = []
    monkeypatch.setattr(analysis, "faces_and_speakers", lambda *a, **k: ran.append(1))
    err = assert_error(c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(mine)), 422, "5.0 s", "4.5 s")
    assert err["code"] == "too_long_for_analysis"
    assert not ran and not (settings.data_dir / "analysis" / f"{asset}.json").exists()


def test_busy_answers_503_and_one_asset_runs_once(tmp_path: Path, clip: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot: a second asset while one runs is a 503 with Retry-After; a second request
    for the running asset waits for it and shares its one run."""
    from latentdub.service import analysis

    settings = ServiceSettings(data_dir=tmp_path / "data", analysis_concurrency=1)
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(path: Path, *, asset_id: str, **kwargs: Any) -> dict[str, Any]:
        calls.append(asset_id)
        started.set()
        assert release.wait(30)
        return {"version": analysis.CACHE_VERSION, "asset_id": asset_id, "sha256": kwargs["sha256"],
                "analysis_s": 0.0}  # fmt: skip

    monkeypatch.setattr(analysis, "analyze_video_asset", slow)
    app = create_app(settings)
    with TestClient(app) as c:
        key, _ = create_key(app.state.store.engine, "k")
        a, b = _upload(c, key, clip), _upload(c, key, clip)
        answers: dict[str, Any] = {}

        def get(name: str, asset: str) -> None:
            answers[name] = c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(key))

        first = threading.Thread(target=get, args=("first", a))
        first.start()
        assert started.wait(30)
        same = threading.Thread(target=get, args=("same", a))
        same.start()
        time.sleep(0.3)  # the second request for `a` is now waiting on the first
        err = assert_error(c.get(f"/api/v1/assets/{b}/analysis", headers=_auth(key)), 503)
        assert err["code"] == "busy"
        busy = c.get(f"/api/v1/assets/{b}/analysis", headers=_auth(key))
        assert int(busy.headers["retry-after"]) > 0
        release.set()
        first.join(30)
        same.join(30)
        assert answers["first"].status_code == answers["same"].status_code == 200
        assert answers["first"].json() == answers["same"].json()
        assert calls == [a]
        # The slot is free again.
        assert c.get(f"/api/v1/assets/{b}/analysis", headers=_auth(key)).status_code == 200
        assert calls == [a, b]


def test_a_video_without_audio_gets_faces_and_nobody_speaking(
    service: tuple[TestClient, ServiceSettings, str, str], media_dir: Path
) -> None:
    c, _, mine, _ = service
    asset = _upload(c, mine, media_dir / "liveportrait_d0_greenscreen_25fps_noaudio.mp4")  # 3.1 s, one face
    r = c.get(f"/api/v1/assets/{asset}/analysis", headers=_auth(mine))
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["tracks"]) == 1 and all(len(f["faces"]) == 1 for f in data["frames"])
    speakers = data["speakers"]
    # Either no timeline with the reason, or one where nobody speaks: never a made-up speaker.
    if speakers is None:
        assert data["speakers_error"]
    else:
        assert all(s["track"] is None for s in speakers["segments"])
        assert speakers["segments"][-1]["stop_frame"] == data["video"]["frames"]
