"""Faces and speakers of an uploaded video, for the web page to show before a dub starts.

``GET /api/v1/assets/{id}/analysis`` (route in :mod:`.routes`) answers with the JSON built by
:func:`analyze_video_asset`: the video's size, rate and length, every face track (id, span,
mean size, its box on each thumbnail frame and the ``face`` option value that pins it), the
speaker timeline as runs (one per stretch of one speaker or of nobody) and ~8 evenly spaced
JPEG thumbnails, embedded as base64.

Why embedded thumbnails: the API needs ``Authorization: Bearer``, which an ``<img src>`` cannot
send, so separate thumbnail URLs would cost the page one fetch + object URL each; embedded, the
boxes and the pictures they are drawn on come from one cached answer (8 small JPEGs, ~10-20 kB
each), in one request.

Cost: the analysis runs MediaPipe over every frame, so it is bounded. It runs at most once per
asset (the JSON is cached in ``data_dir/analysis/<asset id>.json``, a name the service makes
from the asset's UUID, checked against the asset's SHA-256); concurrent requests for one asset
share one run; videos longer than ``settings.analysis_max_s`` are refused (422); at most
``settings.analysis_concurrency`` analyses run at once per serving process (more: 503 with
``Retry-After``); the work runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import numpy as np
from fastapi import Depends, Request

from latentdub.errors import InputError
from latentdub.files import atomic_write
from latentdub.runs import runs
from latentdub.service.settings import ServiceSettings

if TYPE_CHECKING:
    from latentdub.face.analysis import FaceAnalysis
    from latentdub.face.speakers import SpeakerTimeline
    from latentdub.service.models import Asset

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
CACHE_VERSION = 1  # bump when the JSON changes: older cache files are then recomputed
THUMBNAILS = 8
THUMB_HEIGHT = 180  # px; enough to recognise a face in a strip of eight
JPEG_QUALITY = 80
FACE_OPTION = "face"  # the dub option that a pinned track sets (DubOptions.face)
RETRY_AFTER_S = 5


class AnalysisRefused(Exception):
    """An analysis that will not run now: HTTP ``status``, error ``code``, a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        super().__init__(message)


# -- the work (blocking; runs in a worker thread) ----------------------------------------------
def faces_and_speakers(path: Path, *, workers: int | None) -> tuple[FaceAnalysis, SpeakerTimeline | None, str | None]:
    """Pass 1 and the active-speaker timeline of ``path``: ``(analysis, timeline, why_no_timeline)``.

    The one place that knows how the library gets there: with ``speaker_timeline`` (pass 1
    records lip apertures itself) one pass does both; without it, ``analyze_speakers`` runs
    pass 1 with the landmarks kept. A video with no usable audio gets faces and no timeline.
    """
    from latentdub.face import analyze_video, speakers

    timeline_of = getattr(speakers, "speaker_timeline", None)
    if timeline_of is not None:
        analysis = analyze_video(path, workers=workers)
        try:
            return analysis, timeline_of(analysis, audio=None), None
        except (InputError, ValueError) as err:
            return analysis, None, str(err)
    from latentdub.face.backend import MediaPipeBackend

    with MediaPipeBackend(keep_landmarks=True) as backend:
        analysis = analyze_video(path, backend=backend, workers=workers)
    try:
        return analysis, speakers.detect_speakers(analysis), None
    except (InputError, ValueError) as err:
        return analysis, None, str(err)


def _thumbnail_frames(num_frames: int, count: int = THUMBNAILS) -> list[int]:
    """``count`` frame indices spread evenly, each in the middle of its slice of the video."""
    count = max(1, min(count, num_frames))
    return sorted({min(num_frames - 1, int((k + 0.5) * num_frames / count)) for k in range(count)})


def _jpeg(image: np.ndarray) -> tuple[str, int, int]:
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, THUMB_HEIGHT / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding of a thumbnail failed")
    return base64.b64encode(data.tobytes()).decode("ascii"), size[0], size[1]


