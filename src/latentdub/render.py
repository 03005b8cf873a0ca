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

Two ways to run the generator (:mod:`latentdub.acceleration`): the *reference* path calls
:class:`WindowGenerator` per window and the sink pastes with OpenCV; the *optimized* path
(:class:`AcceleratedGenerate`) keeps the crops on the device from upload to paste-back, runs
several full windows per U-Net/VAE call where that pays, and hands the sink either the crops or
the already blended boxes (:class:`~latentdub.face.paste.PastedWindow`). Both give the same frames.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentdub import memory
from latentdub.errors import Cancelled, HookError, LatentdubError
from latentdub.progress import DubProgress
from latentdub.runs import runs
from latentdub.timeline import Timeline

if TYPE_CHECKING:
    from latentdub.acceleration import Acceleration, UNetSteps

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
    # (F, res, res, 3) uint8 composited crops (or anything indexable like them), or a
    # PastedWindow whose boxes the device already blended (optimized path)
    generated: Any = None

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

    # -- the optimized path (latentdub.acceleration) ------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        crops: Sequence[np.ndarray],
        audio_tokens: Sequence[torch.Tensor],
        starts: Sequence[int],
        *,
        accel: Acceleration,
        steps: UNetSteps | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Composited crops of B windows of F frames each, (B·F, res, res, 3) uint8 on the device.

        The same computation as :meth:`__call__` per window, but the windows share every
        U-Net and VAE call and nothing leaves the device. Each window's posterior noise comes
        from its own :meth:`window_rng`, drawn in the chunks :meth:`__call__` draws, so a
        window's frames do not depend on its batch.
        """
        from latentdub.acceleration import UNetSteps, ddim_step, sync_free_ddim
        from latentdub.models.vae import VAE_SCALING

        device, dtype = self.device, self.dtype
        b = len(crops)
        frames = int(crops[0].shape[0])
        if not b or any(c.shape != crops[0].shape for c in crops) or len(audio_tokens) != b or len(starts) != b:
            raise ValueError("generate needs windows of one shape, with one token block and start each")
        mask, keep_out = self._device_masks()
        pixels = self._upload(crops, accel.pinned_memory).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        masked = pixels * mask

        latents_in = self._encode_windows(masked, pixels, starts, frames, accel) * VAE_SCALING
        h, w = latents_in.shape[-2:]
        per_window = latents_in.view(b, 2, frames, 4, h, w)  # [masked frames, reference frames]
        masked_latents = per_window[:, 0].permute(0, 2, 1, 3, 4)
        ref_latents = per_window[:, 1].permute(0, 2, 1, 3, 4)
        latent_mask = self._device_latent_mask().expand(b, 1, frames, -1, -1)

        use_cfg = self.guidance > 1.0
        audio = torch.cat([t.to(device, dtype) for t in audio_tokens])  # (B·F, L, D), window-major
        condition = torch.cat([latent_mask, masked_latents, ref_latents], dim=1)
        if use_cfg:  # [unconditional × B, audio × B], batch-major as the U-Net wants (b f)
            audio = torch.cat([torch.zeros_like(audio), audio])
            condition = torch.cat([condition, condition])

        scheduler = self.scheduler
        sync_free = accel.sync_free_sampler and sync_free_ddim(scheduler)
        if sync_free:  # the grid on the host: no device→host read per step
            scheduler = self._own_scheduler()
            scheduler.set_timesteps(self.steps)
            host_steps: list[int] = [int(v) for v in scheduler.timesteps.tolist()]
            timesteps = list(self._device_timesteps(tuple(host_steps)))
        else:
            scheduler.set_timesteps(self.steps, device=device)
            timesteps = list(scheduler.timesteps)
        latents = self._device_noise().expand(b, 4, frames, -1, -1) * scheduler.init_noise_sigma
        model_shape = (condition.shape[0], 4 + condition.shape[1], frames, h, w)
        runner = steps if steps is not None else UNetSteps(self.unet)
        session = runner.session(accel, audio, model_shape, deepcache=self.deepcache, fixed=frames == WINDOW)
        try:
            for i, t in enumerate(timesteps):
                if check is not None:
                    check()
                model_in = torch.cat([latents, latents]) if use_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                model_in = torch.cat([model_in, condition], dim=1)
                eps = session(model_in, t)
                if use_cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + self.guidance * (cond - uncond)
                if sync_free:
                    latents = ddim_step(scheduler, eps.float(), host_steps[i], latents.float(), self.steps).to(dtype)
                else:
                    latents = scheduler.step(eps.float(), t, latents.float()).prev_sample.to(dtype)
        finally:
            session.close()
        if check is not None:
            check()

        decoded = self._decode_windows(latents.permute(0, 2, 1, 3, 4).reshape(b * frames, 4, h, w) / VAE_SCALING, accel)
        composite = decoded.float() * keep_out + masked  # the official composite, on the device
        out = composite.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous()

    def _own_scheduler(self) -> Any:
        """A shallow copy of the (possibly shared) DDIM scheduler: ``set_timesteps`` then changes
        only this dub's grid (the noise schedule tensors are shared, read-only)."""
        if getattr(self, "_scheduler_copy", None) is None:
            import copy

            self._scheduler_copy = copy.copy(self.scheduler)
        return self._scheduler_copy

    def _device_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 − mask) float32 on the device, made once per dub."""
        if getattr(self, "_masks", None) is None:
            mask = self.pixel_mask.to(self.device, torch.float32)
            self._masks = (mask, 1 - mask)
        return self._masks

    def _device_latent_mask(self) -> torch.Tensor:
        if getattr(self, "_latent_mask_dev", None) is None:
            self._latent_mask_dev = self.latent_mask.to(self.device, self.dtype)
        return self._latent_mask_dev

    def _device_noise(self) -> torch.Tensor:
        if getattr(self, "_noise_dev", None) is None:
            self._noise_dev = self.noise.to(self.device, self.dtype)
        return self._noise_dev

    def _device_timesteps(self, host_steps: tuple[int, ...]) -> torch.Tensor:
        cached = getattr(self, "_timesteps_dev", None)
        if cached is None or cached[0] != host_steps:
            grid = torch.tensor(host_steps, dtype=torch.int64)
            if self.device.type == "cuda":
                grid = grid.pin_memory().to(self.device, non_blocking=True)
            self._timesteps_dev = (host_steps, grid)
        return self._timesteps_dev[1]

    def _upload(self, crops: Sequence[np.ndarray], pinned: bool) -> torch.Tensor:
        """(B·F, res, res, 3) uint8 on the device; through page-locked memory when ``pinned``
        (then the copy is queued, not waited for)."""
        if self.device.type != "cuda":
            host = torch.from_numpy(crops[0] if len(crops) == 1 else np.concatenate(crops))
            return host.to(self.device)
        n = crops[0].shape[0]
        host = torch.empty((len(crops) * n, *crops[0].shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        view = host.numpy()
        for i, c in enumerate(crops):
            view[i * n : (i + 1) * n] = c
        return host.to(self.device, non_blocking=pinned)

    def _encode_windows(
        self, masked: torch.Tensor, pixels: torch.Tensor, starts: Sequence[int], frames: int, accel: Acceleration
    ) -> torch.Tensor:
        """Posterior samples (B·2F, 4, h, w): per window its F masked then F reference frames.

        The encoder runs ``accel.vae_batch`` images per call over all windows; the noise is
        drawn per window from its own generator in :meth:`_vae_encode`'s chunks of
        ``self.vae_batch``, so each window gets exactly the samples it gets alone.
        """
        from diffusers.utils.torch_utils import randn_tensor

        # torch.cat keeps the crops' NHWC memory (they are permuted uint8 frames), as the
        # reference's cat does: the convolutions then take the same code path.
        parts = []
        for i in range(len(starts)):
            window = slice(i * frames, (i + 1) * frames)
            parts += [masked[window], pixels[window]]
        images = torch.cat(parts)
        means, stds = [], []
        for chunk in images.split(accel.vae_batch):
            chunk = chunk.to(self.device, self.dtype)
            if accel.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            posterior = self.vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        mean, std = torch.cat(means), torch.cat(stds)
        out = []
        per = 2 * frames
        for i, start in enumerate(starts):
            rng = self.window_rng(start)
            for a in range(i * per, (i + 1) * per, self.vae_batch):
                z = min(a + self.vae_batch, (i + 1) * per)
                m, sd = mean[a:z], std[a:z]
                out.append(m + sd * randn_tensor(m.shape, generator=rng, device=m.device, dtype=m.dtype))
        return torch.cat(out)

    def _decode_windows(self, latents: torch.Tensor, accel: Acceleration) -> torch.Tensor:
        """Decoded pixels (N, 3, res, res) in the model dtype, on the device."""
        out = []
        for chunk in latents.split(accel.vae_batch):
            if accel.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            out.append(self.vae.decode(chunk).sample)
        return torch.cat(out)


class PendingCrops:
    """Composited crops on their way to the host (a queued copy); indexing waits for it."""

    def __init__(self, host: torch.Tensor, ready: Any = None) -> None:
        self._host_tensor, self._ready = host, ready
        self._host: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._host_tensor.shape[0])

    def __getitem__(self, j: int) -> np.ndarray:
        if self._host is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._host = self._host_tensor.numpy()
        return self._host[j]


class AcceleratedGenerate:
    """The optimized generator stage: ``generate_many`` for :func:`render`.

    Runs :meth:`WindowGenerator.generate` on a group of windows and hands each window to the
    sink either as a :class:`~latentdub.face.paste.PastedWindow` (``device_paste``: the mouth
    was blended into the frame boxes on the device) or as its composited crops (copied to the
    host through a pinned buffer on CUDA, then pasted by the sink with OpenCV).
    """

    def __init__(
        self,
        generator: WindowGenerator,
        job: RenderJob,
        tokens: torch.Tensor,
        accel: Acceleration,
        steps: UNetSteps | None = None,
    ) -> None:
        self.generator, self.job, self.tokens, self.accel, self.steps = generator, job, tokens, accel, steps
        device = generator.device
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda and accel.pinned_memory else None

    def __call__(self, windows: Sequence[Window], check: Callable[[], None]) -> list[Any]:
        for w in windows:
            if w.crops is None:
                raise RuntimeError(f"window {w.start}–{w.stop} has no crops")
        composites = self.generator.generate(
            [w.crops for w in windows],  # type: ignore[misc]
            [self.tokens[w.start : w.stop] for w in windows],
            [w.start for w in windows],
            accel=self.accel,
            steps=self.steps,
            check=check,
        )
        results: list[Any] = []
        offset = 0
        for w in windows:
            part = composites[offset : offset + w.size]
            offset += w.size
            if self.accel.device_paste:
                from latentdub.face.paste import paste_back_batch

                src = self.job.timeline.source_index[w.start : w.stop]
                results.append(
                    paste_back_batch(
                        w.frames, part, self.job.matrices[src],
                        pin_memory=self.accel.pinned_memory, copy_stream=self.copy_stream,
                    )
                )
            else:
                results.append(self._to_host(part))
        return results

    def _to_host(self, part: torch.Tensor) -> Any:
        if part.device.type != "cuda":
            return part.cpu().numpy()
        if not self.accel.pinned_memory:
            return part.cpu().numpy()
        host = torch.empty(part.shape, dtype=torch.uint8, pin_memory=True)
        ready = torch.cuda.Event()
        stream = self.copy_stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(part.device))
        with torch.cuda.stream(stream):
            host.copy_(part, non_blocking=True)
            part.record_stream(stream)
            ready.record(stream)
        return PendingCrops(host, ready)


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
                generated = window.generated
                with self._timed("paste_back"):
                    if hasattr(generated, "apply"):  # blended on the device: write the box in
                        frame = generated.apply(j, frame)
                    else:
                        frame = paste_back(frame, generated[j], job.matrices[src])
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
    generate: Callable[[Window, Callable[[], None]], Any] | None = None,
    sink: FrameSink,
    progress: DubProgress,
    finalizers: Sequence[Finalizer] = (),
    timer: Any = None,
    generate_many: Callable[[Sequence[Window], Callable[[], None]], Sequence[Any]] | None = None,
    batch: int = 1,
) -> tuple[Path, dict[str, Any]]:
    """Run pass 2 over ``job.windows``; returns the output path and the finalizers' provenance.

    ``generate(window, check)`` returns the window's composited crops; it should call
    ``check()`` between U-Net steps (it raises when the run must stop). Alternatively
    ``generate_many(windows, check)`` gets up to ``batch`` consecutive full-size
    (:data:`WINDOW`-frame) dubbed windows at once — a short window, or one followed by a face
    change, goes alone, never padded — and returns one result per window. On any error or
    cancellation every thread is stopped and joined, the partial output is deleted, and the
    first error (or :class:`Cancelled`) is raised.
    """
    if generate is None and generate_many is None:
        raise ValueError("render() needs generate or generate_many")
    batch = max(1, int(batch)) if generate_many is not None else 1
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
    pending: list[Window] = []  # full dubbed windows waiting for the rest of their group

    def run_group(group: list[Window]) -> None:
        with timed("diffusion"):
            if generate_many is not None:
                results = list(generate_many(group, check))
            else:
                assert generate is not None
                results = [generate(group[0], check)]
        if len(results) != len(group):
            raise RuntimeError(f"generate_many returned {len(results)} results for {len(group)} windows")
        for w, result in zip(group, results, strict=True):
            w.generated = result
            w.crops = None
            to_write.put(w)
        check()

    try:
        while (window := to_generate.get()) is not _END:
            if window.dub and batch > 1 and window.size == WINDOW:
                pending.append(window)
                if len(pending) == batch:
                    run_group(pending)
                    pending = []
                continue
            if pending:  # a face change or a short window ends the group
                run_group(pending)
                pending = []
            if window.dub:
                run_group([window])
            else:
                to_write.put(window)
                check()
        if pending:
            run_group(pending)
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

