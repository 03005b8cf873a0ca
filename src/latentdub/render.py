"""Pass 2, the render engine: three stages joined by bounded queues, and the runner that owns them.

* :class:`FrameReader` (the source): decodes the output's frames in order and cuts the aligned
  face crops of the windows that are dubbed.
* :class:`WindowGenerator` (the generator): the diffusion of one window — VAE encode → DDIM with
  audio CFG (+DeepCache) → VAE decode → composite in crop space.
* :class:`FrameSink` (the sink): pastes each generated crop into its original frame, runs the
  caller's frame filters, encodes, and at the end runs the finalizers on the finished temporary
  file before the atomic rename.
* :func:`render` runs them: the source and the sink in threads of their own, the generator in
  the calling thread (the model's device is driven from one thread), queues of depth 2 so memory
  stays bounded for any length, the first error stops everything and is re-raised, and the
  caller's cancel token is checked between U-Net steps.

Each stage works without the others, which is how the tests drive them.

Randomness does not depend on scheduling: the VAE posterior of a window is sampled from a
generator seeded by ``(seed, the window's first output frame)``, so running windows in another
order or grouping gives the same frames. The official code draws the same distribution from one
sequential generator, so for a given seed the noise differs from the official run (not its
statistics). The initial latent noise is, as official, one tensor shared by every frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdub import memory
from latentdub.errors import Cancelled, HookError, LatentdubError
from latentdub.progress import DubProgress
from latentdub.runs import runs
from latentdub.timeline import Timeline

WINDOW = 16  # frames per diffusion window, as trained
QUEUE_DEPTH = 2


# -- what flows between the stages ------------------------------------------------------------
@dataclass
class Window:
    """A run of consecutive output frames handled together (≤ 16 frames)."""

    start: int  # first output frame
    stop: int  # one past the last output frame
    dub: bool  # False: the selected face is absent → frames pass through untouched
    frames: list[np.ndarray] = field(default_factory=list)  # decoded originals, upright RGB
    crops: np.ndarray | None = None  # (F, res, res, 3) uint8 aligned faces
    generated: np.ndarray | None = None  # (F, res, res, 3) uint8 composited crops

    @property
    def size(self) -> int:
        return self.stop - self.start

    def release(self) -> None:
        """Drop the pixels (the plan lives for the whole run; its frames must not)."""
        self.frames = []
        self.crops = None
        self.generated = None


def plan_windows(dub: np.ndarray, size: int = WINDOW) -> list[Window]:
    """Split output frames into windows of ≤ ``size``, breaking wherever the face comes or goes.

    ``dub`` is one bool per output frame.
    """
    windows: list[Window] = []
    for a, b, flag in runs(np.asarray(dub, dtype=bool)):
        windows.extend(Window(s, min(s + size, b), bool(flag)) for s in range(a, b, size))
    return windows


@dataclass(frozen=True)
class FrameInfo:
    """What a frame filter is told about the frame it gets."""

    index: int  # output frame number
    pts: int  # output timestamp in ``time_base`` ticks
    time_s: float
    source_index: int  # the input frame shown here
    dubbed: bool
    box: tuple[float, float, float, float] | None  # face box (x0, y0, x1, y1) in frame px, if dubbed
    matrix: np.ndarray | None  # (2, 3) frame px → crop px, if dubbed


FrameFilter = Callable[[np.ndarray, FrameInfo], np.ndarray]
Finalizer = Callable[[Path], Mapping[str, Any] | None]


@dataclass(frozen=True)
class RenderJob:
    """Everything pass 1 decided that pass 2 needs: no model, no pixels."""

    video: Path
    source_pts: np.ndarray  # (N,) pts of every input frame (for random access)
    rotation: int
    width: int
    height: int
    fps: float
    timeline: Timeline
    matrices: np.ndarray  # (N, 2, 3) per input frame: frame px → crop px
    boxes: np.ndarray  # (N, 4) per input frame, NaN where no face is dubbed
    windows: list[Window]

    @property
    def num_frames(self) -> int:
        return self.timeline.num_frames

    def frame_info(self, k: int, dubbed: bool) -> FrameInfo:
        src = int(self.timeline.source_index[k])
        pts = int(self.timeline.pts[k])
        box = self.boxes[src] if dubbed else None
        return FrameInfo(
            index=k,
            pts=pts,
            time_s=float(pts * self.timeline.time_base),
            source_index=src,
            dubbed=dubbed,
            box=None if box is None or np.isnan(box).any() else tuple(float(v) for v in box),  # type: ignore[arg-type]
            matrix=self.matrices[src].copy() if dubbed else None,
        )


# -- the stages -------------------------------------------------------------------------------
class FrameReader:
    """Source stage: decode the frames of each window (in output order) and cut their crops."""

    def __init__(self, job: RenderJob, aligner: Any) -> None:
        self.job = job
        self.aligner = aligner
        self._source: Any = None

    def __enter__(self) -> FrameReader:
        from latentdub.media.frame_source import FrameSource

        self._source = FrameSource(self.job.video, self.job.source_pts, rotation=self.job.rotation)
        self._source.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._source is not None:
            self._source.__exit__(*exc)
            self._source = None

    def load(self, window: Window) -> Window:
        if self._source is None:
            raise RuntimeError("FrameReader.load outside its `with` block")
        idx = self.job.timeline.source_index[window.start : window.stop]
        window.frames = [self._source.get(int(i)) for i in idx]
        if window.dub:
            window.crops = self.aligner.warp_batch(window.frames, self.job.matrices[idx])
        return window


class WindowGenerator:
    """Generator stage: the diffusion of one window, in crop space.

    ``steps``, ``guidance``, ``deepcache`` and ``seed`` are the dub's options; ``noise`` is the
    one initial latent tensor (1, 4, 1, h, w) shared by every frame of the video.
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: Any,
        scheduler: Any,
        pixel_mask: torch.Tensor,  # (1, 1, res, res) 1 = keep, 0 = regenerate
        latent_mask: torch.Tensor,  # (1, 1, 1, h, w)
        device: torch.device,
        dtype: torch.dtype,
        steps: int,
        guidance: float,
        deepcache: bool,
        seed: int,
        vae_batch: int = 8,
    ) -> None:
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.pixel_mask, self.latent_mask = pixel_mask, latent_mask
        self.device, self.dtype = device, dtype
        self.steps, self.guidance, self.deepcache, self.seed = steps, guidance, deepcache, seed
        self.vae_batch = vae_batch
        latent_hw = latent_mask.shape[-2:]
        # Official: ONE noise tensor, repeated over every frame of every window. Drawn on the
        # CPU so a seed gives the same noise on every device.
        self.noise = torch.randn(
            (1, 4, 1, *latent_hw), generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32
        )

    def window_rng(self, start: int) -> torch.Generator:
        """The posterior-sampling generator of the window that starts at output frame ``start``."""
        state = np.random.SeedSequence([self.seed, start]).generate_state(2, dtype=np.uint32)
        derived = (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(derived)

    @torch.inference_mode()
    def __call__(
        self,
        crops: np.ndarray,
        audio_tokens: torch.Tensor,
        *,
        start: int,
        check: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Composited crops (F, res, res, 3) uint8 for the window starting at output frame ``start``.

        ``check`` is called between U-Net steps; it raises to stop (cancellation).
        """
        from latentdub.models.vae import VAE_SCALING

        device, dtype = self.device, self.dtype
        frames = crops.shape[0]
        rng = self.window_rng(start)
        pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        masked = pixels * self.pixel_mask

        # Masked and reference frames go through the encoder together, in micro-batches.
        latents_in = self._vae_encode(torch.cat([masked, pixels]), rng) * VAE_SCALING
        masked_latents, ref_latents = (_to_video(x) for x in latents_in.chunk(2))
        latent_mask = self.latent_mask.to(device, dtype).expand(1, 1, frames, -1, -1)

        use_cfg = self.guidance > 1.0
        audio = audio_tokens.to(device, dtype)
        if use_cfg:
            audio = torch.cat([torch.zeros_like(audio), audio])  # [unconditional, audio], batch-major
        condition = torch.cat([latent_mask, masked_latents, ref_latents], dim=1)
        if use_cfg:
            condition = torch.cat([condition, condition])

        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, device=device)
        latents = self.noise.to(device, dtype).expand(1, 4, frames, -1, -1) * scheduler.init_noise_sigma
        cache = _deep_cache() if self.deepcache else None
        for t in scheduler.timesteps:
            if check is not None:
                check()
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            model_in = torch.cat([model_in, condition], dim=1)
            eps = self.unet(model_in, t, audio, deep_cache=cache)
            if use_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + self.guidance * (cond - uncond)
            latents = scheduler.step(eps.float(), t, latents.float()).prev_sample.to(dtype)
        if check is not None:
            check()

        decoded = self._vae_decode(_to_frames(latents) / VAE_SCALING)
        # Official composite: generated pixels in the mouth hole, the aligned original elsewhere.
        composite = decoded * (1 - self.pixel_mask) + pixels * self.pixel_mask
        return (
            composite.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        )

    def _vae_encode(self, pixels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Sample the VAE posterior (as official, not its mode), ``vae_batch`` images at a time.

        The VAE works per image, so micro-batching changes nothing but the peak memory.
        """
        out = []
        for chunk in pixels.split(self.vae_batch):
            posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            out.append(posterior.sample(generator=rng))
        return torch.cat(out)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``vae_batch`` latents at a time; float32 on the CPU."""
        return torch.cat([self.vae.decode(chunk).sample.float().cpu() for chunk in latents.split(self.vae_batch)])


class FrameSink:
    """Sink stage: paste back, frame filters, encode; then finalizers and the atomic rename.

    ``writer`` is an open :class:`~latentdub.media.writer.VideoWriter` (or anything with
    ``write(frame, pts=)``, ``close(before_rename=)`` and ``abort()``).
    """

    def __init__(
        self,
        job: RenderJob,
        writer: Any,
        *,
        frame_filters: Sequence[FrameFilter] = (),
        progress: DubProgress | None = None,
        timer: Any = None,
    ) -> None:
        self.job = job
        self.writer = writer
        self.filters = list(frame_filters)
        self.progress = progress
        self.timer = timer
        self.frames_written = 0

    def write(self, window: Window) -> None:
        from latentdub.face import paste_back

        job = self.job
        if window.start != self.frames_written:
            raise RuntimeError(f"window {window.start}–{window.stop} reached the sink out of order")
        for j, frame in enumerate(window.frames):
            if self.progress is not None:
                self.progress.check()  # a 1080p window takes a second or more to write
            k = window.start + j
            src = int(job.timeline.source_index[k])
            if window.dub:
                if window.generated is None:
                    raise RuntimeError(f"window {window.start}–{window.stop} was not generated")
                with self._timed("paste_back"):
                    frame = paste_back(frame, window.generated[j], job.matrices[src])
            elif self.filters:
                frame = frame.copy()  # decoded frames are cached for reuse (ping-pong): never filter those
            if self.filters:
                with self._timed("frame_filters"):
                    frame = self._filter(frame, job.frame_info(k, window.dub))
            with self._timed("encode"):
                self.writer.write(frame, pts=int(job.timeline.pts[k]))
            self.frames_written += 1
        window.release()
        memory.release()
        if self.progress is not None:
            self.progress.update(self.frames_written)

    def _filter(self, frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        shape = frame.shape
        for f in self.filters:
            try:
                out = f(frame, info)
            except (Cancelled, LatentdubError):
                raise
            except Exception as err:
                raise HookError(
                    f"frame filter {_name(f)} failed on output frame {info.index}: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.uint8:
                got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
                raise HookError(
                    f"frame filter {_name(f)} must return the frame as uint8 {shape}, got {got} on frame {info.index}"
                )
            frame = out
        return np.ascontiguousarray(frame)

    def finish(self, finalizers: Sequence[Finalizer] = ()) -> tuple[Path, dict[str, Any]]:
        """Flush, run the finalizers on the complete temporary file, then rename into place."""
        provenance: dict[str, Any] = {}
        if self.frames_written != self.job.num_frames:
            raise RuntimeError(f"{self.frames_written} of {self.job.num_frames} frames were written")

        def run_finalizers(tmp: Path) -> None:
            for i, g in enumerate(finalizers):
                if self.progress is not None:
                    self.progress.check()
                try:
                    extra = g(Path(tmp))
                except (Cancelled, LatentdubError):
                    raise
                except Exception as err:
                    raise HookError(f"finalizer {_name(g)} failed: {type(err).__name__}: {err}") from err
                if extra is not None:
                    if not isinstance(extra, Mapping):
                        raise HookError(f"finalizer {_name(g)} must return None or a mapping, got {type(extra).__name__}")
                    provenance.update(extra)
                if self.progress is not None:
                    self.progress.update(i + 1, check=False)
            # No cancel check after the last finalizer: it may have recorded the file (audit log),
            # so from here on the file appears.

        with self._timed("finalize"):
            path = self.writer.close(before_rename=run_finalizers)
        return Path(path), provenance

    def abort(self) -> None:
        self.writer.abort()

    def _timed(self, stage: str) -> Any:
        if self.timer is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.timer(stage)


# -- the runner -------------------------------------------------------------------------------
class _Stop(Exception):
    """Internal: another stage failed or the dub was cancelled; unwind quietly."""


_END = object()


class _Pipe:
    """A bounded queue whose put/get give up as soon as the run is stopping."""

    def __init__(self, stop: threading.Event) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = stop

    def put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def get(self) -> Any:
        while True:
            try:
                return self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stop from None


def render(
    job: RenderJob,
    *,
    reader: FrameReader,
    generate: Callable[[Window, Callable[[], None]], np.ndarray],
    sink: FrameSink,
    progress: DubProgress,
    finalizers: Sequence[Finalizer] = (),
    timer: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """Run pass 2 over ``job.windows``; returns the output path and the finalizers' provenance.

    ``generate(window, check)`` returns the window's composited crops; it should call
    ``check()`` between U-Net steps (it raises when the run must stop). On any error or cancellation
    every thread is stopped and joined, the partial output is deleted, and the first error (or
    :class:`Cancelled`) is raised.
    """
    stop = threading.Event()
    failures: list[BaseException] = []
    to_generate, to_write = _Pipe(stop), _Pipe(stop)
    timed = sink._timed if timer is None else timer

    def fail(err: BaseException) -> None:
        if not isinstance(err, _Stop):
            failures.append(err)
        stop.set()

    def source() -> None:
        try:
            with reader:
                for window in job.windows:
                    progress.check()
                    with timed("decode"):
                        loaded = reader.load(window)
                    to_generate.put(loaded)  # waiting here is the generator's time, not decoding
            to_generate.put(_END)
        except BaseException as err:
            fail(err)

    def write() -> None:
        try:
            while (window := to_write.get()) is not _END:
                progress.check()
                sink.write(window)
        except BaseException as err:
            fail(err)

    def check() -> None:
        progress.check()
        if stop.is_set():
            raise _Stop

    threads = [
        threading.Thread(target=source, name="latentdub-source", daemon=True),
        threading.Thread(target=write, name="latentdub-sink", daemon=True),
    ]
    try:
        progress.start("dub", job.num_frames, frames=True)  # may raise: cancelled, or a bad callback
    except BaseException:
        sink.abort()
        raise
    for t in threads:
        t.start()
    try:
        while (window := to_generate.get()) is not _END:
            if window.dub:
                with timed("diffusion"):
                    window.generated = generate(window, check)
                window.crops = None
            to_write.put(window)
            check()
        to_write.put(_END)
    except BaseException as err:
        fail(err)
    finally:
        for t in threads:
            _join(t, stop)

    if not failures and progress.cancelled:
        failures.append(Cancelled("the dub was cancelled; nothing was written"))
    if failures:
        sink.abort()
        raise _first_cause(failures)
    progress.finish()
    try:
        progress.start("finalize", max(len(finalizers), 1))
        path, provenance = sink.finish(finalizers)
    except BaseException:
        sink.abort()
        raise
    progress.finish()
    return path, provenance


def _join(thread: threading.Thread, stop: threading.Event) -> None:
    """Join, but let Ctrl-C through: a KeyboardInterrupt stops the run and joins again."""
    while thread.is_alive():
        try:
            thread.join(timeout=0.2)
        except KeyboardInterrupt:
            stop.set()
            thread.join()
            raise


def _first_cause(failures: list[BaseException]) -> BaseException:
    """The error to report: a real failure beats the cancellation it may have caused."""
    for err in failures:
        if not isinstance(err, Cancelled):
            return err
    return failures[0]


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _to_video(latents: torch.Tensor) -> torch.Tensor:
    """(F, C, h, w) → (1, C, F, h, w)."""
    return latents.permute(1, 0, 2, 3).unsqueeze(0)


def _to_frames(latents: torch.Tensor) -> torch.Tensor:
    """(1, C, F, h, w) → (F, C, h, w)."""
    return latents.squeeze(0).permute(1, 0, 2, 3)


def _deep_cache() -> Any:
    from latentdub.models.unet import DeepCache

    return DeepCache(interval=3)

