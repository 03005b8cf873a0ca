"""The streaming dubbing pipeline: video + new speech in, the same video with a new mouth out.

``LipSyncPipeline.__call__`` reads as the steps it runs:

1. read the inputs (probe the video, decode the new audio at its own rate);
2. fit the new audio to the picture (``--fit none|stretch|align``);
3. pass 1 over the video: find, track and choose the face (small per-frame numbers only);
4. plan the output timeline (length policy: which source frame is shown when);
5. encode the audio with Whisper (seamless windows) and take tokens at each frame's real time;
6. pass 2, streamed through bounded queues:
   decode + align → VAE encode → DDIM with audio CFG (+DeepCache) → VAE decode →
   composite in crop space → feathered paste into the original frame → encode once.

Nothing holds all frames: memory is set by the window size and the queue depths, so a
10-minute video needs about what a 10-second one does.

Official behaviours kept (``latentsync.md`` §5): one Gaussian noise tensor shared by every frame
of the whole video, the VAE posterior *sampled* (not its mode), reference latents = the current
unmasked frame, the unconditional CFG branch = all-zero audio, both branches in one batch,
DDIM 20 steps / guidance 1.5 / seed 1247 / DeepCache interval 3. Randomness comes from one
``torch.Generator`` seeded with ``seed``, so CPU runs are bit-for-bit repeatable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdub.errors import InputError
from latentdub.timeline import LENGTH_POLICIES, Timeline, plan_timeline

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int | None], None]
FIT_MODES = ("none", "stretch", "align")
MIN_AUDIO_S = 0.5
WINDOW = 16  # frames per diffusion window, as trained


@dataclass
class DubOptions:
    """Everything a single dub can be asked to do differently (CLI flags map 1:1 to these)."""

    steps: int = 20
    guidance: float = 1.5
    seed: int = 1247
    deepcache: bool = True
    length_policy: str = "pingpong"
    fit: str = "none"
    max_stretch: float = 1.25
    face: str = "largest"
    crf: int = 18

    def validate(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise InputError(f"--steps must be between 1 and 1000, got {self.steps}")
        if not 0.0 <= self.guidance <= 20.0:
            raise InputError(f"--guidance must be between 0 and 20, got {self.guidance}")
        if self.length_policy not in LENGTH_POLICIES:
            raise InputError(
                f"unknown --length-policy {self.length_policy!r}; choose one of {', '.join(LENGTH_POLICIES)}"
            )
        if self.fit not in FIT_MODES:
            raise InputError(f"unknown --fit {self.fit!r}; choose one of {', '.join(FIT_MODES)}")
        if not 0 <= self.crf <= 51:
            raise InputError(f"--crf must be between 0 and 51, got {self.crf}")
        if self.max_stretch < 1.0:
            raise InputError(f"the maximum stretch ratio must be >= 1, got {self.max_stretch}")


@dataclass
class DubResult:
    """What a dub did: the summary the CLI prints with ``--json``."""

    output: str
    frames: int
    dubbed_frames: int
    fps: float
    duration_s: float
    audio_duration_s: float
    width: int
    height: int
    passthrough_ranges: list[dict[str, Any]]
    timings: dict[str, float]
    options: dict[str, Any]
    model: dict[str, Any]
    fit: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StageTimer:
    """Wall time per named stage, safe to use from several threads."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._totals[stage] = self._totals.get(stage, 0.0) + elapsed

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self._totals.items()}


@dataclass
class _Window:
    """A run of consecutive output frames handled together (≤ 16 frames)."""

    start: int  # first output frame
    stop: int  # one past the last output frame
    dub: bool  # False: the selected face is absent → frames pass through untouched
    frames: list[np.ndarray] = field(default_factory=list)
    crops: np.ndarray | None = None  # (F, res, res, 3) uint8 aligned faces
    generated: np.ndarray | None = None  # (F, res, res, 3) uint8 composited crops


_STOP = object()


def read_inputs(video: str | Path, audio: str | Path) -> tuple[Any, Any]:
    """Probe the video and decode the new speech; every unusable input is an ``InputError``.

    Cheap enough to run before the model is loaded, so bad input fails in a second.
    """
    from latentdub.media.audio_io import load_audio
    from latentdub.media.reader import probe_video

    info = probe_video(Path(video))
    if info.num_frames is not None and info.num_frames < 1:
        raise InputError(f"{video} has no video frames")
    clip = load_audio(Path(audio), min_duration_s=MIN_AUDIO_S)
    return info, clip


