"""Active-speaker scores from SyncNet: which face track is in sync with the ORIGINAL audio.

The classic syncnet_python active-speaker method (Chung & Zisserman, "Out of time", ACCV 2016
workshops; its ``run_syncnet.py``), on the face tracks of our own pass 1:

1. per track, the SyncNet face crop of every 25 fps tick (:func:`~latentdub.evaluation.crops.
   cut_crop`, box centre and size median filtered over 13 frames as the original does);
2. 13 MFCCs of the audio at 100 Hz (:func:`~latentdub.evaluation.syncnet.mfcc`), one audio
   embedding per 0.2 s window, shared by all tracks;
3. per 5-frame video window ``i`` of a track, the distances to audio windows ``i - 15 .. i + 15``
   (zero vectors outside the clip, as the original); per window a confidence = median − min of
   those 31 distances; a 9-window median filter over each run of the track (the original's
   ``medfilt(…, 9)``);
4. each source frame gets the confidence of the window centred on its nearest tick: an
   ``(N, K)`` array in ``analysis.tracks`` order, NaN where a track is absent — the input
   :func:`latentdub.face.speakers.detect_speakers` takes as ``scores=`` (method "syncnet").

Accuracy: the method needs the real ``syncnet_v2.model`` weights (not shipped: see
:mod:`latentdub.weights.syncnet`). The tests run it with the tiny **random** SyncNet, which
checks the plumbing (shapes, NaN where absent, alignment, the decision) and nothing about who
speaks; the decision thresholds for these scores (:data:`~latentdub.face.speakers.
SYNCNET_DECISION`) are the classic pipeline's orders of magnitude, not measured here.

Memory: the crops of all tracks are held at the model's input size (224² × 3 bytes a crop with
the real model, ~150 kB: ~4 MB per track-second), so very long videos should be scored in parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.signal import medfilt

from latentdub.evaluation.crops import MEDIAN_FRAMES, cut_crop, ticks_25fps
from latentdub.evaluation.syncnet import (
    _PAIRWISE_EPS,
    STEPS_PER_FRAME,
    VSHIFT,
    WINDOW_FRAMES,
    WINDOW_STEPS,
    audio_levels,
    mfcc,
    model_device_dtype,
)
from latentdub.face.speakers import ScoreFn, SpeakerTimeline, speaker_timeline
from latentdub.runs import runs

if TYPE_CHECKING:
    from latentdub.face.analysis import FaceAnalysis
    from latentdub.media.audio_io import AudioClip

__all__ = ["syncnet_scorer", "syncnet_scores", "syncnet_speaker_timeline", "window_confidence"]

TICK_RATE = 25
SMOOTH_WINDOWS = 9  # syncnet_python's median filter over per-window confidences


def _audio_at_video_time(analysis: FaceAnalysis, audio: AudioClip) -> np.ndarray:
    """Mono 16 kHz samples with sample 0 at the video's first frame (zero-padded before)."""
    wave = audio.to_mono_16k()
    offset = float(analysis.pts[0] * analysis.time_base) - audio.start_s
    shift = round(offset * 16000)
    if shift >= 0:
        return wave[shift:]
    return np.concatenate([np.zeros(-shift, dtype=wave.dtype), wave])


def _audio_embeddings(
    cc: np.ndarray, count: int, model: Any, batch_size: int, device: Any, dtype: Any
) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            stop = min(count, start + batch_size)
            a = np.stack(
                [cc[:, STEPS_PER_FRAME * i : STEPS_PER_FRAME * i + WINDOW_STEPS] for i in range(start, stop)]
            )  # fmt: skip
            a_t = torch.from_numpy(a[:, None]).to(device=device, dtype=dtype)
            out.append(model.forward_audio(a_t).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 1))


