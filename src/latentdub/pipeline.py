"""The dubbing pipeline: video + new speech in, the same video with a new mouth out.

:meth:`LipSyncPipeline.dub` reads as the steps it runs, each reported as a progress stage:

1. ``read``: the inputs, probed and decoded once (:func:`read_inputs`, no model needed);
2. ``fit``: fit the new audio to the picture (``fit = none|stretch|align``);
3. ``faces``: pass 1 over the video: find, track and choose the face (small numbers only);
4. plan the output timeline (length policy: which source frame is shown when);
5. ``audio_features``: Whisper over the whole track, tokens at each frame's real time;
6. ``dub``: pass 2, the render engine (:mod:`latentdub.render`) with the diffusion stage
   (:mod:`latentdub.diffusion`): decode + align → diffusion →
   paste back → frame filters → encode, streamed through bounded queues;
7. ``finalize``: finalizers on the finished temporary file, then the atomic rename.

Nothing holds all frames: memory is set by the window size and the queue depths, so a
10-minute video needs about what a 10-second one does.

How pass 2 runs is a runtime setting of the pipeline, not a dub option, since it does not
change the frames: ``pipe.acceleration = "optimized"`` (the default: crops kept on the device,
batched windows, device paste-back, CUDA graphs where they pay) or ``"reference"`` (the plain
engine), or an :class:`~latentdub.acceleration.Acceleration` — see :mod:`latentdub.acceleration`.

Official behaviours kept (``latentsync/pipelines/lipsync_pipeline.py``, ``scripts/inference.py``):
one Gaussian noise tensor shared by every frame of the whole video, the VAE posterior *sampled* (not its mode), reference latents = the current
unmasked frame, the unconditional CFG branch = all-zero audio, both branches in one batch,
DDIM 20 steps / guidance 1.5 / seed 1247 / DeepCache interval 3. One documented deviation:
each window's posterior samples come from a generator seeded by (seed, first frame), so the
result does not depend on how windows are scheduled (see :mod:`latentdub.diffusion`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdub import memory
from latentdub.diffusion import DiffusionStage, WindowDiffusion
from latentdub.errors import InputError
from latentdub.files import sha256_file
from latentdub.hooks import Finalizer, FrameFilter
from latentdub.lanes import LanePlan, plan_lanes
from latentdub.media.writer import check_encoder
from latentdub.options import DubOptions
from latentdub.progress import CancelToken, DubProgress, ProgressCallback
from latentdub.provenance.dub import DubProvenance, ProvenanceSettings
from latentdub.render import WINDOW, FrameReader, FrameSink, RenderJob, Window, plan_windows, render
from latentdub.runs import runs
from latentdub.timeline import Timeline, length_changes, plan_timeline

log = logging.getLogger(__name__)

MIN_AUDIO_S = 0.5
RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS (smoke-test model): the output is not a real dub"
OCCLUDED_REASON = "mouth covered (occlusion)"
NO_FACE_WARNING = "the selected face was not found on any frame: the video passes through undubbed"

__all__ = [
    "WINDOW",
    "DubInputs",
    "DubOptions",
    "DubResult",
    "LipSyncPipeline",
    "Window",
    "plan_windows",
    "read_inputs",
]


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
    encoder: str | None = None  # the FFmpeg encoder that wrote the video (libx264 / h264_nvenc)
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # filled in by finalizers
    # Per dubbed face track: its dubbed output ranges and how they were chosen (latentdub.lanes).
    tracks: list[dict[str, Any]] = field(default_factory=list)
    silence: dict[str, Any] | None = None  # what silence=auto passed through or generated from silence
    speakers: dict[str, Any] | None = None  # who speaks when in the original (face=auto)
    # occlusion=auto: the output frames where something covered a dubbed face, and those that
    # passed through because the mouth was mostly covered (latentdub.occlusion)
    occlusion: dict[str, Any] | None = None

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
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._totals[stage] = self._totals.get(stage, 0.0) + seconds

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self._totals.items()}


@dataclass
class DubInputs:
    """The inputs of one dub, checked, probed and decoded once (before any model is needed)."""

    video: Path
    audio: Path
    output: Path
    info: Any  # media.reader.VideoInfo
    clip: Any  # media.audio_io.AudioClip, the new speech at its own rate
    video_sha256: str = ""
    audio_sha256: str = ""
    warnings: list[str] = field(default_factory=list)
    read_s: float = 0.0
    # Pass 1 made before the model loaded (the CLI does so to check --segments' tracks first).
    analysis: Any = None  # face.analysis.FaceAnalysis of this video, or None


def read_inputs(video: str | Path, audio: str | Path, output: str | Path) -> DubInputs:
    """Check the output location, probe the video and decode the new speech.

    Every problem is an :class:`InputError` that names the file, and it takes a second, so the
    CLI runs this before it loads a model. Stale partial files of an earlier killed dub to the
    same output are removed here.
    """
    from latentdub.files import check_output
    from latentdub.media.audio_io import MAX_AUDIO_S, load_audio
    from latentdub.media.reader import check_video, probe_video
    from latentdub.media.writer import remove_stale_partials

    start = time.perf_counter()
    video, audio, output = Path(video), Path(audio), Path(output)
    check_output(output, video, audio)
    info = probe_video(video)
    check_video(info, video)
    clip = load_audio(audio, min_duration_s=MIN_AUDIO_S, max_duration_s=MAX_AUDIO_S)  # a bound: no audio bomb
    video_sha256, audio_sha256 = sha256_file(video), sha256_file(audio)  # for the credentials and audit
    removed = remove_stale_partials(output)
    if removed:
        log.info("removed %d stale partial file(s) of an earlier dub: %s", len(removed), ", ".join(map(str, removed)))
    return DubInputs(
        video=video,
        audio=audio,
        output=output,
        info=info,
        clip=clip,
        video_sha256=video_sha256,
        audio_sha256=audio_sha256,
        warnings=list(getattr(clip, "warnings", []) or []),
        read_s=time.perf_counter() - start,
    )


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
        acceleration: Any = None,
    ) -> None:
        from latentdub.face import Aligner, mouth_masks

        self.unet = unet.eval()
        self.vae = vae.eval()
        self.audio_encoder = audio_encoder.eval()
        self.scheduler = scheduler
        self.resolution = resolution  # the one source of truth for crop size in a dub
        self.device = device
        self.dtype = dtype
        self.model_info = model_info or {}
        self.vae_batch = vae_batch
        self.provenance = ProvenanceSettings()  # signing keys and audit log of this deployment
        self.aligner = Aligner(resolution)
        pixel_mask, latent_mask = mouth_masks(resolution)
        self.pixel_mask = torch.as_tensor(pixel_mask, dtype=torch.float32).reshape(1, 1, resolution, resolution)
        self.latent_mask = torch.as_tensor(latent_mask, dtype=torch.float32).reshape(
            1, 1, 1, *latent_mask.shape[-2:]
        )
        if self.latent_mask.shape[-1] * 8 != resolution:
            raise ValueError(f"mouth mask of {self.latent_mask.shape[-1]} latents does not fit {resolution} px")
        self._unet_steps: Any = None  # compiled step functions and CUDA graphs, kept across dubs
        self.acceleration = acceleration  # type: ignore[assignment]  # None → the optimized default
        # Who speaks (face=auto): a SyncNet with real weights when one is found, else landmarks.
        self.speaker_syncnet: Any = None  # a loaded SyncNet (models.syncnet), or None
        self.speaker_syncnet_file: Path | None = None  # loaded on the first dub that needs it
        self._syncnet_lock = threading.Lock()
        # occlusion=auto: a factory of fresh occluder detectors per face slot (None: hands and
        # appearance, latentdub.occlusion.default_detectors). Set it to add your own segmenter.
        self.occlusion_detectors: Callable[[], list[Any]] | None = None

    @property
    def acceleration(self) -> Any:
        """How pass 2 runs (an :class:`~latentdub.acceleration.Acceleration`); the frames are the same.

        Set ``"optimized"`` (default: :meth:`Acceleration.auto` for this device and resolution),
        ``"reference"``, an ``Acceleration`` or a mapping of its fields.
        """
        return self._acceleration

    @acceleration.setter
    def acceleration(self, value: Any) -> None:
        from latentdub.acceleration import Acceleration

        if value is None:
            self._acceleration = Acceleration.default_for(self.device, self.resolution)
        else:
            self._acceleration = Acceleration.parse(value, self.device, self.resolution)

    @property
    def unet_steps(self) -> Any:
        """The U-Net step runner of the optimized path (compiled functions, CUDA graphs)."""
        if self._unet_steps is None:
            from latentdub.acceleration import UNetSteps

            self._unet_steps = UNetSteps(self.unet)
        return self._unet_steps

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
        acceleration: Any = None,
    ) -> LipSyncPipeline:
        """Load ``"1.5"`` / ``"1.6"`` (local HF cache or hub download) or a local weights folder.

        ``acceleration``: see :attr:`acceleration` (default: the optimized path)."""
        from latentdub.devices import parse_device
        from latentdub.models.scheduler import build_scheduler
        from latentdub.weights import load_unet, load_vae, load_whisper, resolve_version_or_folder

        device = parse_device(device)
        dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(device)
        files = resolve_version_or_folder(version_or_dir, version=version, download=download)
        unet = load_unet(files, dtype=dtype, device=device)
        vae = load_vae(files, dtype=dtype, device=device)
        whisper = load_whisper(files, device=device)
        info = {
            "name": getattr(files, "label", None) or f"LatentSync {files.version} ({files.resolution} px)",
            "version": files.version,
            "resolution": files.resolution,
            "source": files.source,
            "random_weights": files.random_weights,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        pipe = cls(
            unet=unet,
            vae=vae,
            audio_encoder=whisper,
            scheduler=build_scheduler(),
            resolution=files.resolution,
            device=device,
            dtype=dtype,
            model_info=info,
            acceleration=acceleration,
        )
        pipe.speaker_syncnet_file = _speaker_syncnet_file(files.version, version_or_dir)
        return pipe

    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        video: str | Path,
        audio: str | Path,
        output: str | Path,
        options: DubOptions | Mapping[str, Any] | None = None,
        *,
        consent: Any = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        frame_filters: Sequence[FrameFilter] = (),
        finalizers: Sequence[Finalizer] = (),
        job_id: str | None = None,
        **overrides: Any,
    ) -> DubResult:
        """Dub ``video`` with the speech in ``audio`` and write ``output``.

        ``options`` is a :class:`DubOptions` (or a mapping of its fields); keyword ``overrides``
        change single fields and are validated the same way. ``progress`` receives a
        :class:`~latentdub.progress.ProgressEvent` per step of each stage; ``cancel`` is any
        object with ``is_set()`` (a ``threading.Event``): once set, the dub stops within
        seconds, removes its partial output and raises :class:`~latentdub.errors.Cancelled`.
        ``frame_filters`` see every output frame (upright RGB uint8) just before encoding;
        ``finalizers`` get the finished temporary file before it is renamed into place.

        Every output is watermarked (unless ``watermark=False``), signed with content
        credentials and recorded in the audit log, after the caller's own hooks. ``consent`` is
        the consent record (a ``ConsentRecord``, a mapping, JSON text or a JSON file path) and is
        required: without one the dub is refused before any work. Its id goes into the
        credentials and the audit log. ``job_id`` names the dub in the
        watermark payload (default: a new random id).
        """
        opts = DubOptions.resolve(options, overrides)
        record = _consent_record(consent)
        inputs = read_inputs(video, audio, output)
        return self.dub(
            inputs, opts, consent=record, progress=progress, cancel=cancel, frame_filters=frame_filters,
            finalizers=finalizers, job_id=job_id,
        )

    @torch.inference_mode()
    def dub(
        self,
        inputs: DubInputs,
        options: DubOptions | None = None,
        *,
        consent: Any = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        frame_filters: Sequence[FrameFilter] = (),
        finalizers: Sequence[Finalizer] = (),
        job_id: str | None = None,
    ) -> DubResult:
        """Dub already-read inputs (see :func:`read_inputs`); the steps of :meth:`__call__`."""
        opts = (options or DubOptions()).for_device(self.device.type)  # preset auto → what this device needs
        record = _consent_record(consent)
        memory.configure()
        run = DubProgress(progress, cancel)
        timer = StageTimer()
        warnings = list(inputs.warnings)
        if self.model_info.get("random_weights"):
            self._warn(warnings, RANDOM_WEIGHTS_WARNING)
        for message in opts.output_change_warnings():  # opt-in profiles that leave the official output
            self._warn(warnings, message)
        check_encoder(opts.encoder)  # an explicit nvenc that cannot open fails now, not after pass 1

        with run.stage("read"):
            timer.add("read_inputs", inputs.read_s)
            provenance = DubProvenance(
                video_sha256=inputs.video_sha256, audio_sha256=inputs.audio_sha256, options=opts.to_dict(),
                model=self.model_info, consent=record, job_id=job_id, settings=self.provenance,
            )
        with run.stage("fit"), timer("fit_audio"):
            clip, fit_report = self.fit_audio(inputs, opts)
        with timer("analyze_faces"):
            analysis = self.analyze_faces(inputs, run)
        timeline = self.plan_output(analysis, clip.duration_s, opts.length_policy)
        for message in length_changes(timeline, clip.duration_s):  # never silent about a length change
            self._warn(warnings, message)
        clip = clip.with_length(round(timeline.duration_s * clip.sample_rate))
        with timer("plan_lanes"):
            plan = self.plan_lanes(inputs, analysis, timeline, clip, opts)
        if plan.segment_mix is not None:  # segments with their own speech: heard in the output too
            clip = _mix_in(clip, plan.segment_mix)
            self._warn(warnings, "the segments' own audio files were mixed into the output's audio track")
        with run.stage("audio_features"), timer("audio_features"):
            tokens = [self.encode_audio(wave, timeline) for wave in plan.conditioning]
        job = self.plan_render(inputs, analysis, plan, timeline)
        if not any(w.dub for w in job.windows):
            if opts.if_no_face == "fail":  # before any frame is encoded: nothing to clean up
                raise InputError(f"{NO_FACE_WARNING.split(':')[0]}, and if_no_face is 'fail': nothing was written")
            self._warn(warnings, NO_FACE_WARNING)
        occlusion = self.occlusion_stage(job, opts)
        try:
            output, signed, encoder = self.render(
                job, inputs.output, clip, tokens, opts, run, timer,
                [*frame_filters, *provenance.frame_filters()],  # the watermark goes on last
                [*finalizers, *provenance.finalizers()],  # the signature covers the final bytes
                occlusion=occlusion,
            )
        finally:
            if occlusion is not None:
                occlusion.close()
        reason = plan.passthrough_reason
        dubbed = plan.dubbed
        occlusion_report = None
        if occlusion is not None:
            occlusion_report = occlusion.report(plan.dubbed)
            covered = occlusion.passed_through(plan.dubbed)
            if covered.any():  # those frames are the original's: say why, as for other pass-throughs
                reason = reason.copy()
                reason[covered] = OCCLUDED_REASON
                dubbed = plan.dubbed & ~covered

        return DubResult(
            output=str(output),
            frames=timeline.num_frames,
            dubbed_frames=int(dubbed.sum()),
            fps=_average_fps(timeline),
            duration_s=round(timeline.duration_s, 4),
            audio_duration_s=round(clip.duration_s, 4),
            width=inputs.info.width,
            height=inputs.info.height,
            passthrough_ranges=_output_passthrough_ranges(reason, timeline),
            tracks=plan.tracks,
            silence=plan.silence,
            speakers=plan.speakers,
            occlusion=occlusion_report,
            timings=timer.totals(),
            options=opts.to_dict(),
            model=dict(self.model_info),
            fit=fit_report,
            encoder=encoder,
            warnings=warnings,
            provenance={**provenance.summary(), **signed},
        )

    # -- steps --------------------------------------------------------------------------------
    def fit_audio(self, inputs: DubInputs, opts: DubOptions) -> tuple[Any, dict[str, Any] | None]:
        """``fit = stretch|align``: change the dub's timing to fit the picture."""
        clip = inputs.clip
        if opts.fit == "none":
            return clip, None
        from latentdub.audio import fit as fitting

        if opts.fit == "stretch":
            result = fitting.stretch_to_duration(clip, inputs.info.duration_s, max_ratio=opts.max_stretch)
        else:
            if not inputs.info.has_audio:
                raise InputError(
                    f"fit 'align' needs the original speech, but {inputs.video} has no audio track; use fit 'stretch'"
                )
            from latentdub.media.audio_io import load_audio

            reference = load_audio(inputs.video)
            result = fitting.align_to_reference(clip, reference, max_ratio=opts.max_stretch)
        return result.clip, result.report()

    def analyze_faces(self, inputs: DubInputs, run: DubProgress) -> Any:
        """Pass 1: detect, track and measure faces on every frame (no frames are kept)."""
        from latentdub.face import analyze_video

        if inputs.analysis is not None:  # made earlier for these inputs (see DubInputs.analysis)
            return inputs.analysis

        run.start("faces", inputs.info.num_frames, frames=True)
        analysis = analyze_video(
            inputs.video, info=inputs.info, progress=lambda done, total: run.update(done, total)
        )
        frames = len(analysis.pts)
        run.update(frames, total=frames)  # the header's count was an estimate
        run.finish()
        return analysis

    def select_face(self, analysis: Any, policy: str) -> Any:
        """Which face is dubbed on each frame under ``policy``, cut at this model's resolution."""
        from latentdub.face import select_face

        selection = select_face(analysis, policy, resolution=self.resolution)
        if selection.resolution != self.aligner.resolution:
            raise RuntimeError(
                f"face selection at {selection.resolution} px but the aligner cuts {self.aligner.resolution} px"
            )
        return selection

    def plan_lanes(self, inputs: DubInputs, analysis: Any, timeline: Timeline, clip: Any, opts: DubOptions) -> LanePlan:
        """Who is dubbed where, and with what audio (:mod:`latentdub.lanes`)."""
        original = None
        if inputs.info.has_audio and (opts.silence == "auto" or opts.face == "auto" or opts.segments):
            from latentdub.media.audio_io import load_audio

            original = load_audio(inputs.video, mono_16k=True)  # analysis only: 16 kHz mono is enough
        segments = None
        if opts.segments:
            from latentdub.segments import resolve_segments

            segments = resolve_segments(opts.segments, analysis)  # named errors before any rendering
        return plan_lanes(
            analysis, timeline, face=opts.face, silence=opts.silence, dub_wave=clip.to_mono_16k(),
            select=lambda policy: self.select_face(analysis, policy), original_audio=original, segments=segments,
            syncnet=self.speaker_scorer,
        )

    def speaker_scorer(self) -> Any:
        """The SyncNet scorer of who speaks (``face=auto`` with several faces), or None: landmarks."""
        with self._syncnet_lock:
            if self.speaker_syncnet is None and self.speaker_syncnet_file is not None:
                from latentdub.weights.syncnet import load_syncnet

                self.speaker_syncnet = load_syncnet(self.speaker_syncnet_file, device=self.device)
            if self.speaker_syncnet is None:
                return None
        from latentdub.evaluation.speakers import syncnet_scorer

        return syncnet_scorer(self.speaker_syncnet)

    def plan_output(self, analysis: Any, audio_s: float, policy: str) -> Timeline:
        pts = np.asarray(analysis.pts, dtype=np.int64)
        time_base = Fraction(analysis.time_base)
        end_pts = int(analysis.end_pts)
        return plan_timeline(pts - pts[0], end_pts - int(pts[0]), time_base, audio_s, policy)

    def encode_audio(self, wave: np.ndarray, timeline: Timeline) -> torch.Tensor:
        """Whisper features of a 16 kHz mono track, then the 10×layers tokens at every output frame."""
        from latentdub.audio.features import AudioFeatureExtractor, tokens_for_times

        extractor = AudioFeatureExtractor(self.audio_encoder, device=self.device, dtype=self.dtype)
        features = extractor(wave)
        return tokens_for_times(features, torch.as_tensor(timeline.times_s))

    def plan_render(self, inputs: DubInputs, analysis: Any, plan: LanePlan, timeline: Timeline) -> RenderJob:
        """What pass 2 renders: the lanes and their windows (breaking where a face comes, goes or changes)."""
        info = inputs.info
        return RenderJob(
            video=inputs.video,
            source_pts=np.asarray(analysis.pts),
            rotation=info.rotation,
            width=info.width,
            height=info.height,
            fps=info.fps,
            timeline=timeline,
            lanes=plan.lanes,
            windows=plan_windows(plan.dub_mask(), breaks=plan.breaks),
        )

    def window_diffusion(self, opts: DubOptions, acceleration: Any = None) -> WindowDiffusion:
        """The diffusion of one dub: its options, its own scheduler instance, and how it runs
        (``acceleration``: as :attr:`acceleration` accepts; default the pipeline's)."""
        from latentdub.acceleration import Acceleration
        from latentdub.models.scheduler import scheduler_for

        accel = self.acceleration if acceleration is None else Acceleration.parse(
            acceleration, self.device, self.resolution
        )
        return WindowDiffusion(
            unet=self.unet,
            vae=self.vae,
            scheduler=scheduler_for(opts.sampler, self.scheduler),  # a fresh instance per dub
            pixel_mask=self.pixel_mask,
            latent_mask=self.latent_mask,
            device=self.device,
            dtype=self.dtype,
            steps=opts.steps,
            guidance=opts.guidance,
            deepcache=opts.deepcache,
            seed=opts.seed,
            vae_batch=self.vae_batch,
            acceleration=accel,
            unet_steps=self.unet_steps,
        )

    def occlusion_stage(self, job: RenderJob, opts: DubOptions) -> Any:
        """``occlusion=auto``: the stage that finds what covers each dubbed face (None: off)."""
        if opts.occlusion == "off" or not any(w.dub for w in job.windows):
            return None
        from latentdub.occlusion.stage import OcclusionStage

        return OcclusionStage(job, self.aligner, detectors=self.occlusion_detectors)

    def diffusion_stage(self, job: RenderJob, tokens: torch.Tensor, opts: DubOptions) -> DiffusionStage:
        """The generator stage of pass 2 for one dub."""
        return DiffusionStage(self.window_diffusion(opts), job, tokens)

    def render(
        self,
        job: RenderJob,
        output: Path,
        clip: Any,
        tokens: torch.Tensor,
        opts: DubOptions,
        run: DubProgress,
        timer: StageTimer,
        frame_filters: Sequence[FrameFilter],
        finalizers: Sequence[Finalizer],
        occlusion: Any = None,
    ) -> tuple[Path, dict[str, Any], str]:
        """Pass 2 through the render engine; returns the output path, the provenance and the
        encoder that wrote it (``auto`` resolves per machine)."""
        from latentdub.acceleration import set_channels_last
        from latentdub.media.writer import VideoWriter

        stage = self.diffusion_stage(job, tokens, opts)
        accel = stage.accel
        set_channels_last(self.vae, accel.channels_last)
        log.info("pass 2: %s settings %s", accel.path, accel.to_dict())

        run.check()
        writer = VideoWriter(
            output,
            width=job.width,
            height=job.height,
            time_base=job.timeline.time_base,
            fps=job.fps,
            crf=opts.crf,
            preset=opts.preset,
            encoder=opts.encoder,
            audio=clip,
            rotation=job.rotation,
        )
        sink = FrameSink(job, writer, frame_filters=frame_filters, progress=run, timer=timer)
        try:
            reader = FrameReader(job, self.aligner, annotate=occlusion)
        except BaseException:
            writer.abort()
            raise
        path, signed = render(
            job, reader=reader, generate=stage, sink=sink, progress=run, finalizers=finalizers, timer=timer,
            batch=stage.batch,
        )
        return path, signed, writer.codec_name

    @staticmethod
    def _warn(warnings: list[str], message: str) -> None:
        warnings.append(message)
        log.warning(message)