def plan_windows(source_index: np.ndarray, valid: np.ndarray, size: int = WINDOW) -> list[_Window]:
    """Split output frames into windows of ≤ ``size``, breaking wherever the face comes or goes."""
    usable = np.asarray(valid, dtype=bool)[source_index]
    windows: list[_Window] = []
    start = 0
    n = len(source_index)
    while start < n:
        dub = bool(usable[start])
        stop = start + 1
        while stop < n and stop - start < size and bool(usable[stop]) == dub:
            stop += 1
        windows.append(_Window(start, stop, dub))
        start = stop
    return windows


def _keep_large_buffers_mmapped() -> None:
    """Make glibc return frame-sized buffers to the OS as soon as they are freed.

    Frames, crops and activations are allocated in one thread and freed in another; glibc's
    adaptive mmap threshold would soon serve them from per-thread heaps, whose fragmentation
    makes RSS creep up over a long video. A fixed 1 MiB threshold keeps RSS equal to what is
    live. No effect (and no error) off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def default_dtype(device: torch.device) -> torch.dtype:
    """Official rule: fp16 on Ampere or newer GPUs, fp32 elsewhere (incl. CPU)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] > 7:
        return torch.float16
    return torch.float32


class LipSyncPipeline:
    """Dub a video with new speech using a LatentSync 1.5/1.6-compatible model."""

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: Any,
        audio_encoder: torch.nn.Module,
        scheduler: Any,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype,
        model_info: dict[str, Any] | None = None,
        vae_batch: int = 8,
    ) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.audio_encoder = audio_encoder.eval()
        self.scheduler = scheduler
        self.resolution = resolution
        self.device = device
        self.dtype = dtype
        self.model_info = model_info or {}
        self.vae_batch = vae_batch
        from latentdub.face import Aligner, mouth_masks

        self.aligner = Aligner(resolution)
        pixel_mask, latent_mask = mouth_masks(resolution)
        self.pixel_mask = torch.as_tensor(pixel_mask, dtype=torch.float32).reshape(1, 1, resolution, resolution)
        self.latent_mask = torch.as_tensor(latent_mask, dtype=torch.float32).reshape(
            1, 1, 1, *latent_mask.shape[-2:]
        )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        version_or_dir: str | Path = "1.6",
        *,
        version: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        download: bool = True,
    ) -> LipSyncPipeline:
        """Load ``"1.5"`` / ``"1.6"`` (local HF cache or hub download) or a local weights folder."""
        from latentdub.models.scheduler import build_scheduler
        from latentdub.weights import load_unet, load_vae, load_whisper, resolve_weights

        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda was requested but no CUDA GPU is available (try --device cpu)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError("--device mps was requested but Apple MPS is not available (try --device cpu)")
        dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(device)

        if Path(str(version_or_dir)).is_dir():
            files = resolve_weights(version or "1.6", weights_dir=Path(version_or_dir), download=False)
        else:
            files = resolve_weights(str(version_or_dir), download=download)
        unet = load_unet(files, dtype=dtype, device=device)
        vae = load_vae(files, dtype=dtype, device=device)
        whisper = load_whisper(files, device=device)
        info = {
            "version": files.version,
            "resolution": files.resolution,
            "source": files.source,
            "random_weights": files.random_weights,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        if files.random_weights:
            log.warning("RANDOM WEIGHTS (smoke-test model): the output is not a real dub")
        return cls(
            unet=unet,
            vae=vae,
            audio_encoder=whisper,
            scheduler=build_scheduler(),
            resolution=files.resolution,
            device=device,
            dtype=dtype,
            model_info=info,
        )

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        video: str | Path,
        audio: str | Path,
        output: str | Path,
        *,
        progress: ProgressFn | None = None,
        **options: Any,
    ) -> DubResult:
        opts = DubOptions(**options)
        opts.validate()
        _keep_large_buffers_mmapped()
        timer = StageTimer()
        warnings: list[str] = []
        video, audio, output = Path(video), Path(audio), Path(output)
        check_output_path(output, video, audio)

        with timer("read_inputs"):
            info, clip = self.read_inputs(video, audio)
        with timer("fit_audio"):
            clip, fit_report = self.fit_audio(clip, video, info, opts)
        with timer("analyze_faces"):
            analysis = self.analyze_faces(video, progress)
        from latentdub.face import select_face

        selection = select_face(analysis, opts.face, resolution=self.resolution)
        timeline = self.plan_output(analysis, clip.duration_s, opts.length_policy)
        clip = clip.with_length(round(timeline.duration_s * clip.sample_rate))
        with timer("audio_features"):
            tokens = self.encode_audio(clip, timeline)
        windows = plan_windows(timeline.source_index, selection.valid)
        if not any(w.dub for w in windows):
            warnings.append("the selected face was not found on any frame: the video passes through undubbed")
        self.stream(video, output, info, analysis, selection, timeline, tokens, windows, clip, opts, timer, progress)
        if self.model_info.get("random_weights"):
            warnings.append("RANDOM WEIGHTS (smoke-test model): the output is not a real dub")

        dubbed = int(sum(w.stop - w.start for w in windows if w.dub))
        return DubResult(
            output=str(output),
            frames=timeline.num_frames,
            dubbed_frames=dubbed,
            fps=_average_fps(timeline),
            duration_s=round(timeline.duration_s, 4),
            audio_duration_s=round(clip.duration_s, 4),
            width=info.width,
            height=info.height,
            passthrough_ranges=_output_passthrough_ranges(windows, timeline, selection),
            timings=timer.totals(),
            options=asdict(opts),
            model=dict(self.model_info),
            fit=fit_report,
            warnings=warnings,
        )

    # -- steps --------------------------------------------------------------------------------
    def read_inputs(self, video: Path, audio: Path) -> tuple[Any, Any]:
        """Probe the video and decode the new speech (native rate and channels)."""
        return read_inputs(video, audio)

    def fit_audio(self, clip: Any, video: Path, info: Any, opts: DubOptions) -> tuple[Any, dict[str, Any] | None]:
        """``--fit stretch|align``: change the dub's timing to fit the picture."""
        if opts.fit == "none":
            return clip, None
        from latentdub.audio import fit as fitting

        if opts.fit == "stretch":
            result = fitting.stretch_to_duration(clip, info.duration_s, max_ratio=opts.max_stretch)
        else:
            if not info.has_audio:
                raise InputError(
                    f"--fit align needs the original speech, but {video} has no audio track; use --fit stretch"
                )
            from latentdub.media.audio_io import load_audio

            reference = load_audio(video)
            result = fitting.align_to_reference(clip, reference, max_ratio=opts.max_stretch)
        return result.clip, result.report()

    def analyze_faces(self, video: Path, progress: ProgressFn | None) -> Any:
        """Pass 1: detect, track and measure faces on every frame (no frames are kept)."""
        from latentdub.face import analyze_video

        def on_frame(done: int, total: int | None) -> None:
            if progress:
                progress("faces", done, total)

        return analyze_video(video, progress=on_frame)

    def plan_output(self, analysis: Any, audio_s: float, policy: str) -> Timeline:
        pts = np.asarray(analysis.pts, dtype=np.int64)
        time_base = Fraction(analysis.time_base)
        end_pts = int(analysis.end_pts)
        return plan_timeline(pts - pts[0], end_pts - int(pts[0]), time_base, audio_s, policy)

    def encode_audio(self, clip: Any, timeline: Timeline) -> torch.Tensor:
        """Whisper features for the whole track, then the 10×layers tokens at every output frame."""
        from latentdub.audio.features import AudioFeatureExtractor, tokens_for_times

        extractor = AudioFeatureExtractor(self.audio_encoder, device=self.device, dtype=self.dtype)
        features = extractor(clip.to_mono_16k())
        return tokens_for_times(features, torch.as_tensor(timeline.times_s))

    # -- pass 2: streamed -----------------------------------------------------------------------
    def stream(
        self,
        video: Path,
        output: Path,
        info: Any,
        analysis: Any,
        selection: Any,
        timeline: Timeline,
        tokens: torch.Tensor,
        windows: list[_Window],
        clip: Any,
        opts: DubOptions,
        timer: StageTimer,
        progress: ProgressFn | None,
    ) -> None:
        """Decode+align → diffuse → paste+encode, three stages joined by bounded queues."""
        from latentdub.media.frame_source import FrameSource
        from latentdub.media.writer import VideoWriter

        to_diffuse: queue.Queue[Any] = queue.Queue(maxsize=2)
        to_write: queue.Queue[Any] = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        cancel = threading.Event()
        latent_hw = self.resolution // 8
        # Official: ONE noise tensor, repeated over every frame of every window. It is drawn on
        # the CPU so a seed gives the same noise on every device.
        noise = torch.randn(
            (1, 4, 1, latent_hw, latent_hw),
            generator=torch.Generator(device="cpu").manual_seed(opts.seed),
            dtype=torch.float32,
        )
        # The VAE posterior is sampled on the model's device, from a generator seeded alike.
        generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        matrices = selection.matrices

        def put(q: queue.Queue[Any], item: Any) -> bool:
            while not cancel.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def get(q: queue.Queue[Any]) -> Any:
            while True:
                try:
                    return q.get(timeout=0.2)
                except queue.Empty:
                    if cancel.is_set():
                        return _STOP

        def decode_stage() -> None:
            try:
                with FrameSource(video, analysis.pts, rotation=info.rotation) as source:
                    for window in windows:
                        with timer("decode"):
                            idx = timeline.source_index[window.start : window.stop]
                            window.frames = [source.get(int(i)) for i in idx]
                        if window.dub:
                            with timer("align"):
                                window.crops = self.aligner.warp_batch(window.frames, matrices[idx])
                        if not put(to_diffuse, window):
                            return
                put(to_diffuse, _STOP)
            except BaseException as err:
                failure.append(err)
                cancel.set()

        def write_stage() -> None:
            try:
                from latentdub.face import paste_back

                with VideoWriter(
                    output,
                    width=info.width,
                    height=info.height,
                    time_base=timeline.time_base,
                    fps=info.fps,
                    crf=opts.crf,
                    audio=clip,
                    rotation=info.rotation,
                ) as writer:
                    done = 0
                    while True:
                        window = get(to_write)
                        if window is _STOP:
                            break
                        for j, frame in enumerate(window.frames):
                            k = window.start + j
                            if window.dub:
                                with timer("paste_back"):
                                    src = int(timeline.source_index[k])
                                    frame = paste_back(frame, window.generated[j], matrices[src])
                            with timer("encode"):
                                writer.write(frame, pts=int(timeline.pts[k]))
                        done += window.stop - window.start
                        # The window plan lives for the whole run: drop its pixels once written.
                        window.frames.clear()
                        window.generated = None
                        if progress:
                            progress("dub", done, timeline.num_frames)
                    if cancel.is_set():
                        raise _Cancelled()
            except _Cancelled:
                pass
            except BaseException as err:
                failure.append(err)
                cancel.set()

        decoder = threading.Thread(target=decode_stage, name="latentdub-decode", daemon=True)
        writer_thread = threading.Thread(target=write_stage, name="latentdub-write", daemon=True)
        decoder.start()
        writer_thread.start()
        try:
            while True:
                window = get(to_diffuse)
                if window is _STOP:
                    break
                if window.dub:
                    audio = tokens[window.start : window.stop]
                    with timer("diffusion"):
                        window.generated = self.dub_window(window.crops, audio, noise, generator, opts)
                    window.crops = None
                if not put(to_write, window):
                    break
            put(to_write, _STOP)
        except BaseException as err:
            failure.append(err)
            cancel.set()
        finally:
            decoder.join()
            writer_thread.join()
        if failure:
            raise failure[0]

    def dub_window(
        self,
        crops: np.ndarray,
        audio_tokens: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator,
        opts: DubOptions,
    ) -> np.ndarray:
        """One window: VAE encode → DDIM with audio CFG → VAE decode → composite in crop space."""
        from latentdub.models.vae import VAE_SCALING

        device, dtype = self.device, self.dtype
        frames = crops.shape[0]
        pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        pixel_mask = self.pixel_mask
        masked = pixels * pixel_mask

        # Masked and reference frames go through the encoder together, in micro-batches.
        latents_in = self._vae_encode(torch.cat([masked, pixels]), generator) * VAE_SCALING
        masked_latents, ref_latents = (_to_video(x) for x in latents_in.chunk(2))
        latent_mask = self.latent_mask.to(device, dtype).expand(1, 1, frames, -1, -1)

        use_cfg = opts.guidance > 1.0
        audio = audio_tokens.to(device, dtype)
        if use_cfg:
            audio = torch.cat([torch.zeros_like(audio), audio])  # [unconditional, audio], batch-major
        condition = torch.cat([latent_mask, masked_latents, ref_latents], dim=1)
        if use_cfg:
            condition = torch.cat([condition, condition])

        scheduler = self.scheduler
        scheduler.set_timesteps(opts.steps, device=device)
        latents = noise.to(device, dtype).expand(1, 4, frames, -1, -1) * scheduler.init_noise_sigma
        cache = self._deep_cache() if opts.deepcache else None
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            model_in = torch.cat([model_in, condition], dim=1)
            eps = self.unet(model_in, t, audio, deep_cache=cache)
            if use_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + opts.guidance * (cond - uncond)
            latents = scheduler.step(eps.float(), t, latents.float()).prev_sample.to(dtype)

        decoded = self._vae_decode(_to_frames(latents) / VAE_SCALING)
        # Official composite: generated pixels in the mouth hole, the aligned original elsewhere.
        composite = decoded * (1 - pixel_mask) + pixels * pixel_mask
        return (
            composite.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        )

    def _vae_encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample the VAE posterior (as official, not its mode), ``vae_batch`` images at a time.

        The VAE works per image, so micro-batching changes nothing but the peak memory: its
        activations at full crop resolution dominate (32 crops × 128 ch × 512² in one call
        would need GBs).
        """
        out = []
        for chunk in pixels.split(self.vae_batch):
            posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            out.append(posterior.sample(generator=generator))
        return torch.cat(out)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``vae_batch`` latents at a time; float32 on the CPU."""
        return torch.cat([self.vae.decode(chunk).sample.float().cpu() for chunk in latents.split(self.vae_batch)])

    def _deep_cache(self) -> Any:
        from latentdub.models.unet import DeepCache

        return DeepCache(interval=3)


