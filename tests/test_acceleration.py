"""The optimized pass-2 path gives the reference path's frames (latentdub.acceleration).

* the device paste-back against OpenCV's own paste (``face.paste.paste_back``), and its OpenCV
  INTER_AREA port against ``cv2.resize``;
* the sync-free DDIM step against diffusers' ``DDIMScheduler.step``;
* one window, optimized vs reference generator; batched windows vs each alone;
* render() groups only full dubbed windows and never pads a short one;
* whole dubs of a real clip with a tiny random model: reference vs optimized frames;
* ``bench/gpu.py --smoke`` reports |Δ| ≤ 1;
* CUDA-only paths (graphs, pinned copies, device paste on a GPU) skip without a GPU.

The ground truth is always the independent reference: OpenCV, diffusers, or the reference path.
"""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import soundfile as sf
import torch

from cli_helpers import TEST_CONSENT
from latentdub.acceleration import Acceleration, UNetSteps
from latentdub.face import Aligner
from latentdub.face.paste import (
    CropsToPaste,
    _area_resize_torch,
    paste_back,
    paste_back_batch,
    paste_back_torch,
)
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter
from latentdub.models.scheduler import build_scheduler, ddim_step, sync_free_ddim
from latentdub.options import DubOptions
from latentdub.pipeline import LipSyncPipeline
from latentdub.progress import DubProgress
from latentdub.render import (
    WINDOW,
    FrameReader,
    FrameSink,
    Lane,
    RenderJob,
    Window,
    plan_windows,
    render,
)
from latentdub.timeline import Timeline

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "needs a CUDA GPU: CUDA graphs, pinned host memory and the GPU paste only run there"
STEPS = 2  # DeepCache: a full and a shallow U-Net step, both paths of the U-Net


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads made these
    tests' durations vary tenfold; the results do not depend on it (the paths are compared
    under the same setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")


def face_matrix(res: int, face_px: float, center: tuple[float, float], angle: float) -> np.ndarray:
    """frame → crop matrix of a face ``face_px`` wide around ``center``, rotated by ``angle``."""
    s = res / face_px
    a = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    t = np.array([res / 2, res / 2]) - a @ np.asarray(center, dtype=np.float64)
    return np.concatenate([a, t[:, None]], axis=1)


