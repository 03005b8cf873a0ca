"""The library contract, exactly as external checks use it, on real media with a tiny random model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from cli_helpers import TEST_CONSENT
from latentdub import Cancelled, DubOptions, LipSyncPipeline
from latentdub.errors import InputError
from latentdub.media.reader import iter_frames
from latentdub.options import OptionError
from latentdub.progress import STAGES, ProgressEvent
from latentdub.provenance.consent import ConsentError
from latentdub.render import FrameInfo


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(tiny_weights, device="cpu")


def speech(media_dir: Path, dst: Path, seconds: float) -> Path:
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(dst), data[: int(seconds * rate)], rate)
    return dst


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial" in p.name]


# -- options ----------------------------------------------------------------------------------
def test_options_are_validated_once_and_errors_name_the_field() -> None:
    with pytest.raises(InputError, match="steps"):
        DubOptions(steps=0)
    with pytest.raises(OptionError) as err:
        DubOptions.from_dict({"bogus": 1})
    assert err.value.field == "bogus" and "bogus" in str(err.value) and "steps" in str(err.value)
    with pytest.raises(OptionError, match="length_policy"):
        DubOptions(length_policy="bounce")
    with pytest.raises(OptionError, match="face"):
        DubOptions(face="somewhere")
    with pytest.raises(OptionError, match="guidance"):
        DubOptions(guidance=float("nan"))
    with pytest.raises(OptionError, match="steps must be a whole number"):
        DubOptions(steps=2.5)  # type: ignore[arg-type]
    # No CLI vocabulary in library errors.
    with pytest.raises(OptionError) as err:
        DubOptions(crf=99)
    assert "--" not in str(err.value) and "crf must be at most 51" in str(err.value)


def test_options_round_trip_and_overrides_go_through_the_same_validation() -> None:
    opts = DubOptions(steps=7, face="track:2", fit="stretch")
    data = opts.to_dict()
    assert data["steps"] == 7 and data["face"] == "track:2" and set(data) == set(DubOptions.model_fields)
    assert DubOptions.from_dict(data) == opts
    assert DubOptions.resolve(opts, {"seed": 3}).seed == 3
    assert DubOptions.resolve(None, {}) == DubOptions()
    with pytest.raises(OptionError, match="crf"):
        DubOptions.resolve(opts, {"crf": -1})
    with pytest.raises(ValidationError):
        opts.steps = 3  # type: ignore[misc]  # frozen: one dub cannot change another's options
    assert all(DubOptions.describe(name) for name in DubOptions.model_fields)


def test_a_bad_override_fails_before_anything_is_read(pipe: LipSyncPipeline, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="steps"):
        pipe(tmp_path / "missing.mp4", tmp_path / "missing.wav", tmp_path / "o.mp4", steps=0, consent=TEST_CONSENT)
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_a_dub_without_consent_before_any_work(
    pipe: LipSyncPipeline, media_dir: Path, tmp_path: Path
) -> None:
    audio = speech(media_dir, tmp_path / "a.wav", 1.0)
    out = tmp_path / "out.mp4"
    events: list[ProgressEvent] = []
    for consent in (None, {"subject": "Jane", "granted_by": "Jane", "method": "form"}):
        with pytest.raises(ConsentError) as err:
            pipe(media_dir / "retalking_face3_woman_25fps.mp4", audio, out, steps=1, consent=consent,
                 progress=events.append)
        for field in ("subject", "granted_by", "method", "evidence"):
            assert field in str(err.value)
    with pytest.raises(ConsentError, match="consent="):
        pipe(media_dir / "retalking_face3_woman_25fps.mp4", audio, out, steps=1)
    assert events == [] and not out.exists() and no_partials(tmp_path)


# -- the contract -----------------------------------------------------------------------------
def test_filters_see_every_output_frame_and_finalizers_fill_provenance(
    pipe: LipSyncPipeline, media_dir: Path, tmp_path: Path
) -> None:
    video = media_dir / "retalking_face2_man_25fps.mp4"
    audio = speech(media_dir, tmp_path / "a.wav", 1.2)
    out = tmp_path / "out.mp4"
    calls: list[FrameInfo] = []
    events: list[ProgressEvent] = []

    def white_square(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        calls.append(info)
        frame = frame.copy()
        frame[:64, :64] = 255
        return frame

    def sign(path: Path) -> dict[str, object]:
        assert path.exists() and path != out and not out.exists()
        return {"signed_bytes": path.stat().st_size}

    # silence=generate: the speech starts with a pause, and this test counts dubbed frames.
    result = pipe(video, audio, out, DubOptions(steps=2, silence="generate"), consent=TEST_CONSENT,
                  progress=events.append, cancel=threading.Event(), frame_filters=[white_square], finalizers=[sign])
    frames = [f.image for f in iter_frames(out)]
    assert len(calls) == len(frames) == result.frames == 30
    assert [c.index for c in calls] == list(range(30))
    for frame in frames:
        assert frame[8:56, 8:56].min() >= 235
    assert result.provenance["signed_bytes"] > 0
    assert result.dubbed_frames == 30 and all(c.dubbed and c.matrix is not None for c in calls)
    assert result.options["steps"] == 2
    # The clip is longer than the 1.2 s dub: the cut is said, with the policy, not done silently.
    cut = [w for w in result.warnings if w.startswith("the picture was cut from")]
    assert len(cut) == 1 and "to 1.20 s" in cut[0] and "'pingpong'" in cut[0]
    assert result.model["random_weights"] is True and "random" in result.model["name"].lower()
    # Every stage reported, in order, each ending with done == total; done never goes back.
    order = [e.stage for e in events]
    assert [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s] == list(STAGES)
    for stage in STAGES:
        mine = [e for e in events if e.stage == stage]
        assert [e.done for e in mine] == sorted(e.done for e in mine)
        assert mine[-1].done == mine[-1].total
    assert [e for e in events if e.stage == "dub"][-1].total == 30
    assert no_partials(tmp_path)


def test_cancel_from_the_first_dub_event_stops_a_10s_clip_within_2s(
    pipe: LipSyncPipeline, media_dir: Path, tmp_path: Path
) -> None:
    video = media_dir / "infinitetalk_hdtf_man_25fps.mp4"  # 15 s of video
    audio = speech(media_dir, tmp_path / "a.wav", 10.0)
    out = tmp_path / "out.mp4"
    event = threading.Event()
    set_at: list[float] = []

    def on_progress(e: ProgressEvent) -> None:
        if e.stage == "dub" and not event.is_set():
            event.set()
            set_at.append(time.perf_counter())

    with pytest.raises(Cancelled):
        pipe(video, audio, out, DubOptions(steps=20), consent=TEST_CONSENT, progress=on_progress, cancel=event)
    elapsed = time.perf_counter() - set_at[0]
    assert elapsed < 2.0, elapsed
    assert not out.exists() and no_partials(tmp_path)


def test_cancel_during_face_analysis_stops_before_anything_is_written(
    pipe: LipSyncPipeline, media_dir: Path, tmp_path: Path
) -> None:
    event = threading.Event()
    stages: list[str] = []

    def on_progress(e: ProgressEvent) -> None:
        stages.append(e.stage)
        if e.stage == "faces" and e.done >= 10:
            event.set()

    with pytest.raises(Cancelled):
        pipe(media_dir / "infinitetalk_hdtf_man_25fps.mp4", speech(media_dir, tmp_path / "a.wav", 3.0),
             tmp_path / "out.mp4", consent=TEST_CONSENT, progress=on_progress, cancel=event)
    assert "dub" not in stages and not (tmp_path / "out.mp4").exists() and no_partials(tmp_path)