def _video_embeddings(
    crops_bgr: np.ndarray, model: Any, batch_size: int, size: int, device: Any, dtype: Any
) -> np.ndarray:
    """One embedding per 5-frame window of consecutive crops ``(L, H, W, 3)`` BGR."""
    count = crops_bgr.shape[0] - WINDOW_FRAMES + 1
    out = []
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            frames = torch.from_numpy(
                np.ascontiguousarray(crops_bgr[start : start + n + WINDOW_FRAMES - 1])
            )
            x = frames.permute(0, 3, 1, 2).to(torch.float32)
            if x.shape[-2:] != (size, size):
                x = F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            windows = x.unfold(0, WINDOW_FRAMES, 1).permute(0, 1, 4, 2, 3).contiguous()
            v = windows.to(device=device, dtype=dtype)
            out.append(model.forward_video(v).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def window_confidence(
    video_emb: np.ndarray, audio_emb: np.ndarray, first: int, *, vshift: int = VSHIFT
) -> np.ndarray:
    """Per video window: median − min of its distances to the audio windows ±``vshift`` away.

    ``video_emb`` (W, D) are windows ``first .. first + W - 1`` of the clip; ``audio_emb`` all
    the clip's audio windows (zero vectors beyond them, as in syncnet_python).
    """
    w, dim = video_emb.shape
    idx = first + np.arange(w)[:, None] + np.arange(-vshift, vshift + 1)[None, :]
    inside = (idx >= 0) & (idx < audio_emb.shape[0])
    a = np.zeros((*idx.shape, dim))
    a[inside] = audio_emb[idx[inside]]
    dists = np.linalg.norm(video_emb[:, None, :] - a + _PAIRWISE_EPS, axis=-1)
    return np.median(dists, axis=1) - dists.min(axis=1)


def _crop_params(analysis: FaceAnalysis, track_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) crop centre x, y and half size per source frame (median filtered over each run
    of presence, as syncnet_python smooths its tracks), and (N,) presence."""
    n = analysis.num_frames
    td = analysis.track(track_id).dense(n)
    b = td.bbox
    raw = np.stack(
        [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
         np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2],
        axis=1,
    )  # fmt: skip
    out = np.full((n, 3), np.nan)
    for a, z, on in runs(td.present):
        if not on:
            continue
        seg = raw[a:z]
        if z - a >= 3:
            seg = ndimage.median_filter(seg, size=(min(MEDIAN_FRAMES, z - a), 1), mode="nearest")
        out[a:z] = seg
    return out, td.present.copy()


def syncnet_scores(
    analysis: FaceAnalysis,
    audio: AudioClip,
    model: Any,
    *,
    vshift: int = VSHIFT,
    smooth: int = SMOOTH_WINDOWS,
    batch_size: int = 20,
) -> np.ndarray:
    """(N, K) SyncNet active-speaker confidence per source frame and track (see the module).

    ``audio``: the ORIGINAL video's audio; ``model``: a loaded SyncNet
    (:func:`latentdub.weights.syncnet.load_syncnet`). Decodes the video once more for the crops.
    Frames of a track whose run of presence is shorter than one window (5 ticks) stay NaN.
    """
    from latentdub.media.reader import iter_frames

    n = analysis.num_frames
    ids = [t.id for t in analysis.tracks]
    out = np.full((n, len(ids)), np.nan)
    if n == 0 or not ids:
        return out
    times = np.asarray(analysis.times_s, dtype=np.float64)
    ticks = ticks_25fps(times, float(times[0]) + analysis.duration_s, TICK_RATE)
    wave = _audio_at_video_time(analysis, audio)
    cc = mfcc(audio_levels(wave))
    # Window i needs MFCC steps 4i .. 4i+19 and ticks i .. i+4.
    audio_windows = min(
        len(ticks) - WINDOW_FRAMES + 1, (cc.shape[1] - WINDOW_STEPS) // STEPS_PER_FRAME + 1
    )
    if audio_windows < 1:
        return out
    device, dtype = model_device_dtype(model)
    size = int(getattr(getattr(model, "dims", None), "image_size", 224))
    audio_emb = _audio_embeddings(cc, audio_windows, model, batch_size, device, dtype)

    params, present = zip(*(_crop_params(analysis, tid) for tid in ids), strict=True)
    # Which ticks show which source frame: crops are cut as the frames stream by.
    wanted: dict[int, list[int]] = {}
    for t, f in enumerate(ticks.tolist()):
        wanted.setdefault(f, []).append(t)
    crops = [np.zeros((len(ticks), size, size, 3), np.uint8) for _ in ids]
    on = [np.zeros(len(ticks), bool) for _ in ids]
    last = int(ticks.max())
    for frame in iter_frames(analysis.path, stop=last + 1):
        tick_list = wanted.get(frame.index)
        if not tick_list:
            continue
        for j in range(len(ids)):
            if not present[j][frame.index]:
                continue
            crop = cut_crop(frame.image, params[j][frame.index], size)
            for t in tick_list:
                crops[j][t] = crop
                on[j][t] = True

    # Tick → the window centred on it (windows span ticks i .. i+4).
    centre = WINDOW_FRAMES // 2
    frame_tick = np.clip(
        np.round((times - times[0]) * TICK_RATE).astype(np.int64), 0, len(ticks) - 1
    )
    for j in range(len(ids)):
        per_tick = np.full(len(ticks), np.nan)
        for a, z, flag in runs(on[j]):
            if not flag or z - a < WINDOW_FRAMES:
                continue
            stop = min(z, audio_windows + WINDOW_FRAMES - 1)  # windows need audio too
            if stop - a < WINDOW_FRAMES:
                continue
            bgr = crops[j][a:stop, :, :, ::-1]
            conf = window_confidence(
                _video_embeddings(bgr, model, batch_size, size, device, dtype),
                audio_emb, a, vshift=vshift,
            )  # fmt: skip
            if smooth > 1 and conf.size >= smooth:
                conf = medfilt(conf, kernel_size=smooth | 1)
            # Window i covers ticks a+i .. a+i+4; edge ticks take the nearest window.
            idx = np.clip(np.arange(a, z) - a - centre, 0, conf.size - 1)
            per_tick[a:z] = conf[idx]
        out[:, j] = np.where(present[j], per_tick[frame_tick], np.nan)
    return out


def syncnet_scorer(model: Any, **kwargs: Any) -> ScoreFn:
    """A :data:`~latentdub.face.speakers.ScoreFn` for
    :func:`~latentdub.face.speakers.speaker_timeline` (``syncnet=``) from a loaded SyncNet."""

    def score(analysis: FaceAnalysis, audio: AudioClip) -> np.ndarray:
        return syncnet_scores(analysis, audio, model, **kwargs)

    return score


def syncnet_speaker_timeline(
    analysis: FaceAnalysis, audio: AudioClip | None, model: Any, **kwargs: Any
) -> SpeakerTimeline:
    """Who speaks when, decided on SyncNet scores (method "syncnet"; nobody without audio)."""
    return speaker_timeline(analysis, audio, syncnet=syncnet_scorer(model, **kwargs))
