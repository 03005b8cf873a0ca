"""The render engine (pass 2) driven stage by stage, on a short synthetic video the test makes.

No face detector and no ../shared: the crop geometry is given, so every window is dubbed where
the test says so. A random tiny model (``make-tiny``) does the diffusion.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdub.diffusion import DiffusionStage
from latentdub.errors import Cancelled, HookError
from latentdub.face.paste import CropsToPaste
from latentdub.media.audio_io import AudioClip
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter
from latentdub.options import DubOptions
from latentdub.pipeline import LipSyncPipeline
from latentdub.progress import DubProgress, ProgressEvent
from latentdub.render import (
    FrameInfo,
    FrameReader,
    FrameSink,
    Lane,
    RenderJob,
    Window,
    plan_windows,
    render,
)
from latentdub.timeline import Timeline

SIZE = 320
FPS = 25


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")


def make_video(path: Path, frames: int) -> Path:
    """Moving colour gradients with a frame number stripe: every frame differs."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    with VideoWriter(path, width=SIZE, height=SIZE, time_base=Fraction(1, FPS), fps=FPS, crf=12) as w:
        for k in range(frames):
            img = np.stack([(xx + 3 * k) % 256, (yy + 5 * k) % 256, (xx + yy + k) % 256], -1).astype(np.uint8)
            w.write(img, pts=k)
    return path


@pytest.fixture(scope="module")
def clip40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("render") / "clip40.mp4", 40)


