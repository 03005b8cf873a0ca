"""Lip-sync scores LSE-C / LSE-D (and the AV offset) with the classic evaluation SyncNet.

The protocol is the one of syncnet_python that LatentSync's ``eval/eval_sync_conf.py`` uses:

1. Video at 25 fps, audio at 16 kHz. Audio features are 13 MFCCs at 100 Hz (:func:`mfcc`),
   so one video frame spans 4 MFCC steps (640 samples).
2. Windows of 0.2 s: video window ``i`` is frames ``i .. i+4``, audio window ``i`` is MFCC
   steps ``4i .. 4i+19``. With ``L = min(frames, samples // 640)`` there are ``L - 5`` windows
   (the original's count, which leaves out the last possible one).
3. Every window goes through the SyncNet towers (video: BGR float 0–255 crops at the model's
   input size). For each video window ``i`` and shift ``s`` in ``-15 .. 15`` the Euclidean
   distance to audio window ``i + s`` is taken; audio embeddings outside the clip count as
   zero vectors, as in the original.
4. The mean over windows gives one distance per shift. AV offset = ``15 - argmin`` (i.e. the
   video lags the audio by ``offset`` frames; a correct dub has 0), LSE-D = the minimum mean
   distance, LSE-C (confidence) = median − minimum of the 31 means. Over several clips or face
   tracks both are averaged (:func:`average_scores`).

:class:`StreamingSyncScorer` computes the same numbers from crops pushed one at a time (long
videos: no array of all crops), for ``latentdub eval``.

Where this may differ from the official numbers:

* Face crops: the official pipeline crops faces with S3FD + IoU tracking + median filtering
  (crop scale 0.4, 224 × 224); here the caller supplies the crops, so their framing differs.
* MFCC: :func:`mfcc` is an independent implementation of python_speech_features' defaults
  (25 ms rectangular frames every 10 ms, pre-emphasis 0.97, 512-point power spectrum, 26 mel
  filters over 0–8 kHz, log, orthonormal DCT-II, lifter 22, c0 replaced by the log frame
  energy), computed in float64; it has not been compared against that library here, so tiny
  numerical differences (and any difference in its framing/rounding details) are possible.
  Float audio in [-1, 1] is scaled to int16 levels and rounded to integers first
  (:func:`audio_levels`), because the original feeds the integer samples of an s16 wav file
  and the log features are neither scale invariant nor blind to the rounding.
* Resizing crops to the model's input size uses bilinear filtering with antialiasing (torch),
  not OpenCV's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dct

from latentdub.errors import InputError

__all__ = [
    "AUDIO_RATE",
    "FPS",
    "SAMPLES_PER_FRAME",
    "VSHIFT",
    "WINDOW_FRAMES",
    "StreamingSyncScorer",
    "SyncScores",
    "audio_levels",
    "average_scores",
    "lip_sync_scores",
    "mfcc",
    "scores_from_distances",
    "scores_from_embeddings",
    "window_embeddings",
]

FPS = 25
AUDIO_RATE = 16_000
MFCC_RATE = 100
WINDOW_FRAMES = 5
STEPS_PER_FRAME = MFCC_RATE // FPS  # 4
WINDOW_STEPS = WINDOW_FRAMES * STEPS_PER_FRAME  # 20
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640
VSHIFT = 15
_PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance's eps, as the original used


@dataclass(frozen=True)
class SyncScores:
    """Scores of one clip (or face track).

    ``per_frame_distance``: distance of each window at the best shift; ``offset_distances``:
    the mean distance for each shift from ``-vshift`` to ``+vshift`` (audio relative to video).
    """

    lse_c: float
    lse_d: float
    offset: int
    per_frame_distance: list[float]
    offset_distances: list[float] = field(default_factory=list)
    random_weights: bool = False


# ---------------------------------------------------------------------------------------- MFCC


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def _mel_filterbank(nfilt: int, nfft: int, rate: int, low: float, high: float) -> np.ndarray:
    """Triangular filters on FFT bins (python_speech_features' bin rounding)."""
    mels = np.linspace(_hz_to_mel(low), _hz_to_mel(high), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / rate).astype(int)
    bank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        for i in range(lo, mid):
            bank[j, i] = (i - lo) / (mid - lo)
        for i in range(mid, hi):
            bank[j, i] = (hi - i) / (hi - mid)
    return bank


def mfcc(
    signal: np.ndarray,
    rate: int = AUDIO_RATE,
    *,
    numcep: int = 13,
    nfilt: int = 26,
    nfft: int = 512,
    winlen: float = 0.025,
    winstep: float = 0.01,
    preemph: float = 0.97,
    ceplifter: int = 22,
) -> np.ndarray:
    """MFCCs as ``(numcep, frames)`` float64, python_speech_features-style (see module doc).

    ``frames = 1 + ceil((n - 400) / 160)`` for ``n`` samples at 16 kHz (~100 per second; the
    last partial frame is zero-padded).
    """
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("cannot compute MFCCs of empty audio")
    x = np.concatenate([x[:1], x[1:] - preemph * x[:-1]])
    frame_len = math.floor(winlen * rate + 0.5)
    frame_step = math.floor(winstep * rate + 0.5)
    n_frames = 1 + max(0, math.ceil((x.size - frame_len) / frame_step))
    pad = (n_frames - 1) * frame_step + frame_len - x.size
    x = np.concatenate([x, np.zeros(max(pad, 0))])
    idx = np.arange(frame_len)[None, :] + frame_step * np.arange(n_frames)[:, None]
    frames = x[idx]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    eps = np.finfo(np.float64).eps
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    feat = power @ _mel_filterbank(nfilt, nfft, rate, 0.0, rate / 2).T
    feat = np.log(np.where(feat == 0, eps, feat))
    cep = dct(feat, type=2, axis=1, norm="ortho")[:, :numcep]
    if ceplifter > 0:
        n = np.arange(numcep)
        cep = cep * (1 + (ceplifter / 2.0) * np.sin(np.pi * n / ceplifter))
    cep[:, 0] = np.log(energy)
    return cep.T


def audio_levels(audio: np.ndarray) -> np.ndarray:
    """The MFCC input: mono samples as int16 values (held in float64).

    The official path feeds integers: syncnet_python's ``run_pipeline.py`` has ffmpeg write a
    16 kHz mono s16 WAV, ``SyncNetInstance.evaluate`` reads it with ``scipy.io.wavfile.read``
    (int16) and passes it unscaled to ``python_speech_features.mfcc``. So float audio in
    [-1, 1] is scaled by 32768 and rounded half to even and clipped to [-32768, 32767], as
    ffmpeg's float → s16 conversion does (``lrintf(x * (1 << 15))`` then ``av_clip_int16``
    in libswresample's ``audioconvert.c``). Integer input is used as it is.
    """
    a = np.asarray(audio)
    if a.ndim == 2:  # (samples, channels) or (channels, samples): average the short axis
        a = a.mean(axis=int(np.argmin(a.shape)))
    if a.ndim != 1:
        raise InputError(f"audio must be mono samples (1-D), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        # Rounding matters: below ~1 level the unrounded log features differ, and silence
        # with float noise would otherwise not be the digital silence the official code sees.
        return np.clip(np.rint(a.astype(np.float64) * 32768.0), -32768.0, 32767.0)
    return a.astype(np.float64)


# ------------------------------------------------------------------------------ embeddings


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(iter(model.parameters()))
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return torch.device("cpu"), torch.float32


def _crops_bgr(crops: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` RGB or ``(N, H, W)`` / ``(N, H, W, 1)`` grayscale → ``(N, H, W, 3)`` BGR."""
    c = np.asarray(crops)
    if c.ndim == 3:
        c = c[..., None]
    if c.ndim != 4 or c.shape[-1] not in (1, 3):
        raise InputError(f"mouth crops must be (N, H, W, 3) or (N, H, W), got shape {c.shape}")
    if c.shape[-1] == 1:
        return np.repeat(c, 3, axis=-1)
    return c[..., ::-1]


def _video_batch(bgr: np.ndarray, start: int, count: int, size: int, device, dtype) -> torch.Tensor:
    """Windows ``start .. start+count-1`` as ``(count, 3, 5, size, size)`` float 0–255."""
    frames = torch.from_numpy(np.ascontiguousarray(bgr[start : start + count + WINDOW_FRAMES - 1]))
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # (F, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    windows = x.unfold(0, WINDOW_FRAMES, 1)  # (count, 3, H, W, 5)
    return windows.permute(0, 1, 4, 2, 3).contiguous().to(device=device, dtype=dtype)


def window_embeddings(
    mouth_crops: np.ndarray, audio_16k: np.ndarray, model: Any, *, batch_size: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Video and audio embeddings of every 0.2 s window, in time order: two ``(W, D)`` arrays.

    ``model`` needs ``forward_video`` / ``forward_audio`` (see :class:`~latentdub.models.
    syncnet.SyncNet`); it is fed windows in increasing time order.
    """
    bgr = _crops_bgr(mouth_crops)
    levels = audio_levels(audio_16k)
    length = min(bgr.shape[0], levels.size // SAMPLES_PER_FRAME)
    n_windows = length - WINDOW_FRAMES
    if n_windows < 1:
        raise InputError(
            f"too short for lip-sync scoring: {bgr.shape[0]} frames and "
            f"{levels.size / AUDIO_RATE:.2f} s of audio; at least {WINDOW_FRAMES + 1} frames "
            f"(0.24 s at {FPS} fps) of both are needed"
        )
    cc = mfcc(levels)
    device, dtype = model_device_dtype(model)
    dims = getattr(model, "dims", None)
    size = int(getattr(dims, "image_size", bgr.shape[1]))
    video, audio = [], []
    with torch.inference_mode():
        for start in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - start)
            v = _video_batch(bgr, start, count, size, device, dtype)
            a = np.stack([cc[:, 4 * i : 4 * i + WINDOW_STEPS] for i in range(start, start + count)])
            a_t = torch.from_numpy(a[:, None]).to(device=device, dtype=dtype)
            video.append(model.forward_video(v).float().cpu().numpy())
            audio.append(model.forward_audio(a_t).float().cpu().numpy())
    return np.concatenate(video).astype(np.float64), np.concatenate(audio).astype(np.float64)


# ---------------------------------------------------------------------------------- scores


def scores_from_embeddings(
    video_emb: np.ndarray,
    audio_emb: np.ndarray,
    *,
    vshift: int = VSHIFT,
    random_weights: bool = False,
) -> SyncScores:
    """Offset search and confidence from per-window embeddings (both ``(W, D)``)."""
    v = np.asarray(video_emb, dtype=np.float64)
    a = np.asarray(audio_emb, dtype=np.float64)
    if v.ndim != 2 or v.shape != a.shape or v.shape[0] < 1:
        raise ValueError(f"need two equal (W, D) arrays, got {v.shape} and {a.shape}")
    win = 2 * vshift + 1
    padded = np.concatenate([np.zeros((vshift, a.shape[1])), a, np.zeros((vshift, a.shape[1]))])
    # dists[i, j]: video window i against audio window i + j - vshift.
    idx = np.arange(v.shape[0])[:, None] + np.arange(win)[None, :]
    dists = np.linalg.norm(v[:, None, :] - padded[idx] + _PAIRWISE_EPS, axis=-1)
    return scores_from_distances(dists, vshift=vshift, random_weights=random_weights)


def lip_sync_scores(
    mouth_crops: np.ndarray,
    audio_16k: np.ndarray,
    model: Any,
    *,
    batch_size: int = 20,
    vshift: int = VSHIFT,
) -> SyncScores:
    """LSE-C, LSE-D and AV offset of one clip.

    ``mouth_crops``: ``(N, H, W, 3)`` uint8 RGB face/mouth crops at 25 fps (grayscale
    ``(N, H, W)`` is accepted too); ``audio_16k``: mono samples at 16 kHz (int16, or float in
    [-1, 1]); ``model``: a loaded :class:`~latentdub.models.syncnet.SyncNet`.
    """
    video, audio = window_embeddings(mouth_crops, audio_16k, model, batch_size=batch_size)
    return scores_from_embeddings(
        video, audio, vshift=vshift, random_weights=bool(getattr(model, "random_weights", False))
    )


def average_scores(scores: Sequence[SyncScores]) -> tuple[float, float]:
    """``(LSE-C, LSE-D)`` averaged over clips / face tracks, as the papers report them."""
    if not scores:
        raise ValueError("no scores to average")
    return (
        float(np.mean([s.lse_c for s in scores])),
        float(np.mean([s.lse_d for s in scores])),
    )


# ------------------------------------------------------------------------------- streaming


def scores_from_distances(
    distances: np.ndarray, *, vshift: int = VSHIFT, random_weights: bool = False
) -> SyncScores:
    """Offset, LSE-D and LSE-C from the ``(W, 2 * vshift + 1)`` window × shift distances.

    The same arithmetic as :func:`scores_from_embeddings`, for callers that computed the
    distances themselves (e.g. :class:`StreamingSyncScorer`, which never holds all embeddings).
    """
    dists = np.asarray(distances, dtype=np.float64)
    if dists.ndim != 2 or dists.shape[0] < 1 or dists.shape[1] != 2 * vshift + 1:
        raise ValueError(f"need (W, {2 * vshift + 1}) distances, got {dists.shape}")
    mean = dists.mean(axis=0)
    best = int(np.argmin(mean))
    lse_d = float(mean[best])
    return SyncScores(
        lse_c=float(np.median(mean) - lse_d),
        lse_d=lse_d,
        offset=vshift - best,
        per_frame_distance=[float(d) for d in dists[:, best]],
        offset_distances=[float(d) for d in mean],
        random_weights=random_weights,
    )


class StreamingSyncScorer:
    """:func:`lip_sync_scores` of one clip fed one crop at a time, in bounded memory.

    ``audio_16k`` is the clip's whole audio (mono 16 kHz, as for :func:`lip_sync_scores`) and
    ``num_frames`` the number of crops that will be pushed; with them the number of windows is
    known up front, so each batch of video windows is compared with the audio windows it can
    reach (``±vshift``) as soon as it is embedded. Only ``batch_size + 4`` crops, the audio
    embeddings within reach and one row of ``2 * vshift + 1`` distances per window are kept
    (≈ 250 bytes per frame), never all crops or all embeddings. The results equal
    :func:`lip_sync_scores` on the same crops and audio.
    """

    def __init__(
        self,
        model: Any,
        audio_16k: np.ndarray,
        num_frames: int,
        *,
        vshift: int = VSHIFT,
        batch_size: int = 20,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        levels = audio_levels(audio_16k)
        length = min(int(num_frames), levels.size // SAMPLES_PER_FRAME)
        self.num_frames = int(num_frames)
        self.num_windows = length - WINDOW_FRAMES
        if self.num_windows < 1:
            raise InputError(
                f"too short for lip-sync scoring: {num_frames} frames and "
                f"{levels.size / AUDIO_RATE:.2f} s of audio; at least {WINDOW_FRAMES + 1} frames "
                f"(0.24 s at {FPS} fps) of both are needed"
            )
        self.model = model
        self.vshift = vshift
        self.batch_size = batch_size
        self._cc = mfcc(levels)
        self._device, self._dtype = model_device_dtype(model)
        self._size: int | None = getattr(getattr(model, "dims", None), "image_size", None)
        self._frames: list[np.ndarray] = []  # BGR crops not yet consumed by a window batch
        self._next = 0  # first video window not yet embedded
        self._audio: dict[int, np.ndarray] = {}  # audio window → embedding, within reach only
        self._audio_next = 0  # audio windows [0, _audio_next) have been embedded
        self._rows = np.empty((self.num_windows, 2 * vshift + 1))
        self._pushed = 0

    @property
    def pushed(self) -> int:
        return self._pushed

    def push(self, crop: np.ndarray) -> None:
        """Add the next crop (``(H, W, 3)`` uint8 RGB, or ``(H, W)`` grayscale)."""
        self._pushed += 1
        if self._next >= self.num_windows:
            return  # past the last window (the protocol leaves out the final frames)
        self._frames.append(_crops_bgr(np.asarray(crop)[None])[0])
        while len(self._frames) >= self.batch_size + WINDOW_FRAMES - 1:
            self._embed(self.batch_size)

    def finish(self) -> SyncScores:
        """Embed what is left and score; needs all ``num_frames`` crops to have been pushed."""
        if self._pushed < self.num_frames:
            raise ValueError(f"{self._pushed} of {self.num_frames} crops were pushed")
        while self._next < self.num_windows:
            self._embed(min(self.batch_size, self.num_windows - self._next))
        return scores_from_distances(
            self._rows,
            vshift=self.vshift,
            random_weights=bool(getattr(self.model, "random_weights", False)),
        )

    # -- internals ---------------------------------------------------------------------------
    def _embed(self, count: int) -> None:
        count = min(count, self.num_windows - self._next)
        if count < 1:
            return
        start = self._next
        frames = np.stack(self._frames[: count + WINDOW_FRAMES - 1])
        size = int(self._size or frames.shape[1])
        with torch.inference_mode():
            v_in = _video_batch(frames, 0, count, size, self._device, self._dtype)
            video = self.model.forward_video(v_in).float().cpu().numpy().astype(np.float64)
        del self._frames[:count]
        lo, hi = start - self.vshift, start + count - 1 + self.vshift  # audio windows in reach
        self._embed_audio_until(min(hi + 1, self.num_windows))
        for k in [k for k in self._audio if k < lo]:
            del self._audio[k]
        dim = video.shape[1]
        reach = np.zeros((hi - lo + 1, dim))
        for k in range(max(lo, 0), min(hi + 1, self.num_windows)):
            reach[k - lo] = self._audio[k]
        win = 2 * self.vshift + 1
        idx = np.arange(count)[:, None] + np.arange(win)[None, :]
        self._rows[start : start + count] = np.linalg.norm(
            video[:, None, :] - reach[idx] + _PAIRWISE_EPS, axis=-1
        )
        self._next += count

    def _embed_audio_until(self, stop: int) -> None:
        while self._audio_next < stop:
            first = self._audio_next
            count = min(self.batch_size, stop - first)
            a = np.stack([self._cc[:, 4 * i : 4 * i + WINDOW_STEPS] for i in range(first, first + count)])
            with torch.inference_mode():
                a_t = torch.from_numpy(a[:, None]).to(device=self._device, dtype=self._dtype)
                emb = self.model.forward_audio(a_t).float().cpu().numpy().astype(np.float64)
            for j in range(count):
                self._audio[first + j] = emb[j]
            self._audio_next += count