def textured_frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 3 + yy) % 256, (yy * 5 + xx // 3) % 256, (xx + 2 * yy) % 256], -1)
    return np.where(rng.random((h, w, 1)) < 0.2, rng.integers(0, 256, (h, w, 3)), smooth).astype(np.uint8)


# -- paste-back on the device vs OpenCV ------------------------------------------------------
PASTE_CASES = [
    # (res, face width in frame px: < 0.6·res → area prefilter, = 0.4·res → its 2x fast path, angle)
    (256, 300.0, 0.1),
    (256, 120.0, -0.3),  # small face: INTER_AREA prefilter
    (256, 102.4, 0.0),  # shrink 0.4: the prefilter's integer-scale (2x) fast path
    (512, 520.0, 0.25),
    (512, 200.0, 0.05),
]
# OpenCV 5 rewrote warpAffine (no 1/32-px fixed-point grid): measured up to 6 levels from its own 4.x
# output on rotated cases. The device paste reproduces 4.x, which mediapipe's numpy<2 pin installs
# (pyproject also caps it); an environment with OpenCV 5 (the lent GPU image) has no reference here.
OPENCV_4 = pytest.mark.skipif(
    int(cv2.__version__.split(".")[0]) >= 5,
    reason=f"OpenCV {cv2.__version__}: the device paste reproduces OpenCV 4.x's warpAffine arithmetic",
)


@OPENCV_4
@pytest.mark.parametrize(("res", "face", "angle"), PASTE_CASES)
def test_device_paste_matches_the_opencv_paste(res: int, face: float, angle: float) -> None:
    rng = np.random.default_rng(int(face))
    frame = textured_frame(rng, 420, 640)
    crop = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    worst = 0
    for center in ((320.0, 200.0), (15.0, 400.0), (630.0, 10.0)):  # inside, and cut by the frame edges
        m = face_matrix(res, face, center, angle)
        expected = paste_back(frame, crop, m)
        got = paste_back_torch(frame, crop, m)
        assert got.shape == frame.shape and got.dtype == np.uint8
        worst = max(worst, int(np.abs(got.astype(int) - expected).max()))
        if center == (320.0, 200.0):
            assert (expected != frame).any()  # something was pasted: the comparison means something
    # The bound the issue asks for; OpenCV 4.x's fixed-point arithmetic is reproduced, so 0.
    assert worst <= 1, f"device paste differs from OpenCV by {worst} levels"


def test_batched_device_paste_handles_mixed_boxes_and_frames_without_a_face() -> None:
    rng = np.random.default_rng(5)
    res = 256
    frames = [textured_frame(rng, 360, 480) for _ in range(6)]
    crops = rng.integers(0, 256, (6, res, res, 3), dtype=np.uint8)
    mats = np.stack([
        face_matrix(res, 260, (240, 180), 0.0),
        face_matrix(res, 110, (100, 90), 0.3),  # prefiltered, smaller box
        face_matrix(res, 300, (-900, -900), 0.0),  # entirely outside: nothing to paste
        face_matrix(res, 102.4, (400, 300), 0.0),
        face_matrix(res, 400, (240, 200), -0.2),  # the biggest box sets the padded shape
        face_matrix(res, 150, (470, 350), 0.1),
    ])
    pasted = paste_back_batch(frames, torch.from_numpy(crops), mats, frames_per_call=4)
    assert pasted.regions[2] is None
    for j in range(6):
        expected = paste_back(frames[j], crops[j], mats[j])
        got = pasted.apply(j, frames[j])
        assert got is not frames[j]
        assert int(np.abs(got.astype(int) - expected).max()) <= 1


@pytest.mark.parametrize("size", [(256, 97), (256, 128), (256, 64), (512, 300), (512, 171), (200, 59)])
def test_area_prefilter_port_matches_cv2_resize(size: tuple[int, int]) -> None:
    src, dst = size
    rng = np.random.default_rng(src + dst)
    img = rng.integers(0, 256, (src, src, 3), dtype=np.uint8)
    weights = rng.random((src, src)).astype(np.float32)
    want = cv2.resize(img, (dst, dst), interpolation=cv2.INTER_AREA)
    got = _area_resize_torch(torch.from_numpy(img), dst, dst).numpy()
    assert int(np.abs(got.astype(int) - want).max()) <= 1
    want_w = cv2.resize(weights, (dst, dst), interpolation=cv2.INTER_AREA)
    got_w = _area_resize_torch(torch.from_numpy(weights)[..., None], dst, dst)[..., 0].numpy()
    np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-6)


# -- the sampler step ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [20, 7])
def test_sync_free_ddim_step_is_bitwise_diffusers(steps: int) -> None:
    scheduler = build_scheduler()
    assert sync_free_ddim(scheduler)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 8, 8, generator=g)
    for t in scheduler.timesteps:
        eps = torch.randn(sample.shape, generator=g)
        want = scheduler.step(eps, t, sample).prev_sample
        got = ddim_step(scheduler, eps, int(t), sample, steps)
        assert torch.equal(got, want)
        sample = want
    assert not sync_free_ddim(build_scheduler(clip_sample=True))