def _box(values: np.ndarray) -> list[float] | None:
    return [round(float(v), 1) for v in values] if np.all(np.isfinite(values)) else None


def _speaker_runs(timeline: SpeakerTimeline, analysis: FaceAnalysis) -> list[dict[str, Any]]:
    """The timeline as runs of one speaker (``track`` null: nobody), split at scene cuts."""
    times = np.asarray(analysis.times_s, dtype=np.float64)
    n = len(timeline.track)
    shots = analysis.shot_ids()[:n]
    end_s = float(times[0]) + analysis.duration_s
    out = []
    for a, b, tid in runs(np.asarray(timeline.track), shots):
        out.append({
            "track": None if tid < 0 else int(tid),
            "start_frame": a,
            "stop_frame": b,
            "start_s": round(float(times[a]), 3),
            "end_s": round(float(times[b]) if b < n else end_s, 3),
            "confidence": round(float(np.mean(timeline.confidence[a:b])), 3),
        })  # fmt: skip
    return out


def analyze_video_asset(
    path: Path, *, asset_id: str, sha256: str, pin_default: str | None, workers: int | None
) -> dict[str, Any]:
    """The analysis JSON of the video at ``path`` (see the module docstring). No server path in it."""
    from latentdub.media.frame_source import FrameSource

    started = time.monotonic()
    analysis, timeline, no_timeline = faces_and_speakers(path, workers=workers)
    picks = _thumbnail_frames(analysis.num_frames)
    tracks = {t.id: analysis.track(t.id) for t in analysis.tracks}
    frames = []
    with FrameSource(path, analysis.pts, rotation=analysis.info.rotation) as source:
        for index in picks:
            jpeg, w, h = _jpeg(source.get(index))
            faces = [
                {"track": tid, "box": box}
                for tid, td in tracks.items()
                if td.is_present(index) and (box := _box(td.at(index))) is not None
            ]
            frames.append({"index": index, "time_s": round(float(analysis.times_s[index]), 3),
                           "width": w, "height": h, "jpeg": jpeg, "faces": faces})  # fmt: skip
    times = analysis.times_s
    speakers = None
    if timeline is not None:
        speakers = {"method": timeline.method, "track_ids": [int(t) for t in timeline.track_ids],
                    "segments": _speaker_runs(timeline, analysis)}  # fmt: skip
    return {
        "version": CACHE_VERSION,
        "asset_id": asset_id,
        "sha256": sha256,
        "video": {
            "width": analysis.width,
            "height": analysis.height,
            "fps": round(analysis.fps, 4),
            "duration_s": round(analysis.duration_s, 4),
            "frames": analysis.num_frames,
        },
        # Which dub option pins a face, and its value for "whoever speaks": the page is told,
        # so it never names an option itself. None: the options model has no such field.
        "pin": None if pin_default is None else {"option": FACE_OPTION, "default": pin_default},
        "tracks": [
            {
                "id": t.id,
                "first_frame": t.first_frame,
                "last_frame": t.last_frame,
                "first_s": round(float(times[t.first_frame]), 3),
                "last_s": round(float(times[t.last_frame]), 3),
                "mean_size": round(t.mean_size, 1),
                "coverage": round(t.coverage, 4),
                "pin": f"track:{t.id}",
                "boxes": [_box(tracks[t.id].at(i)) if tracks[t.id].is_present(i) else None for i in picks],
            }
            for t in analysis.tracks
        ],
        "frames": frames,
        "speakers": speakers,
        "speakers_error": _clean(no_timeline, path),
        "analysis_s": round(time.monotonic() - started, 2),
    }


def _clean(message: str | None, path: Path) -> str | None:
    """A library message without the server's storage path."""
    if message is None:
        return None
    return message.replace(str(path), "the video").replace(path.name, "the video")


# -- the cache and the limits ------------------------------------------------------------------
def cache_file(settings: ServiceSettings, asset_id: str) -> Path:
    """``data_dir/analysis/<uuid>.json``: the name is the asset id re-made as a UUID, never client text."""
    return settings.data_dir / ANALYSIS_DIR / f"{uuid.UUID(asset_id)}.json"