class _Cancelled(Exception):
    pass


def _to_video(latents: torch.Tensor) -> torch.Tensor:
    """(F, C, h, w) → (1, C, F, h, w)."""
    return latents.permute(1, 0, 2, 3).unsqueeze(0)


def _to_frames(latents: torch.Tensor) -> torch.Tensor:
    """(1, C, F, h, w) → (F, C, h, w)."""
    return latents.squeeze(0).permute(1, 0, 2, 3)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown --dtype {dtype!r}; choose fp16, bf16 or fp32")
    return table[dtype]


def _average_fps(timeline: Timeline) -> float:
    if timeline.num_frames < 2:
        return 0.0
    span = float((int(timeline.pts[-1]) - int(timeline.pts[0])) * timeline.time_base)
    return round((timeline.num_frames - 1) / span, 4) if span > 0 else 0.0


def _output_passthrough_ranges(windows: list[_Window], timeline: Timeline, selection: Any) -> list[dict[str, Any]]:
    """Output frame ranges left untouched because the selected face was not usable, with why."""
    reasons = np.full(selection.num_frames, "", dtype=object)
    for r in selection.passthrough_ranges:
        reasons[r.start_frame : r.end_frame] = r.reason
    ranges: list[dict[str, Any]] = []
    times = timeline.times_s
    for w in windows:
        if w.dub:
            continue
        reason = reasons[int(timeline.source_index[w.start])] or "no usable face"
        if ranges and ranges[-1]["end_frame"] == w.start and ranges[-1]["reason"] == reason:
            ranges[-1]["end_frame"] = w.stop
        else:
            ranges.append({"start_frame": w.start, "end_frame": w.stop, "reason": reason})
    for r in ranges:
        r["start_s"] = round(float(times[r["start_frame"]]), 4)
        end = r["end_frame"]
        r["end_s"] = round(float(times[end]) if end < len(times) else timeline.duration_s, 4)
    return ranges


def check_output_path(output: Path, video: Path, audio: Path) -> None:
    if output.suffix.lower() not in (".mp4", ".mov", ".mkv", ".m4v"):
        raise InputError(f"output {output} must end in .mp4, .mov, .mkv or .m4v")
    if not output.parent.exists():
        raise InputError(f"the output folder {output.parent} does not exist")
    if output.exists() and output.is_dir():
        raise InputError(f"output {output} is a folder")
    for src in (video, audio):
        if src.exists() and output.exists() and output.resolve() == src.resolve():
            raise InputError(f"output {output} would overwrite an input file")
