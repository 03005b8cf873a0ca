"""SyncNet active-speaker scores (latentdub.evaluation.speakers): the per-window confidence on
embeddings with a known offset, the decision on precomputed scores, and the whole plumbing with
the tiny RANDOM SyncNet (its scores mean nothing: only shapes, NaN where absent and the wiring
into the timeline are checked; accuracy needs the real syncnet_v2.model weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentdub.evaluation.speakers import (
    syncnet_scorer,
    syncnet_scores,
    syncnet_speaker_timeline,
    window_confidence,
)
from latentdub.face.speakers import SYNCNET_DECISION, detect_speakers, speaker_timeline
from test_speakers import FPS, _analysis, _smooth_noise


def test_window_confidence_is_high_only_for_the_synced_embeddings() -> None:
    rng = np.random.default_rng(0)
    w, dim, offset = 60, 16, 3
    audio = rng.standard_normal((w + 10, dim))
    synced = audio[offset : offset + w] + 0.05 * rng.standard_normal((w, dim))  # audio i+3
    unrelated = rng.standard_normal((w, dim))
    good = window_confidence(synced, audio, 0)
    bad = window_confidence(unrelated, audio, 0)
    assert good.shape == bad.shape == (w,)
    assert np.median(good) > 3 * np.median(bad)
    # The same windows seen from a later start are compared with later audio: still in sync.
    later = window_confidence(audio[10 + offset : 10 + offset + 40], audio, 10)
    assert np.median(later) > 3 * np.median(bad)


def test_precomputed_scores_decide_with_the_syncnet_scale() -> None:
    n, switch = 200, 90
    lips = {0: (range(n), _smooth_noise(n, 1)), 1: (range(40, n), _smooth_noise(n - 40, 2))}
    analysis = _analysis(n, lips)
    scores = np.full((n, 2), 1.0)  # "not in sync" level
    scores[:switch, 0] = 6.0
    scores[switch:, 1] = 6.0
    scores[:40, 1] = np.nan  # track 1 absent
    timeline = detect_speakers(analysis, scores=scores)  # no audio needed
    assert timeline.method == "syncnet"
    assert set(timeline.track[: switch - 5]) == {0}
    assert set(timeline.track[switch + 5 :]) == {1}
    assert len(timeline.switch_frames()) == 1
    assert all(iv.method == "syncnet" for ivs in timeline.intervals.values() for iv in ivs)
    # Everything below the nobody level: nobody speaks.
    quiet = detect_speakers(analysis, scores=np.full((n, 2), SYNCNET_DECISION.none_threshold / 2))
    assert (quiet.track == -1).all()


def test_tiny_syncnet_plumbing_on_a_real_clip(media_dir: Path, tmp_path: Path) -> None:
    from latentdub.face.analysis import analyze_video
    from latentdub.media.audio_io import load_audio
    from latentdub.weights.syncnet import load_syncnet, make_tiny_syncnet

    clip = media_dir / "retalking_face3_woman_25fps.mp4"
    analysis = analyze_video(clip, max_frames=40, workers=1)
    audio = load_audio(clip)
    model = load_syncnet(make_tiny_syncnet(tmp_path / "syncnet_v2.model", seed=4))
    scores = syncnet_scores(analysis, audio, model)
    k = len(analysis.tracks)
    assert k >= 1 and scores.shape == (analysis.num_frames, k)
    tid = analysis.tracks[0].id
    present = analysis.track(tid).dense(analysis.num_frames).present
    assert np.isfinite(scores[present, 0]).all() and (scores[present, 0] >= 0).all()
    assert np.isnan(scores[~present, 0]).all()
    timeline = syncnet_speaker_timeline(analysis, audio, model)
    assert timeline.method == "syncnet" and timeline.num_frames == analysis.num_frames
    assert np.array_equal(timeline.scores, scores)
    # The one entry point takes the scorer as a plain callable (face/ never imports evaluation/).
    again = speaker_timeline(analysis, audio, syncnet=syncnet_scorer(model))
    assert np.array_equal(again.track, timeline.track)


def test_no_audio_track_means_nobody_even_with_syncnet() -> None:
    n = 50
    analysis = _analysis(n, {0: (range(n), _smooth_noise(n, 5))}, has_audio=False)

    def never(*_args: object) -> np.ndarray:
        raise AssertionError("a video without audio must not be scored")

    timeline = speaker_timeline(analysis, syncnet=never)
    assert timeline.method == "none" and (timeline.track == -1).all()
    assert timeline.to_dict()["silent"][0]["end_s"] == pytest.approx(n / FPS)