def read_cached(settings: ServiceSettings, asset: Asset) -> dict[str, Any] | None:
    try:
        data = json.loads(cache_file(settings, asset.id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and data.get("sha256") == asset.sha256
    return data if ok else None


def write_cached(settings: ServiceSettings, asset: Asset, data: dict[str, Any]) -> None:
    path = cache_file(settings, asset.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, separators=(",", ":")), fsync=False)  # a cache: loss costs a rerun


def remove_cached(settings: ServiceSettings, asset_id: str) -> int:
    """Delete the asset's cached analysis (gone with its asset); the bytes freed, 0 if none.
    One written after this (an analysis that was running) is left to the orphan sweep."""
    try:
        path = cache_file(settings, asset_id)
        size = path.stat().st_size
        path.unlink()
    except (OSError, ValueError):
        return 0
    return size


def _check_length(path: Path, settings: ServiceSettings) -> None:
    from latentdub.media.reader import probe_video

    try:
        duration = probe_video(path).duration_s
    except InputError as err:
        raise AnalysisRefused(422, "bad_video", _clean(str(err), path) or "") from None
    if duration > settings.analysis_max_s:
        raise AnalysisRefused(
            422, "too_long_for_analysis",
            f"the video is {duration:.1f} s long; faces and speakers are analysed for videos up to "
            f"{settings.analysis_max_s:g} s (the dub itself does not need this analysis)",
        )


class Analyzer:
    """Runs analyses for one serving process: cached, one run per asset, a bounded number at once."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.slots = anyio.CapacityLimiter(settings.analysis_concurrency)
        self._running: dict[str, anyio.Lock] = {}

    async def analysis(self, asset: Asset) -> dict[str, Any]:
        settings = self.settings
        cached = await anyio.to_thread.run_sync(read_cached, settings, asset)
        if cached is not None:
            return cached
        # One run per asset: a second request waits for the first and then reads its cache.
        lock = self._running.setdefault(asset.id, anyio.Lock())
        try:
            async with lock:
                cached = await anyio.to_thread.run_sync(read_cached, settings, asset)
                if cached is not None:
                    return cached
                return await self._run(asset)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._running.pop(asset.id, None)

    async def _run(self, asset: Asset) -> dict[str, Any]:
        settings = self.settings
        path = Path(asset.path)  # chosen by the service when the asset was stored
        await anyio.to_thread.run_sync(_check_length, path, settings)
        try:
            self.slots.acquire_nowait()
        except anyio.WouldBlock:
            raise AnalysisRefused(
                503, "busy",
                f"{settings.analysis_concurrency} face analysis(es) already running on this server; "
                f"try again in a few seconds",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        try:
            fields = settings.options_model.model_fields
            pin_default = str(fields[FACE_OPTION].default) if FACE_OPTION in fields else None
            workers = settings.analysis_workers or None
            try:
                data = await anyio.to_thread.run_sync(
                    lambda: analyze_video_asset(
                        path, asset_id=asset.id, sha256=asset.sha256, pin_default=pin_default, workers=workers
                    )
                )
            except InputError as err:
                raise AnalysisRefused(422, "bad_video", _clean(str(err), path) or "") from None
        finally:
            self.slots.release()
        await anyio.to_thread.run_sync(write_cached, settings, asset, data)
        log.info("analysed asset %s in %.1f s", asset.id, data["analysis_s"])
        return data


async def get_analyzer(request: Request) -> Analyzer:
    """The app's :class:`Analyzer`, made on first use (async: runs on the event loop, so no race)."""
    state = request.app.state
    analyzer = getattr(state, "analyzer", None)
    if analyzer is None:
        analyzer = state.analyzer = Analyzer(state.settings)
    return analyzer


AnalyzerDep = Annotated[Analyzer, Depends(get_analyzer)]

__all__ = ["AnalysisRefused", "Analyzer", "AnalyzerDep", "analyze_video_asset", "faces_and_speakers"]
