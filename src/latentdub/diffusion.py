"""Pass 2's diffusion: the one window-group loop, and the render stage built on it.

:class:`WindowDiffusion` runs B windows of F frames through one loop, in the shape of
diffusers' ``StableDiffusionPipeline.__call__`` (encode the conditioning, one scheduler loop
with classifier-free guidance, decode):

1. VAE encode: masked and reference frames, the posterior *sampled* (as the official
   ``latentsync/pipelines/lipsync_pipeline.py`` does, not its mode);
2. the denoising loop: DDIM (or the opt-in DPM-Solver++) with audio CFG — the unconditional
   branch is all-zero audio, both branches in one batch — and DeepCache;
3. VAE decode, then the official composite: generated pixels in the mouth hole, the aligned
   original elsewhere, rounded to uint8.

*How* it runs is an :class:`~latentdub.acceleration.Acceleration`, never a second loop: the
reference setting is groups of one, eager steps, diffusers' own sampler step and the composite
on the host; the optimized one keeps everything on the device, skips the per-step host sync
and may batch windows, replay CUDA graphs or compile. On a CPU in float32 both give the same
bits (tests/test_acceleration.py).

Randomness does not depend on scheduling: a window's posterior noise comes from a generator
seeded by ``(seed, the window's first output frame)`` and is drawn in fixed chunks, so running
windows in another order or grouping gives the same frames. The official code draws the same
distribution from one sequential generator, so for a given seed the noise differs from the
official run (not its statistics). The initial latent noise is, as official, one tensor shared
by every frame of the video.

:class:`DiffusionStage` is the generator stage of :func:`~latentdub.render.render`: it feeds
window groups through the loop and hands the sink one result per window, pasted back on the
device (:class:`~latentdub.face.paste.PastedWindow`) or crops for the sink to paste with OpenCV
(:class:`~latentdub.face.paste.CropsToPaste`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from latentdub.acceleration import Acceleration, UNetSteps
from latentdub.face.mask import blend_weights
from latentdub.face.paste import CropsToPaste, paste_back_batch
from latentdub.models.scheduler import ddim_step, sync_free_ddim
from latentdub.models.vae import VAE_SCALING
from latentdub.render import WINDOW, GeneratedWindow, RenderJob, Window


class WindowDiffusion:
    """The diffusion of one dub: ``steps``, ``guidance``, ``deepcache`` and ``seed`` are its
    options, ``scheduler`` its own instance (never shared between dubs: ``set_timesteps``
    writes into it), ``acceleration`` how it runs (default: the optimized settings).
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
        acceleration: Acceleration | None = None,
        unet_steps: UNetSteps | None = None,
        occluder_conditioning: bool = True,
    ) -> None:
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        # Occluders given to generate() stay visible in the masked image the U-Net is
        # conditioned on (False: only the composite keeps them; for measuring what it changes).
        self.occluder_conditioning = occluder_conditioning
        self.device, self.dtype = device, dtype
        self.steps, self.guidance, self.deepcache, self.seed = steps, guidance, deepcache, seed
        self.vae_batch = vae_batch  # the posterior-noise chunk: fixed, so results never depend on batching
        self.accel = acceleration or Acceleration()
        self.unet_steps = unet_steps or UNetSteps(unet)
        # Official: ONE noise tensor, repeated over every frame of every window. Drawn on the
        # CPU so a seed gives the same noise on every device.
        noise = torch.randn(
            (1, 4, 1, *latent_mask.shape[-2:]),
            generator=torch.Generator(device="cpu").manual_seed(seed),
            dtype=torch.float32,
        )
        # Made once per dub, on the device.
        self._noise = noise.to(device, dtype)
        self._mask = pixel_mask.to(device, torch.float32)
        self._keep_out = 1 - self._mask
        self._latent_mask = latent_mask.to(device, dtype)
        self._grid: tuple[list[int], torch.Tensor] | None = None

    @property
    def resolution(self) -> int:
        return int(self._mask.shape[-1])

    def window_rng(self, key: int | tuple[int, ...]) -> torch.Generator:
        """The posterior-sampling generator of a window: ``key`` is its first output frame
        (and, for a second face in the same frames, its lane)."""
        parts = [key] if isinstance(key, int) else list(key)
        state = np.random.SeedSequence([self.seed, *parts]).generate_state(2, dtype=np.uint32)
        derived = (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(derived)

    def __call__(
        self, crops: np.ndarray, audio_tokens: torch.Tensor, *, start: int, check: Callable[[], None] | None = None
    ) -> np.ndarray:
        """One window: composited crops (F, res, res, 3) uint8 on the host."""
        return self.generate([crops], [audio_tokens], [start], check=check).cpu().numpy()

    @torch.inference_mode()
    def generate(
        self,
        crops: Sequence[np.ndarray],
        audio_tokens: Sequence[torch.Tensor],
        starts: Sequence[int | tuple[int, ...]],
        *,
        accel: Acceleration | None = None,
        steps: UNetSteps | None = None,
        check: Callable[[], None] | None = None,
        occluders: Sequence[np.ndarray | None] | None = None,
    ) -> torch.Tensor:
        """Composited crops of B windows of F frames each, (B·F, res, res, 3) uint8.

        On the device with ``accel.device_composite``, else on the host. ``check`` is called
        between U-Net steps and raises to stop (cancellation). ``accel`` / ``steps`` override
        the dub's acceleration and U-Net step runner. ``occluders`` (per window, (F, res, res)
        float32 in [0, 1] or None) are kept from the original: shown to the model in the masked
        image and composited back over the generated pixels.
        """
        accel = accel or self.accel
        b = len(crops)
        if not b or any(c.shape != crops[0].shape for c in crops) or len(audio_tokens) != b or len(starts) != b:
            raise ValueError("generate needs windows of one shape, with one token block and start each")
        frames = int(crops[0].shape[0])
        pixels = self._upload(crops, accel.pinned_memory).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        keep = self._keep(occluders, b, frames)
        masked = pixels * keep
        official = masked if keep is self._mask or self.occluder_conditioning else pixels * self._mask
        condition, audio = self._condition(official, pixels, audio_tokens, starts, frames, accel)
        latents = self._denoise(condition, audio, b, frames, accel, steps or self.unet_steps, check)
        h, w = latents.shape[-2:]
        decoded = self._decode(latents.permute(0, 2, 1, 3, 4).reshape(b * frames, 4, h, w) / VAE_SCALING, accel)
        keep_out = self._keep_out if keep is self._mask else 1 - keep
        if not accel.device_composite:  # the reference: float32 crops back to the host first
            decoded, keep_out, masked = decoded.cpu(), keep_out.cpu(), masked.cpu()
        composite = decoded.float() * keep_out + masked  # the official composite
        out = composite.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous()

    def _keep(self, occluders: Sequence[np.ndarray | None] | None, b: int, frames: int) -> torch.Tensor:
        """The pixels kept from the original: the official mask, or per frame its union with
        the occluders (B·F, 1, res, res)."""
        if not occluders or all(o is None for o in occluders):
            return self._mask
        if len(occluders) != b:
            raise ValueError(f"{len(occluders)} occluder masks for {b} windows")
        keep = self._mask.expand(b * frames, -1, -1, -1).clone()
        for i, occ in enumerate(occluders):
            if occ is not None:
                part = torch.from_numpy(np.ascontiguousarray(occ, dtype=np.float32)).to(self.device)
                keep[i * frames : (i + 1) * frames, 0] = torch.maximum(keep[i * frames : (i + 1) * frames, 0], part)
        return keep

    # -- the named steps ---------------------------------------------------------------------
    def _condition(
        self,
        masked: torch.Tensor,
        pixels: torch.Tensor,
        audio_tokens: Sequence[torch.Tensor],
        starts: Sequence[int | tuple[int, ...]],
        frames: int,
        accel: Acceleration,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net's conditioning channels (mask, masked, reference latents) and its audio,
        both doubled for CFG as [unconditional × B, audio × B] (batch-major, as it wants)."""
        b = len(starts)
        latents_in = self._encode(masked, pixels, starts, frames, accel) * VAE_SCALING
        h, w = latents_in.shape[-2:]
        per_window = latents_in.view(b, 2, frames, 4, h, w)  # [masked frames, reference frames]
        masked_latents = per_window[:, 0].permute(0, 2, 1, 3, 4)
        ref_latents = per_window[:, 1].permute(0, 2, 1, 3, 4)
        latent_mask = self._latent_mask.expand(b, 1, frames, -1, -1)
        condition = torch.cat([latent_mask, masked_latents, ref_latents], dim=1)
        audio = torch.cat([t.to(self.device, self.dtype) for t in audio_tokens])  # (B·F, L, D), window-major
        if self.guidance > 1.0:
            audio = torch.cat([torch.zeros_like(audio), audio])
            condition = torch.cat([condition, condition])
        return condition, audio

    def _denoise(
        self,
        condition: torch.Tensor,
        audio: torch.Tensor,
        b: int,
        frames: int,
        accel: Acceleration,
        runner: UNetSteps,
        check: Callable[[], None] | None,
    ) -> torch.Tensor:
        """The one sampler loop: CFG, DeepCache through the step session, the scheduler's step."""
        scheduler, dtype = self.scheduler, self.dtype
        use_cfg = self.guidance > 1.0
        sync_free = accel.sync_free_sampler and sync_free_ddim(scheduler)
        host_steps: list[int] = []
        if sync_free:  # the grid on the host: no device→host read per step
            host_steps, timesteps = self._host_grid()
        else:
            scheduler.set_timesteps(self.steps, device=self.device)
            timesteps = scheduler.timesteps
        h, w = condition.shape[-2:]
        latents = self._noise.expand(b, 4, frames, -1, -1) * scheduler.init_noise_sigma
        model_shape = (condition.shape[0], 4 + condition.shape[1], frames, h, w)
        session = runner.session(accel, audio, model_shape, deepcache=self.deepcache, fixed=frames == WINDOW)
        try:
            for i, t in enumerate(timesteps):
                if check is not None:
                    check()
                model_in = torch.cat([latents, latents]) if use_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                eps = session(torch.cat([model_in, condition], dim=1), t)
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
        return latents

    def _encode(
        self,
        masked: torch.Tensor,
        pixels: torch.Tensor,
        starts: Sequence[int | tuple[int, ...]],
        frames: int,
        accel: Acceleration,
    ) -> torch.Tensor:
        """Posterior samples (B·2F, 4, h, w): per window its F masked then F reference frames.

        The encoder runs ``accel.vae_batch`` images per call over all windows; the noise is
        drawn per window from its own generator in chunks of ``self.vae_batch`` — exactly what
        ``posterior.sample(generator)`` draws for those chunks — so each window gets the same
        samples alone or batched.
        """
        from diffusers.utils.torch_utils import randn_tensor

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

    def _decode(self, latents: torch.Tensor, accel: Acceleration) -> torch.Tensor:
        """Decoded pixels (N, 3, res, res) in the model dtype, on the device."""
        out = []
        for chunk in latents.split(accel.vae_batch):
            if accel.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            out.append(self.vae.decode(chunk).sample)
        return torch.cat(out)

    # -- device plumbing ---------------------------------------------------------------------
    def _host_grid(self) -> tuple[list[int], torch.Tensor]:
        """The dub's DDIM timesteps as host ints and as one device tensor (made once)."""
        if self._grid is None:
            self.scheduler.set_timesteps(self.steps)
            host = [int(v) for v in self.scheduler.timesteps.tolist()]
            grid = torch.tensor(host, dtype=torch.int64)
            if self.device.type == "cuda":
                grid = grid.pin_memory().to(self.device, non_blocking=True)
            self._grid = (host, grid)
        return self._grid

    def _upload(self, crops: Sequence[np.ndarray], pinned: bool) -> torch.Tensor:
        """(B·F, res, res, 3) uint8 on the device; through page-locked memory when ``pinned``
        (then the copy is queued, not waited for)."""
        if self.device.type != "cuda":
            host = torch.from_numpy(crops[0] if len(crops) == 1 else np.concatenate(crops))
            return host.to(self.device)
        n = crops[0].shape[0]
        staging = torch.empty((len(crops) * n, *crops[0].shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        view = staging.numpy()
        for i, c in enumerate(crops):
            view[i * n : (i + 1) * n] = c
        return staging.to(self.device, non_blocking=pinned)


class DiffusionStage:
    """The generator stage of :func:`~latentdub.render.render` for one dub.

    Runs :meth:`WindowDiffusion.generate` on each group of windows and hands the sink one
    result per window: the mouth blended into the frame boxes on the device
    (``device_paste``), or the composited crops for the sink to paste with OpenCV (copied to
    the host through a pinned buffer on a side stream when ``pinned_memory``).
    """

    def __init__(
        self, diffusion: WindowDiffusion, job: RenderJob, tokens: torch.Tensor | Sequence[torch.Tensor]
    ) -> None:
        self.diffusion, self.job = diffusion, job
        # One token stream per audio source (Lane.audio): the dub's first.
        self.tokens = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
        self.accel = diffusion.accel
        self.batch = self.accel.window_batch  # full windows per call (render() groups them)
        cuda = diffusion.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(diffusion.device) if cuda and self.accel.pinned_memory else None

    def __call__(self, windows: Sequence[Window], check: Callable[[], None]) -> list[GeneratedWindow]:
        # Every (window, lane) is one item of the loop; a window's lanes share its U-Net calls.
        items = [(w, n, lane) for w in windows for n, lane in enumerate(w.lanes)]
        for w in windows:
            if len(w.crops) != len(w.lanes) or not w.lanes:
                raise RuntimeError(f"window {w.start}–{w.stop} has no crops for its lanes")
        sizes = {w.size for w in windows}
        # Lanes share a call only where calls are batched at all (the reference runs one each).
        groups = [items] if len(sizes) == 1 and self.batch > 1 else [[it] for it in items]
        parts: dict[tuple[int, int], GeneratedWindow] = {}
        res = self.diffusion.resolution
        for group in groups:
            composites = self.diffusion.generate(
                [w.crops[n] for w, n, _ in group],
                [self.tokens[self.job.lanes[lane].audio_at(w.start)][w.start : w.stop] for w, _, lane in group],
                [self.noise_key(w.start, lane) for w, _, lane in group],
                check=check,
                occluders=[occluder_masks(w.occlusion[n], res) if w.occlusion else None for w, n, _ in group],
            )
            offset = 0
            for w, n, lane in group:
                part = composites[offset : offset + w.size]
                offset += w.size
                matrices = self.job.lanes[lane].matrices[self.job.timeline.source_index[w.start : w.stop]]
                weights = paste_weights(w.occlusion[n], res) if w.occlusion else None
                if self.accel.device_paste:
                    parts[(w.start, n)] = paste_back_batch(
                        w.frames, part, matrices, pin_memory=self.accel.pinned_memory, copy_stream=self.copy_stream,
                        frame_weights=weights,
                    )
                else:
                    parts[(w.start, n)] = self._to_host(part, matrices, weights)
        return [self.job.layered(w, [parts[(w.start, n)] for n in range(len(w.lanes))]) for w in windows]

    @staticmethod
    def noise_key(start: int, lane: int) -> int | tuple[int, int]:
        """The posterior-noise key of a window: its first frame (lane 0, as a one-face dub) and
        the lane for the others, so two faces in one window never share noise."""
        return start if lane == 0 else (start, lane)

    def _to_host(
        self, part: torch.Tensor, matrices: np.ndarray, weights: list[np.ndarray | None] | None = None
    ) -> CropsToPaste:
        if part.device.type != "cuda" or not self.accel.pinned_memory:
            return CropsToPaste(part.cpu().numpy(), matrices, weights=weights)
        host = torch.empty(part.shape, dtype=torch.uint8, pin_memory=True)
        ready = torch.cuda.Event()
        stream = self.copy_stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(part.device))
        with torch.cuda.stream(stream):
            host.copy_(part, non_blocking=True)
            part.record_stream(stream)
            ready.record(stream)
        return CropsToPaste(host, matrices, ready, weights=weights)


def occluder_masks(frames: Sequence[Any], resolution: int) -> np.ndarray | None:
    """A window's occluder masks (F, res, res) float32 from its OccluderFrames (None: none)."""
    masks = [f.soft_mask(resolution) for f in frames]
    if all(m is None for m in masks):
        return None
    zero = np.zeros((resolution, resolution), np.float32)
    return np.stack([zero if m is None else m for m in masks])


def paste_weights(frames: Sequence[Any], resolution: int) -> list[np.ndarray | None] | None:
    """Per frame the paste-back weights with the occluder cut out and the pass-through fade
    (None per frame: the default weights; None: the default everywhere)."""
    base = blend_weights(resolution)
    weights = [f.paste_weights(base) for f in frames]
    return None if all(w is None for w in weights) else weights