# -- the generator stage ---------------------------------------------------------------------
def window_inputs(seed: int, frames: int = WINDOW) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    base = np.stack([xx, yy, (xx + yy) // 2], -1)
    crops = np.stack([(base + 7 * k + rng.integers(0, 30, (256, 256, 3))) % 256 for k in range(frames)])
    tokens = torch.from_numpy(rng.standard_normal((frames, 50, 32)).astype(np.float32))
    return crops.astype(np.uint8), tokens


@pytest.mark.parametrize("frames", [WINDOW, 7])
def test_optimized_window_is_pixel_identical_to_the_reference_window(pipe: LipSyncPipeline, frames: int) -> None:
    crops, tokens = window_inputs(frames, frames)
    gen = pipe.window_diffusion(DubOptions(steps=STEPS))
    reference = pipe.window_diffusion(DubOptions(steps=STEPS), "reference")(crops, tokens, start=32)
    accel = Acceleration.auto("cpu", 256)
    optimized = gen.generate([crops], [tokens], [32], accel=accel, steps=pipe.unet_steps)
    assert optimized.dtype == torch.uint8 and tuple(optimized.shape) == crops.shape
    assert int(np.abs(optimized.numpy().astype(int) - reference).max()) <= 1
    # On the CPU in float32 it is the same arithmetic in the same order: equal, not just close.
    assert np.array_equal(optimized.numpy(), reference)


def test_batched_windows_equal_unbatched(pipe: LipSyncPipeline) -> None:
    inputs = [window_inputs(s) for s in (1, 2)]
    starts = [0, 48]
    gen = pipe.window_diffusion(DubOptions(steps=STEPS))
    accel = Acceleration(window_batch=2, vae_batch=32)
    together = gen.generate([c for c, _ in inputs], [t for _, t in inputs], starts, accel=accel, steps=pipe.unet_steps)
    reference = pipe.window_diffusion(DubOptions(steps=STEPS), "reference")
    for i, ((crops, tokens), start) in enumerate(zip(inputs, starts, strict=True)):
        alone = reference(crops, tokens, start=start)  # the reference path, one window
        part = together[i * WINDOW : (i + 1) * WINDOW].numpy()
        diff = np.abs(part.astype(int) - alone)
        # Per-window noise, per-sample maths: equal but for float rounding in batch-size
        # dependent CPU kernels (measured: ~50 of 3.1 M values, by one level, at 4 steps).
        assert int(diff.max()) <= 1
        assert (diff > 0).mean() < 1e-3
    # A window's result depends on its own start (its noise), not on its neighbours.
    assert not np.array_equal(together[:WINDOW].numpy(), together[WINDOW:].numpy())


def test_compiled_step_functions_trace_and_match_eager(pipe: LipSyncPipeline) -> None:
    """The full/shallow step functions that compile and CUDA graphs capture, traced by dynamo
    (backend "eager": the tracing without a C++ toolchain) give the eager loop's result."""
    crops, tokens = window_inputs(9)
    gen = pipe.window_diffusion(DubOptions(steps=2))
    eager = gen.generate([crops], [tokens], [0], accel=Acceleration(), steps=UNetSteps(pipe.unet))
    traced = gen.generate(
        [crops], [tokens], [0], accel=Acceleration(compile=True, compile_backend="eager"), steps=UNetSteps(pipe.unet)
    )
    assert torch.equal(eager, traced)


# -- render(): grouping ----------------------------------------------------------------------
def test_render_batches_only_consecutive_full_windows_and_runs_short_ones_alone(tmp_path: Path) -> None:
    size, fps, n = 96, 25, 70
    video = tmp_path / "clip.mp4"
    yy, xx = np.mgrid[0:size, 0:size]
    with VideoWriter(video, width=size, height=size, time_base=Fraction(1, fps), fps=fps, crf=12) as w:
        for k in range(n):
            w.write(np.stack([(xx + k) % 256, yy, (xx + yy) % 256], -1).astype(np.uint8), pts=k)
    pts = np.array([f.pts for f in iter_frames(video)], dtype=np.int64)
    dub = np.array([True] * 40 + [False] * 5 + [True] * 25)  # windows 16 16 8 | 5 | 16 9
    timeline = Timeline(np.arange(n), pts - pts[0], probe_video(video).time_base, n / fps, "cut")
    m = np.array([[256 / 60, 0.0, -20 * 256 / 60], [0.0, 256 / 60, -20 * 256 / 60]])
    job = RenderJob(video=video, source_pts=pts, rotation=0, width=size, height=size, fps=fps, timeline=timeline,
                    lanes=[Lane(np.repeat(m[None], n, 0), np.repeat(np.array([[20.0, 20, 80, 80]]), n, 0), dub)],
                    windows=plan_windows(dub))
    groups: list[list[tuple[int, int]]] = []

    def generate(windows: list[Window], check: Any) -> list[CropsToPaste]:
        groups.append([(w.start, w.stop) for w in windows])
        return [CropsToPaste(w.crops[0], job.lanes[0].matrices[w.start : w.stop]) for w in windows]

    run = DubProgress()
    writer = VideoWriter(tmp_path / "out.mp4", width=size, height=size, time_base=timeline.time_base, fps=fps)
    render(job, reader=FrameReader(job, Aligner(256)), sink=FrameSink(job, writer, progress=run), progress=run,
           generate=generate, batch=4)
    assert groups == [[(0, 16), (16, 32)], [(32, 40)], [(45, 61)], [(61, 70)]]
    assert len(list(iter_frames(tmp_path / "out.mp4"))) == n


# -- whole dubs ------------------------------------------------------------------------------
def cut_clip(media_dir: Path, folder: Path, frames: int) -> tuple[Path, Path]:
    """The first ``frames`` frames of a real talking head, and as many seconds of real speech."""
    src = media_dir / "liveportrait_d20_man_25fps.mp4"
    info = probe_video(src)
    clip = folder / f"d20_{frames}.mp4"
    with VideoWriter(clip, width=info.width, height=info.height, time_base=info.time_base, fps=info.fps) as w:
        for f in iter_frames(src, stop=frames):
            w.write(f.image, pts=f.pts - info.start_pts)
    data, rate = sf.read(str(media_dir / "audio_latentsync_demo1_16k.wav"), dtype="float32", always_2d=True)
    speech = folder / f"speech_{frames}.wav"
    sf.write(str(speech), data[: int(frames / info.fps * rate)], rate)
    return clip, speech


@pytest.fixture(scope="module")
def real_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 frames (windows of 16, 16, 8) of a real talking head, and 1.6 s of real speech."""
    return cut_clip(media_dir, tmp_path_factory.mktemp("accel-clip"), 40)


@pytest.fixture(scope="module")
def short_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """24 frames (windows of 16 and 8) and 0.96 s of speech."""
    return cut_clip(media_dir, tmp_path_factory.mktemp("accel-short"), 24)


def dub_frames(
    pipe: LipSyncPipeline, clip: Path, speech: Path, out: Path, accel: Any, steps: int = STEPS
) -> list[np.ndarray]:
    if accel is not None:
        pipe.acceleration = accel
    frames: list[np.ndarray] = []

    def keep(frame: np.ndarray, info: Any) -> np.ndarray:
        frames.append(frame.copy())
        return frame

    result = pipe(clip, speech, out, {"steps": steps}, consent=TEST_CONSENT, frame_filters=[keep])
    assert result.dubbed_frames > 16 and len(frames) == result.frames
    return frames


def test_full_dub_optimized_equals_reference_on_a_real_clip(
    tiny_weights: Path, real_clip: tuple[Path, Path], tmp_path: Path
) -> None:
    clip, speech = real_clip
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")
    assert pipe.acceleration == Acceleration.auto("cpu", 256)  # the optimized path is the default
    analysis = pipe.analyze_faces
    cache: dict[str, Any] = {}

    def analyze_once(inputs: Any, run: Any) -> Any:  # pass 1 is not what is compared
        if "a" not in cache:
            cache["a"] = analysis(inputs, run)
        return cache["a"]

    pipe.analyze_faces = analyze_once  # type: ignore[method-assign]
    reference = dub_frames(pipe, clip, speech, tmp_path / "ref.mp4", "reference")
    default = dub_frames(pipe, clip, speech, tmp_path / "opt.mp4", "optimized")
    # Everything that runs on a CPU on: two windows per call and the paste-back in torch.
    forced = dub_frames(pipe, clip, speech, tmp_path / "all.mp4", Acceleration(window_batch=2, device_paste=True))
    for name, frames in (("optimized", default), ("batched + device paste", forced)):
        assert len(frames) == len(reference)
        worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(reference, frames, strict=True))
        assert worst <= 1, f"{name}: max |Δ| {worst} levels"
    assert all(np.array_equal(a, b) for a, b in zip(reference, default, strict=True))


PASS_1: dict[Path, Any] = {}  # face analyses by clip, shared by the settings below


@pytest.mark.parametrize(
    "accel", ["reference", "optimized", {"window_batch": 2, "device_paste": True}], ids=["reference", "optimized", "batched"]
)
def test_two_dubs_at_once_on_one_pipeline_each_equal_the_dub_alone(
    tiny_weights: Path, short_clip: tuple[Path, Path], tmp_path: Path, accel: Any
) -> None:
    """Every dub has its own scheduler: a shared one (``set_timesteps`` writes the step count
    into it) gave frames up to 183 levels off when a 3-step and a 7-step dub overlapped."""
    import threading

    clip, speech = short_clip
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5", acceleration=accel)
    analysis, lock = pipe.analyze_faces, threading.Lock()

    def analyze_once(inputs: Any, run: Any) -> Any:  # pass 1 is not what is compared
        with lock:
            if clip not in PASS_1:
                PASS_1[clip] = analysis(inputs, run)
            return PASS_1[clip]

    pipe.analyze_faces = analyze_once  # type: ignore[method-assign]
    alone = {s: dub_frames(pipe, clip, speech, tmp_path / f"alone{s}.mp4", None, steps=s) for s in (2, 3)}
    together: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def dub(steps: int) -> None:
        try:
            start.wait()
            together[steps] = dub_frames(pipe, clip, speech, tmp_path / f"both{steps}.mp4", None, steps=steps)
        except BaseException as err:  # surfaced below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=dub, args=(s,)) for s in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in (2, 3):
        assert len(together[s]) == len(alone[s])
        worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(alone[s], together[s], strict=True))
        assert worst == 0, f"{s} steps, run beside another dub: max |Δ| {worst} levels"
    assert not all(np.array_equal(a, b) for a, b in zip(alone[2], alone[3], strict=True))  # the step counts matter


def test_a_batched_optimized_dub_cancels_between_unet_steps(
    tiny_weights: Path, real_clip: tuple[Path, Path], tmp_path: Path
) -> None:
    import threading

    from latentdub.errors import Cancelled

    clip, speech = real_clip
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5", acceleration={"window_batch": 2})
    cancel = threading.Event()
    calls: list[int] = []
    forward = pipe.unet.forward

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            cancel.set()
        return forward(*args, **kwargs)

    pipe.unet.forward = counting  # type: ignore[method-assign]
    out = tmp_path / "out.mp4"
    with pytest.raises(Cancelled):
        pipe(clip, speech, out, {"steps": 50}, consent=TEST_CONSENT, cancel=cancel)
    assert len(calls) == 3  # checked before the next step of the batched loop
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# -- settings --------------------------------------------------------------------------------
def test_acceleration_settings_and_their_cpu_defaults(pipe: LipSyncPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = Acceleration.auto("cpu", 512)
    assert not (cpu.cuda_graphs or cpu.pinned_memory or cpu.channels_last or cpu.compile or cpu.device_paste)
    assert cpu.window_batch == 1 and not cpu.is_reference
    cuda_256 = Acceleration.auto("cuda", 256)
    assert cuda_256.window_batch == 4 and cuda_256.device_paste and not cuda_256.compile
    # never executed on a GPU yet: opt-in until bench/gpu.py has measured them there
    assert not (cuda_256.cuda_graphs or cuda_256.pinned_memory)
    assert Acceleration.auto("cuda", 512).window_batch == 1
    # CUDA-only features are dropped on a CPU, with the rest kept.
    mixed = Acceleration(window_batch=2, cuda_graphs=True, pinned_memory=True).for_device("cpu")
    assert mixed.window_batch == 2 and not mixed.cuda_graphs and not mixed.pinned_memory
    assert Acceleration.parse("reference").is_reference
    assert Acceleration.parse({"window_batch": 3}, "cpu").window_batch == 3
    with pytest.raises(ValueError, match="unknown acceleration settings"):
        Acceleration.parse({"warp_speed": True})
    with pytest.raises(ValueError):
        Acceleration.parse("fastest")
    with pytest.raises(ValueError):
        Acceleration(window_batch=0)
    pipe.acceleration = "reference"
    assert pipe.acceleration.is_reference
    pipe.acceleration = None
    assert pipe.acceleration == Acceleration.auto("cpu", 256)
    monkeypatch.setenv("LATENTDUB_ACCELERATION", "reference")
    pipe.acceleration = None
    assert pipe.acceleration.is_reference
    pipe.acceleration = "optimized"


# -- the bench -------------------------------------------------------------------------------
def test_bench_gpu_smoke_reports_equal_frames(media_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--steps", "4", "--json", str(tmp_path / "gpu.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**__import__("os").environ, "LATENTDUB_DATA_DIR": str(tmp_path / "data")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| max abs diff vs reference"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "-"  # the reference column
    assert int(cells[2]) <= 1
    for label in ("diffusion (s)", "s per video-second", "peak VRAM (GB)", "MFU (end to end)"):
        assert re.search(rf"^\| {re.escape(label)}", proc.stdout, re.M), label


# -- CUDA only ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graph_replays_equal_eager_steps(tiny_weights: Path) -> None:
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5", device="cuda", dtype="fp32")
    crops, tokens = window_inputs(4)
    tokens = tokens.cuda()
    gen = pipe.window_diffusion(DubOptions(steps=6))
    eager = gen.generate([crops] * 2, [tokens] * 2, [0, 16], accel=Acceleration(), steps=UNetSteps(pipe.unet))
    steps = UNetSteps(pipe.unet)
    graphs = gen.generate([crops] * 2, [tokens] * 2, [0, 16], accel=Acceleration(cuda_graphs=True), steps=steps)
    assert not steps.disabled, steps.disabled
    assert torch.equal(eager, graphs)  # a replay runs the captured kernels: the same bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@OPENCV_4
@pytest.mark.parametrize(("res", "face", "angle"), PASTE_CASES)
def test_gpu_paste_with_pinned_copies_matches_opencv(res: int, face: float, angle: float) -> None:
    rng = np.random.default_rng(3)
    frames = [textured_frame(rng, 420, 640) for _ in range(3)]
    crops = rng.integers(0, 256, (3, res, res, 3), dtype=np.uint8)
    mats = np.stack([face_matrix(res, face, (300 + 10 * j, 200), angle) for j in range(3)])
    stream = torch.cuda.Stream()
    pasted = paste_back_batch(frames, torch.from_numpy(crops).cuda(), mats, pin_memory=True, copy_stream=stream)
    for j in range(3):
        expected = paste_back(frames[j], crops[j], mats[j])
        assert int(np.abs(pasted.apply(j, frames[j]).astype(int) - expected).max()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_dub_optimized_matches_reference(tiny_weights: Path, real_clip: tuple[Path, Path], tmp_path: Path) -> None:
    """fp32 on the GPU: the optimized path (graphs, pinned copies, GPU paste, channels_last VAE)
    against the reference path; channels_last picks other conv kernels, hence a small bound."""
    clip, speech = real_clip
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5", device="cuda", dtype="fp32")
    reference = dub_frames(pipe, clip, speech, tmp_path / "ref.mp4", "reference")
    optimized = dub_frames(pipe, clip, speech, tmp_path / "opt.mp4", "optimized")
    worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(reference, optimized, strict=True))
    assert worst <= 2, f"max |Δ| {worst}"