def _mix_in(clip: Any, extra_16k: np.ndarray) -> Any:
    """``clip`` with 16 kHz mono ``extra`` added to every channel at the clip's rate (clipped)."""
    from latentdub.media.audio_io import AudioClip

    extra = AudioClip(extra_16k[:, None].astype(np.float32), 16000).resampled(clip.sample_rate).samples[:, 0]
    n = clip.num_samples
    add = np.zeros(n, dtype=np.float32)
    add[: min(n, len(extra))] = extra[:n]
    mixed = np.clip(clip.samples + add[:, None], -1.0, 1.0).astype(np.float32)
    return AudioClip(mixed, clip.sample_rate, clip.start_s, clip.warnings)


def _speaker_syncnet_file(version: str, version_or_dir: str | Path) -> Path | None:
    """The SyncNet that eval uses (``auxiliary/syncnet_v2.model`` of the folder, else the hub
    cache; never downloaded here) when its weights are real; None otherwise (a random one would
    only add noise to who speaks, so landmarks decide)."""
    from latentdub.errors import WeightsError
    from latentdub.weights.resolve import resolve_syncnet

    folder = Path(version_or_dir) if Path(version_or_dir).is_dir() else None
    try:
        found = resolve_syncnet(version, folder, download=False)
    except WeightsError:
        return None
    return None if found.random_weights else found.path


def _consent_record(consent: Any) -> Any:
    """The consent record as a ``ConsentRecord`` (parsed and checked); a dub without one is refused."""
    from latentdub.provenance.consent import require_consent

    return require_consent(consent, how="consent=")  # checks a given ConsentRecord's expiry too


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")
    return table[dtype]


def _average_fps(timeline: Timeline) -> float:
    if timeline.num_frames < 2:
        return 0.0
    span = float((int(timeline.pts[-1]) - int(timeline.pts[0])) * timeline.time_base)
    return round((timeline.num_frames - 1) / span, 4) if span > 0 else 0.0


def _output_passthrough_ranges(reason: np.ndarray, timeline: Timeline) -> list[dict[str, Any]]:
    """Output frame ranges left untouched (no face usable, or dub and original silent), with why."""
    times = timeline.times_s
    ranges: list[dict[str, Any]] = []
    for a, b, why in runs(reason):
        if why:
            end_s = float(times[b]) if b < len(times) else timeline.duration_s
            ranges.append({"start_frame": a, "end_frame": b, "reason": why,
                           "start_s": round(float(times[a]), 4), "end_s": round(end_s, 4)})
    return ranges
