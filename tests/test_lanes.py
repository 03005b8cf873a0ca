"""Where the dub goes: face=auto, silence handling and crossfades (latentdub.lanes), proved with
a fake generator that paints each dubbed mouth a flat colour.

The clip is a side-by-side composite of two real talking heads whose audio is known: the left
person's own speech, then a pause in both tracks, then the right person's own speech. The
speaker decision is given (the truth), so these tests are about the plumbing — which face gets
painted on which frame, which frames stay bit for bit the original — not about the detector's
accuracy (tests/test_speakers.py measures that). Frames are compared before encoding, through
a frame filter, against the decoded original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cli_helpers import TEST_CONSENT
from latentdub import lanes as lanes_module
from latentdub.face import analyze_video
from latentdub.face.paste import CropsToPaste
from latentdub.hooks import FrameInfo
from latentdub.media.audio_io import AudioClip, load_audio
from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.pipeline import LipSyncPipeline
from latentdub.render import FADE_FRAMES, RenderJob, Window

FPS = 25
SR = 16000
SECONDS = 3.0
LEFT_UNTIL, PAUSE_UNTIL = 1.2, 1.8  # left speaks, both pause, right speaks
DUB_QUIET_FROM = 2.4  # the dub falls silent while the right person still speaks in the original
PAINT = [(255, 0, 255), (0, 255, 0)]  # per lane


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(tiny_weights, version="1.5", device="cpu", dtype="fp32")


@dataclass
class Composite:
    video: Path
    frames: list[np.ndarray]
    left_track: int
    right_track: int
    analysis: Any


@pytest.fixture(scope="module")
def composite(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Composite:
    folder = tmp_path_factory.mktemp("lanes")
    sources = [media_dir / "retalking_face2_man_25fps.mp4", media_dir / "retalking_face3_woman_25fps.mp4"]
    n = round(SECONDS * FPS)
    sides = []
    for src in sources:
        images = [f.image for f in iter_frames(src, stop=n)]
        sides.append([cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA) for im in images])
    frames = [np.hstack([a, b]) for a, b in zip(*sides, strict=True)]
    waves = [load_audio(s).to_mono_16k() for s in sources]
    audio = np.zeros(round(SECONDS * SR), np.float32)
    audio[: round(LEFT_UNTIL * SR)] = waves[0][: round(LEFT_UNTIL * SR)]
    audio[round(PAUSE_UNTIL * SR) :] = waves[1][round(PAUSE_UNTIL * SR) : round(SECONDS * SR)]
    video = folder / "two_faces.mp4"
    with VideoWriter(video, width=512, height=256, time_base=Fraction(1, FPS), fps=FPS, crf=16,
                     audio=AudioClip(audio, SR)) as w:
        for i, im in enumerate(frames):
            w.write(im, pts=i)
    decoded = [f.image for f in iter_frames(video)]
    analysis = analyze_video(video)
    sides_of = {}
    for t in analysis.tracks:
        sel = analysis.obs_track == t.id
        sides_of[t.id] = float((analysis.obs_bbox[sel, 0] + analysis.obs_bbox[sel, 2]).mean() / 2)
    if len(sides_of) != 2:
        pytest.skip(f"expected one track per face in the composite, found {sorted(sides_of)}")
    left, right = sorted(sides_of, key=lambda t: sides_of[t])
    return Composite(video, decoded, left, right, analysis)


def dub_audio(media_dir: Path, folder: Path) -> Path:
    """Real speech with a quiet pause (noise at -55 dB, not digital zeros) over the original's
    pause, and quiet again from DUB_QUIET_FROM on."""
    speech = load_audio(media_dir / "audio_latentsync_demo1_16k.wav").to_mono_16k()[round(0.5 * SR) :]
    wave = speech[: round(SECONDS * SR)].copy()
    rng = np.random.default_rng(0)
    for a, b in ((LEFT_UNTIL, PAUSE_UNTIL), (DUB_QUIET_FROM, SECONDS)):
        part = slice(round(a * SR), round(b * SR))
        wave[part] = (0.0018 * rng.standard_normal(part.stop - part.start)).astype(np.float32)
    path = folder / "dub.wav"
    import soundfile as sf

    sf.write(str(path), wave, SR)
    return path


@dataclass
class Truth:
    """A SpeakerTimeline stand-in: the known speaker per frame."""

    track: np.ndarray
    track_ids: list[int]
    method: str = "truth"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "tracks": {}}


class PaintMouths:
    """A fake generator stage: every dubbed lane's mouth area painted flat, per lane colour."""

    def __init__(self, job: RenderJob, tokens: Any) -> None:
        from latentdub.acceleration import Acceleration

        self.job, self.tokens = job, tokens
        self.accel = Acceleration.reference()
        self.batch = 1
        self.lanes_seen: list[tuple[int, ...]] = []

    def __call__(self, windows: list[Window], check: Any) -> list[Any]:
        out = []
        for w in windows:
            self.lanes_seen.append(w.lanes)
            parts = []
            for n, lane in enumerate(w.lanes):
                crops = w.crops[n].copy()
                res = crops.shape[1]
                crops[:, res * 5 // 8 : res * 7 // 8, res * 3 // 8 : res * 5 // 8] = PAINT[lane]
                matrices = self.job.lanes[lane].matrices[self.job.timeline.source_index[w.start : w.stop]]
                parts.append(CropsToPaste(crops, matrices))
            out.append(self.job.layered(w, parts))
        return out


def run_dub(pipe: LipSyncPipeline, comp: Composite, audio: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
            truth: np.ndarray, speaking: np.ndarray | None = None, **options: Any
            ) -> tuple[Any, list[np.ndarray], PaintMouths]:
    stages: list[PaintMouths] = []

    def fake_stage(job: RenderJob, tokens: Any, opts: Any) -> PaintMouths:
        stages.append(PaintMouths(job, tokens))
        return stages[-1]

    monkeypatch.setattr(pipe, "diffusion_stage", fake_stage)
    monkeypatch.setattr(pipe, "analyze_faces", lambda inputs, run: comp.analysis)
    speakers = Truth(truth, [comp.left_track, comp.right_track])
    if speaking is not None:
        speakers.speaking = speaking  # type: ignore[attr-defined]
    monkeypatch.setattr(lanes_module, "_speaker_timeline", lambda analysis, audio, syncnet=None: speakers)
    seen: list[np.ndarray] = []

    def keep(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        seen.append(frame.copy())
        return frame

    result = pipe(comp.video, audio, out, consent=TEST_CONSENT, watermark=False, frame_filters=[keep], **options)
    return result, seen, stages[0]


def truth_track(comp: Composite) -> np.ndarray:
    times = np.arange(len(comp.frames)) / FPS
    return np.where(times < LEFT_UNTIL, comp.left_track,
                    np.where(times >= PAUSE_UNTIL, comp.right_track, -1)).astype(np.int32)


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    return bool((a != b).any())


def test_auto_dubs_only_the_speaking_face_and_silence_passes_the_original_through(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = dub_audio(media_dir, tmp_path)
    result, frames, stage = run_dub(pipe, composite, audio, tmp_path / "out.mp4", monkeypatch, truth_track(composite))
    orig = composite.frames
    assert len(frames) == len(orig) == 75
    band = 0.3  # VAD edges (measured ≤ 0.18 s) and the crossfades stay inside this band
    times = np.arange(75) / FPS
    left_only = times < LEFT_UNTIL - band
    pause = (times > LEFT_UNTIL + band) & (times < PAUSE_UNTIL - band)
    right_speaks = (times > PAUSE_UNTIL + band) & (times < DUB_QUIET_FROM - band)
    right_quiet_dub = times > DUB_QUIET_FROM + band
    for k in np.flatnonzero(left_only):
        assert changed(frames[k][:, :256], orig[k][:, :256]), f"frame {k}: the left face was not dubbed"
        assert not changed(frames[k][:, 256:], orig[k][:, 256:]), f"frame {k}: the silent right face changed"
    for k in np.flatnonzero(pause):  # dub and original both silent: the original, bit for bit
        assert not changed(frames[k], orig[k]), f"frame {k}: changed in a pause of both tracks"
    for k in np.flatnonzero(right_speaks | right_quiet_dub):
        # right_quiet_dub: the original face talks, the dub is silent → generated (from silence)
        assert changed(frames[k][:, 256:], orig[k][:, 256:]), f"frame {k}: the right face was not dubbed"
        assert not changed(frames[k][:, :256], orig[k][:, :256]), f"frame {k}: the silent left face changed"
    # The painted colour is the lane's: one face per lane here (nobody speaks at once).
    assert all(len(lanes) <= 1 for lanes in stage.lanes_seen)
    # The result says it: both tracks, with their ranges, and the silence handling.
    tracks = {t["track"]: t for t in result.tracks}
    assert set(tracks) == {composite.left_track, composite.right_track}
    left_end = max(r["end_s"] for r in tracks[composite.left_track]["dubbed_ranges"])
    right_start = min(r["start_s"] for r in tracks[composite.right_track]["dubbed_ranges"])
    assert abs(left_end - LEFT_UNTIL) <= band and abs(right_start - PAUSE_UNTIL) <= band
    passed = [r for r in result.passthrough_ranges if r["reason"] == "dub and original silent"]
    assert len(passed) == 1 and abs(passed[0]["start_s"] - LEFT_UNTIL) <= band
    assert result.silence is not None and result.silence["crossfade_frames"] == FADE_FRAMES
    generated = result.silence["generated_from_silence_ranges"]
    assert any(r["start_s"] <= DUB_QUIET_FROM + band and r["end_s"] >= SECONDS - 0.05 for r in generated)


def test_the_pause_is_crossfaded_over_three_frames(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = dub_audio(media_dir, tmp_path)
    result, frames, _ = run_dub(pipe, composite, audio, tmp_path / "out.mp4", monkeypatch, truth_track(composite))
    passed = next(r for r in result.passthrough_ranges if r["reason"] == "dub and original silent")
    first_untouched = passed["start_frame"]
    # The last dubbed frames before the pause: the paint fades out (weights 3/4, 2/4, 1/4).
    x0, x1 = 0, 256  # the left face speaks before the pause
    depth = []
    for k in range(first_untouched - FADE_FRAMES - 1, first_untouched):
        diff = np.abs(frames[k][:, x0:x1].astype(int) - composite.frames[k][:, x0:x1]).max()
        depth.append(int(diff))
    assert depth[0] > depth[1] > depth[2] > depth[3] > 0, depth  # full, then fading
    assert not changed(frames[first_untouched], composite.frames[first_untouched])


def test_silence_generate_dubs_every_frame_of_the_speaker_as_before(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = dub_audio(media_dir, tmp_path)
    result, frames, _ = run_dub(pipe, composite, audio, tmp_path / "out.mp4", monkeypatch,
                                truth_track(composite), silence="generate")
    assert result.dubbed_frames == 75 and result.passthrough_ranges == []
    assert all(changed(f, o) for f, o in zip(frames, composite.frames, strict=True))


def test_overlapping_speakers_dub_both_faces_in_one_frame(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two people speaking at once: a second lane; both mouths painted, each its own colour."""
    truth = truth_track(composite)
    both = np.zeros((75, 2), bool)
    both[:, 0] = truth == composite.left_track
    both[:, 1] = truth == composite.right_track
    both[10:25, 1] = True  # the right person talks over the left one here

    audio = dub_audio(media_dir, tmp_path)
    _, frames, stage = run_dub(pipe, composite, audio, tmp_path / "out.mp4", monkeypatch, truth, both,
                               silence="generate")
    assert (0, 1) in stage.lanes_seen
    for k in range(12, 23):
        assert changed(frames[k][:, :256], composite.frames[k][:, :256])
        assert changed(frames[k][:, 256:], composite.frames[k][:, 256:])
    for k in range(26, 30):  # only the left person speaks here (before the pause at 1.2 s)
        assert not changed(frames[k][:, 256:], composite.frames[k][:, 256:])


def test_a_one_face_clip_dubs_under_auto_exactly_as_under_largest(
    pipe: LipSyncPipeline, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real (tiny) model: face=auto on a one-face clip is the largest-face dub bit for bit,
    and it never runs the speaker pass (nothing to decide)."""
    import soundfile as sf

    from latentdub.media.reader import probe_video

    src = media_dir / "liveportrait_d20_man_25fps.mp4"
    video = tmp_path / "one_face.mp4"
    info = probe_video(src)
    with VideoWriter(video, width=info.width, height=info.height, time_base=Fraction(1, FPS), fps=FPS, crf=12) as w:
        for i, f in enumerate(iter_frames(src, stop=20)):
            w.write(f.image, pts=i)
    speech = load_audio(media_dir / "audio_latentsync_demo1_16k.wav").to_mono_16k()
    sf.write(str(tmp_path / "a.wav"), speech[SR : SR + round(0.8 * SR)], SR)

    def no_speaker_pass(*args: Any) -> Any:
        raise AssertionError("the speaker pass ran on a one-face clip")

    monkeypatch.setattr(lanes_module, "_speaker_timeline", no_speaker_pass)
    outputs = {}
    for face in ("auto", "largest"):
        frames: list[np.ndarray] = []
        pipe(video, tmp_path / "a.wav", tmp_path / f"{face}.mp4", consent=TEST_CONSENT, steps=2, face=face,
             silence="generate", watermark=False, frame_filters=[lambda f, i, keep=frames: keep.append(f.copy()) or f])
        outputs[face] = frames
    assert len(outputs["auto"]) == len(outputs["largest"]) == 20
    for a, b in zip(outputs["auto"], outputs["largest"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_segments_pick_the_face_and_the_audio_whoever_speaks(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit segment overrides the speaker decision: the right face is dubbed over the
    first second (where the left one speaks in the original) with its own audio file."""
    import soundfile as sf

    audio = dub_audio(media_dir, tmp_path)
    own = load_audio(media_dir / "audio_latentsync_demo1_16k.wav").to_mono_16k()[3 * SR : 5 * SR]
    sf.write(str(tmp_path / "right.wav"), own, SR)
    segments = [
        {"start": 0.0, "end": 1.0, "face": f"track:{composite.right_track}", "audio": str(tmp_path / "right.wav")},
        {"start": 2.0, "end": 2.4, "face": f"track:{composite.left_track}"},
    ]
    result, frames, stage = run_dub(pipe, composite, audio, tmp_path / "out.mp4", monkeypatch,
                                    truth_track(composite), segments=segments, silence="generate")
    orig = composite.frames
    for k in range(0, 25):  # segment 1: the right face only, though the left one speaks there
        assert changed(frames[k][:, 256:], orig[k][:, 256:]) and not changed(frames[k][:, :256], orig[k][:, :256])
    for k in range(50, 60):  # segment 2: the left face only, though the right one speaks there
        assert changed(frames[k][:, :256], orig[k][:, :256]) and not changed(frames[k][:, 256:], orig[k][:, 256:])
    for k in range(27, 30):  # outside any segment: the speaker decision (left speaks)
        assert changed(frames[k][:, :256], orig[k][:, :256]) and not changed(frames[k][:, 256:], orig[k][:, 256:])
    assert len(stage.tokens) == 2  # the dub, and the segment's own file
    lane = next(i for i, ln in enumerate(stage.job.lanes) if ln.audio is not None)
    assert stage.job.lanes[lane].audio_at(0) == 1 and stage.job.lanes[lane].dub[:25].all()
    # The segment's own speech is heard in the output: mixed in over its second only.
    assert any("mixed into the output" in w for w in result.warnings)
    heard = load_audio(tmp_path / "out.mp4").to_mono_16k()
    given = load_audio(audio).to_mono_16k()
    inside = np.abs(heard[2000:14000] - given[2000:14000]).mean()
    outside = np.abs(heard[20000:40000] - given[20000:40000]).mean()
    assert inside > 5 * outside, (inside, outside)
    by = {t["track"]: t["chosen_by"] for t in result.tracks}
    assert by[composite.right_track].get("segment 1") == 25 and by[composite.left_track].get("segment 2") == 10
    assert "segment 1" not in by[composite.left_track]


def test_the_syncnet_path_is_plumbed_through_the_dub_and_a_random_one_is_not_picked(
    pipe: LipSyncPipeline, composite: Composite, media_dir: Path, tmp_path: Path, tiny_weights: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a SyncNet set, who speaks is scored by it (method syncnet). The tiny one is random:
    this proves the plumbing only; its accuracy needs the real syncnet_v2.model. A random file
    found beside the weights is never used on its own (landmarks decide instead)."""
    from latentdub.weights.syncnet import load_syncnet

    assert (tiny_weights / "auxiliary" / "syncnet_v2.model").is_file()
    assert pipe.speaker_syncnet_file is None  # the tiny folder's SyncNet is random
    monkeypatch.setattr(pipe, "speaker_syncnet", load_syncnet(tiny_weights / "auxiliary" / "syncnet_v2.model"))
    stages: list[PaintMouths] = []
    monkeypatch.setattr(pipe, "diffusion_stage", lambda job, tokens, opts: stages.append(PaintMouths(job, tokens)) or stages[-1])
    monkeypatch.setattr(pipe, "analyze_faces", lambda inputs, run: composite.analysis)
    result = pipe(composite.video, dub_audio(media_dir, tmp_path), tmp_path / "out.mp4", consent=TEST_CONSENT,
                  watermark=False)
    assert result.speakers is not None and result.speakers["method"] == "syncnet"
    assert result.frames == 75 and stages and stages[0].job.lanes