def make_job(pipe: LipSyncPipeline, video: Path, dub: np.ndarray) -> tuple[RenderJob, torch.Tensor, AudioClip]:
    pts = np.array([f.pts for f in iter_frames(video)], dtype=np.int64)
    time_base = probe_video(video).time_base
    n = len(pts)
    res = pipe.resolution
    # A fixed crop: frame px → crop px, scaled so the crop covers the middle of the frame.
    scale = res / 200.0
    matrix = np.array([[scale, 0.0, -60 * scale], [0.0, scale, -60 * scale]])
    timeline = Timeline(
        source_index=np.arange(n), pts=pts - pts[0], time_base=time_base, duration_s=n / FPS, policy="cut"
    )
    rng = np.random.default_rng(0)
    clip = AudioClip((0.1 * rng.standard_normal((n * 16000 // FPS, 1))).astype(np.float32), 16000)
    tokens = pipe.encode_audio(clip.to_mono_16k(), timeline)
    job = RenderJob(
        video=video,
        source_pts=pts,
        rotation=0,
        width=SIZE,
        height=SIZE,
        fps=FPS,
        timeline=timeline,
        lanes=[Lane(np.repeat(matrix[None], n, axis=0), np.repeat(np.array([[60.0, 60.0, 260.0, 260.0]]), n, axis=0),
                    np.asarray(dub, bool))],
        windows=plan_windows(dub),
    )
    return job, tokens, clip


def run_render(
    pipe: LipSyncPipeline,
    job: RenderJob,
    tokens: torch.Tensor,
    clip: AudioClip,
    out: Path,
    *,
    steps: int = 2,
    filters: tuple = (),
    finalizers: tuple = (),
    progress: object = None,
    cancel: object = None,
) -> Path:
    stage = DiffusionStage(pipe.window_diffusion(DubOptions(steps=steps), "reference"), job, tokens)
    run = DubProgress(progress, cancel)  # type: ignore[arg-type]
    writer = VideoWriter(out, width=SIZE, height=SIZE, time_base=job.timeline.time_base, fps=FPS, audio=clip)
    sink = FrameSink(job, writer, frame_filters=filters, progress=run)
    path, _ = render(job, reader=FrameReader(job, pipe.aligner), generate=stage, sink=sink, progress=run,
                     finalizers=finalizers)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# -- planning ---------------------------------------------------------------------------------
def test_windows_break_where_the_face_comes_or_goes_and_never_exceed_16() -> None:
    dub = np.array([True] * 20 + [False] * 3 + [True] * 5)
    spans = [(w.start, w.stop, w.dub) for w in plan_windows(dub)]
    assert [w.lanes for w in plan_windows(dub)] == [(0,), (0,), (), (0,)]
    assert spans == [(0, 16, True), (16, 20, True), (20, 23, False), (23, 28, True)]
    assert plan_windows(np.zeros(0, bool)) == []


# -- the generator stage alone ----------------------------------------------------------------
def test_window_results_do_not_depend_on_order_or_grouping(pipe: LipSyncPipeline, clip40: Path) -> None:
    job, tokens, _ = make_job(pipe, clip40, np.ones(40, bool))
    with FrameReader(job, pipe.aligner) as reader:
        windows = [reader.load(w) for w in job.windows]
    crops = {w.start: w.crops[0] for w in windows}
    generator = pipe.window_diffusion(DubOptions(steps=2))

    def gen(start: int, stop: int) -> np.ndarray:
        return generator(crops[start][: stop - start], tokens[start:stop], start=start)

    forward = {w.start: gen(w.start, w.stop) for w in windows}
    backward = {w.start: gen(w.start, w.stop) for w in reversed(windows)}
    for start in forward:
        np.testing.assert_array_equal(forward[start], backward[start])
    # A different grouping: the same first window again after others ran.
    again = gen(windows[0].start, windows[0].stop)
    np.testing.assert_array_equal(again, forward[windows[0].start])
    # The seed matters, and different windows get different draws.
    other = pipe.window_diffusion(DubOptions(steps=2, seed=7))
    assert not np.array_equal(other(crops[0], tokens[0:16], start=0), forward[0])
    rng_a, rng_b = generator.window_rng(0), generator.window_rng(16)
    assert not torch.equal(torch.randn(8, generator=rng_a), torch.randn(8, generator=rng_b))


def test_full_render_is_pixel_identical_whatever_the_window_grouping(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    """Through the whole engine: windows planned 16-16-8 vs 8-8-8-8-8 change nothing."""
    job, tokens, clip = make_job(pipe, clip40, np.ones(40, bool))
    a = run_render(pipe, job, tokens, clip, tmp_path / "a.mp4")
    # Same windows, but generated in reverse order before the sink writes them in order.
    generator = pipe.window_diffusion(DubOptions(steps=2))
    with FrameReader(job, pipe.aligner) as reader:
        windows = [reader.load(Window(w.start, w.stop, w.lanes)) for w in job.windows]
    matrices = job.lanes[0].matrices
    for w in reversed(windows):
        w.generated = CropsToPaste(generator(w.crops[0], tokens[w.start : w.stop], start=w.start), matrices[w.start : w.stop])
    writer = VideoWriter(tmp_path / "b.mp4", width=SIZE, height=SIZE, time_base=job.timeline.time_base, fps=FPS, audio=clip)
    sink = FrameSink(job, writer)
    for w in windows:
        sink.write(w)
    b, _ = sink.finish()
    frames_a = [f.image for f in iter_frames(a)]
    frames_b = [f.image for f in iter_frames(b)]
    assert len(frames_a) == len(frames_b) == 40
    for fa, fb in zip(frames_a, frames_b, strict=True):
        np.testing.assert_array_equal(fa, fb)


# -- hooks ------------------------------------------------------------------------------------
def test_frame_filters_see_every_frame_once_in_order_and_their_output_is_encoded(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    dub = np.array([True] * 20 + [False] * 6 + [True] * 14)
    job, tokens, clip = make_job(pipe, clip40, dub)
    seen: list[FrameInfo] = []

    def white_square(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        assert frame.dtype == np.uint8 and frame.shape == (SIZE, SIZE, 3)
        seen.append(info)
        frame[10:50, 10:50] = 255
        return frame

    def mark(frame: np.ndarray, info: FrameInfo) -> np.ndarray:  # runs second: sees the square
        assert (frame[10:50, 10:50] == 255).all()
        return frame

    provenance_calls: list[Path] = []
    out = run_render(pipe, job, tokens, clip, tmp_path / "out.mp4", filters=(white_square, mark),
                     finalizers=(provenance_calls.append,))
    frames = [f.image for f in iter_frames(out)]
    assert [i.index for i in seen] == list(range(40)) == list(range(len(frames)))
    assert [i.dubbed for i in seen] == dub.tolist()
    assert all(i.matrix is not None and i.box is not None for i in seen if i.dubbed)
    assert all(i.matrix is None and i.box is None for i in seen if not i.dubbed)
    assert [round(i.time_s, 4) for i in seen[:3]] == [0.0, 0.04, 0.08]
    for f in frames:
        assert f[15:45, 15:45].min() >= 235  # x264 keeps a white square white
    # The finalizer ran once on the temporary file, which then became the output.
    assert len(provenance_calls) == 1 and ".partial-" in provenance_calls[0].name
    assert not provenance_calls[0].exists() and out.exists()


def test_pass_through_frames_are_filtered_on_a_copy(pipe: LipSyncPipeline, clip40: Path, tmp_path: Path) -> None:
    """Ping-pong shows source frames twice; a filter writing in place must not stack up."""
    job, tokens, clip = make_job(pipe, clip40, np.zeros(40, bool))
    n = 40
    index = np.concatenate([np.arange(20), np.arange(19, -1, -1)])  # each frame shown twice
    timeline = Timeline(index, job.timeline.pts, job.timeline.time_base, n / FPS, "pingpong")
    job = RenderJob(**{**job.__dict__, "timeline": timeline, "windows": plan_windows(np.zeros(n, bool))})

    def darken(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        frame //= 2
        return frame

    out = run_render(pipe, job, tokens, clip, tmp_path / "pp.mp4", filters=(darken,))
    frames = [f.image.astype(int) for f in iter_frames(out)]
    for k in range(20):  # frame k and its mirror 39-k show the same source frame, darkened once
        assert np.abs(frames[k] - frames[n - 1 - k]).mean() < 2.0


@pytest.mark.parametrize("where", ["filter", "finalizer", "progress", "bad_return"])
def test_a_failing_hook_fails_the_dub_cleanly(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path, where: str
) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.array([True] * 16 + [False] * 24))

    def bad_filter(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        if info.index == 20:
            raise ValueError("boom")
        return frame

    def bad_finalizer(path: Path) -> None:
        raise OSError("signing key missing")

    def bad_progress(event: ProgressEvent) -> None:
        if event.stage == "dub" and event.done > 0:
            raise RuntimeError("progress sink down")

    kwargs: dict = {
        "filter": {"filters": (bad_filter,)},
        "finalizer": {"finalizers": (bad_finalizer,)},
        "progress": {"progress": bad_progress},
        "bad_return": {"filters": (lambda f, i: f[:10],)},
    }[where]
    out = tmp_path / "out.mp4"
    with pytest.raises(HookError) as err:
        run_render(pipe, job, tokens, clip, out, **kwargs)
    message = str(err.value)
    assert {"filter": "boom", "finalizer": "signing key missing", "progress": "progress sink down",
            "bad_return": "must return the frame"}[where] in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_failing_generator_stops_every_stage_and_leaves_no_file(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    job, _, _ = make_job(pipe, clip40, np.ones(40, bool))
    run = DubProgress()
    writer = VideoWriter(tmp_path / "out.mp4", width=SIZE, height=SIZE, time_base=job.timeline.time_base, fps=FPS)
    sink = FrameSink(job, writer, progress=run)
    calls = []

    def generate(windows: list[Window], check: object) -> list[CropsToPaste]:
        (w,) = windows
        calls.append(w.start)
        if w.start == 16:
            raise MemoryError("out of GPU memory")
        assert w.crops
        return [CropsToPaste(w.crops[0], job.lanes[0].matrices[w.start : w.stop])]

    with pytest.raises(MemoryError):
        render(job, reader=FrameReader(job, pipe.aligner), generate=generate, sink=sink, progress=run)
    assert calls == [0, 16]
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("latentdub-")]


def test_an_unreadable_source_fails_the_dub_cleanly(pipe: LipSyncPipeline, clip40: Path, tmp_path: Path) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.ones(40, bool))
    broken = tmp_path / "gone.mp4"
    broken.write_bytes(b"not a video at all")
    job = RenderJob(**{**job.__dict__, "video": broken})
    with pytest.raises(Exception) as err:
        run_render(pipe, job, tokens, clip, tmp_path / "out.mp4")
    assert not isinstance(err.value, Cancelled)
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []


# -- cancellation and progress ----------------------------------------------------------------
def test_cancel_between_unet_steps_stops_within_2s_and_removes_the_partial(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.ones(40, bool))
    cancel = threading.Event()
    set_at: list[float] = []
    steps_seen = []
    unet_forward = pipe.unet.forward

    def counting_forward(*args: object, **kwargs: object) -> torch.Tensor:
        steps_seen.append(1)
        if len(steps_seen) == 3:  # mid-window: the 3rd of 50 steps of the first window
            cancel.set()
            set_at.append(time.perf_counter())
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = counting_forward  # type: ignore[method-assign]
    try:
        with pytest.raises(Cancelled):
            run_render(pipe, job, tokens, clip, tmp_path / "out.mp4", steps=50, cancel=cancel)
    finally:
        del pipe.unet.forward
    assert time.perf_counter() - set_at[0] < 2.0
    assert len(steps_seen) == 3  # checked before the next step, not at the end of the window
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []


def test_progress_events_are_ordered_monotonic_and_complete(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.array([True] * 30 + [False] * 10))
    events: list[ProgressEvent] = []
    run_render(pipe, job, tokens, clip, tmp_path / "out.mp4", progress=events.append, finalizers=(lambda p: None,))
    stages = [e.stage for e in events]
    assert stages == sorted(stages, key=["dub", "finalize"].index)
    for stage in ("dub", "finalize"):
        done = [e.done for e in events if e.stage == stage]
        assert done == sorted(done) and done[0] == 0
        last = [e for e in events if e.stage == stage][-1]
        assert last.done == last.total
    dub_events = [e for e in events if e.stage == "dub"]
    assert dub_events[-1].total == 40 and dub_events[-1].fps and dub_events[-1].fps > 0
    assert all(e.eta_s is None or e.eta_s >= 0 for e in events)


def test_cancel_during_finalizers_stops_before_the_next_one_and_leaves_no_file(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.zeros(40, bool))
    cancel = threading.Event()
    ran: list[str] = []

    def first(path: Path) -> None:
        ran.append("first")
        cancel.set()

    def second(path: Path) -> None:  # e.g. the audit entry: must not record a file that never appears
        ran.append("second")

    with pytest.raises(Cancelled):
        run_render(pipe, job, tokens, clip, tmp_path / "out.mp4", finalizers=(first, second), cancel=cancel)
    assert ran == ["first"]
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []


def test_a_progress_callback_failing_at_the_start_of_dub_leaves_no_partial(
    pipe: LipSyncPipeline, clip40: Path, tmp_path: Path
) -> None:
    job, tokens, clip = make_job(pipe, clip40, np.zeros(40, bool))

    def refuse(event: ProgressEvent) -> None:
        raise RuntimeError("event sink down")

    with pytest.raises(HookError):
        run_render(pipe, job, tokens, clip, tmp_path / "out.mp4", progress=refuse)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.mp4").exists()
