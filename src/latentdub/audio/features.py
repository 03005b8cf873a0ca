"""Whisper audio features for LatentSync: log-mel, encoder windows, per-frame token indices.

The official pipeline (LatentSync ``audio2feature.py``) computes one log-mel spectrogram over
the whole clip, encodes it in consecutive 30-second segments, concatenates the hidden states
into an ``(N, layers + 1, width)`` array of 50 Hz rows and gives video frame ``i`` (25 fps) the
10 rows around row ``2i``. This module reproduces that exactly (``official=True``) and, by
default, replaces the hard 30-second segmentation by overlapping windows so features have no
seam every 30 s (LatentSync issues #132, #151). Everything assumes 16 kHz mono input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentdub.errors import InputError

if TYPE_CHECKING:  # keep `import latentdub.audio` free of the models package
    from latentdub.models.whisper import WhisperEncoder

__all__ = [
    "HOP_LENGTH",
    "N_FFT",
    "ROWS_PER_FRAME",
    "ROWS_PER_SECOND",
    "SAMPLE_RATE",
    "AudioFeatureExtractor",
    "feature_indices_at_times",
    "frame_feature_indices",
    "gather_frame_tokens",
    "log_mel_spectrogram",
    "mel_filterbank",
    "num_feature_rows",
    "official_num_frames",
    "tokens_for_times",
]

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
ROWS_PER_SECOND = 50  # the encoder's stride-2 stem halves the mel rate: one row per 20 ms
# LatentSync's audio_feat_length [2, 2]: rows c-4 … c+5 around the frame's centre row c.
ROWS_BEFORE = 4
ROWS_AFTER = 5
ROWS_PER_FRAME = ROWS_BEFORE + 1 + ROWS_AFTER
# Smallest tolerance (in rows) for frame times a float rounding error put below a row boundary.
_TIME_EPS_ROWS = 1e-6


# ----------------------------------------------------------------------------------- log-mel


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    log_step = math.log(6.4) / 27.0
    mel = freq / f_sp
    above = freq >= min_log_hz
    mel[above] = min_log_mel + np.log(freq[above] / min_log_hz) / log_step
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    log_step = math.log(6.4) / 27.0
    freq = mel * f_sp
    above = mel >= min_log_mel
    freq[above] = min_log_hz * np.exp(log_step * (mel[above] - min_log_mel))
    return freq


@functools.lru_cache(maxsize=4)
def mel_filterbank(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> Tensor:
    """Slaney-normalised triangular mel filters ``(n_mels, n_fft // 2 + 1)``, float32.

    Equal to ``librosa.filters.mel(sr, n_fft, n_mels)`` (fmin 0, fmax sr/2, slaney scale and
    area normalisation), which is what Whisper's ``mel_filters.npz`` stores. Computed in
    float64 like librosa, then rounded to float32. The returned tensor is cached: do not
    modify it in place.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_edges = np.linspace(
        _hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sample_rate / 2.0]))[0], n_mels + 2
    )
    hz_edges = _mel_to_hz(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, fft_freqs.size))
    for i in range(n_mels):
        rising = -ramps[i] / widths[i]
        falling = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney area normalisation: every filter integrates to about the same energy.
    weights *= (2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def _as_waveform(waveform: Tensor | np.ndarray) -> Tensor:
    """A 1-D float32 tensor from a mono waveform (float, or int16 PCM scaled by 1/32768)."""
    wave = waveform
    if isinstance(waveform, np.ndarray):
        try:
            wave = torch.from_numpy(np.ascontiguousarray(waveform))
        except TypeError:
            raise InputError(f"audio samples of numpy dtype {waveform.dtype} are not numbers") from None
    if not isinstance(wave, Tensor):
        raise InputError(f"expected the audio as a tensor or numpy array, got {type(waveform).__name__}")
    if wave.ndim == 2 and 1 in wave.shape:
        wave = wave.reshape(-1)
    if wave.ndim != 1:
        raise InputError(
            f"expected a mono 16 kHz waveform (1-D), got shape {tuple(wave.shape)}; mix the "
            "channels down to mono first"
        )
    if wave.dtype == torch.int16:
        # Same scaling as the official ffmpeg s16le decode.
        wave = wave.float() / 32768.0
    elif not wave.is_floating_point():
        raise InputError(f"expected float or int16 audio samples, got {wave.dtype}")
    wave = wave.float()
    if not bool(torch.isfinite(wave).all()):
        raise InputError("the audio contains NaN or infinite samples")
    return wave


def log_mel_spectrogram(waveform: Tensor | np.ndarray, n_mels: int = 80) -> Tensor:
    """Whisper's normalised log-mel of a whole 16 kHz clip: ``(n_mels, len // 160)``, float32.

    Exactly LatentSync's (= openai-whisper's with ``padding=0``): centred reflect-padded STFT
    (n_fft 400, hop 160, periodic Hann), last frame dropped, power spectrum, slaney mel,
    ``log10`` floored at 1e-10, values below (max − 8) raised to it with the max taken over
    the *whole* clip, then ``(x + 4) / 4``. Computed on the waveform's device.
    """
    audio = _as_waveform(waveform)
    if audio.numel() <= N_FFT // 2:
        raise InputError(
            f"the audio is too short for a spectrogram: {audio.numel()} samples "
            f"({audio.numel() / SAMPLE_RATE * 1000:.1f} ms at 16 kHz); at least "
            f"{N_FFT // 2 + 1} are needed"
        )
    window = torch.hann_window(N_FFT, device=audio.device)
    spectrum = torch.stft(
        audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = spectrum[..., :-1].abs() ** 2
    mel = mel_filterbank(n_mels).to(audio.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ------------------------------------------------------------------------------ index tables


def num_feature_rows(num_samples: int) -> int:
    """50 Hz feature rows a 16 kHz waveform of ``num_samples`` yields (both modes).

    ``num_samples // 160`` mel frames, two per row; the official's per-segment truncation
    ``Σ int(seg_len / 2)`` equals this because every full segment (3000) is even.
    """
    return (num_samples // HOP_LENGTH) // 2


def official_num_frames(num_rows: int) -> int:
    """Video frames (audio chunks) the official pipeline makes from ``num_rows`` rows.

    Its loop appends chunk ``i`` and stops after the first ``i`` with ``2i > N``, hence
    ``floor(N / 2) + 2``: two frames more than an equally long 25 fps video.
    """
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    return num_rows // 2 + 2


def _rows_around(centres: Tensor, num_rows: int) -> Tensor:
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    offsets = torch.arange(-ROWS_BEFORE, ROWS_AFTER + 1, dtype=torch.long)
    return (centres[:, None] + offsets[None, :]).clamp_(0, num_rows - 1)


def frame_feature_indices(num_rows: int, num_frames: int, fps: float = 25.0) -> Tensor:
    """The official table: rows ``c-4 … c+5`` (clamped to ``[0, N-1]``) for video frame ``i``
    with ``c = int(i * 50 / fps)``. Returns ``LongTensor[num_frames, 10]``.

    ``i * 50`` is exact and the division is one correctly rounded float64 operation, as in
    the official Python, so the table matches it bit for bit at any ``fps``.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    frames = torch.arange(num_frames, dtype=torch.float64)
    centres = torch.floor(frames * float(ROWS_PER_SECOND) / fps).long()
    return _rows_around(centres, num_rows)


def feature_indices_at_times(num_rows: int, times_s: Tensor | np.ndarray | list[float]) -> Tensor:
    """Rows for frames shown at arbitrary times (29.97/30 fps, VFR): ``LongTensor[n, 10]``.

    A frame at ``t`` seconds takes the 10 rows ``c-4 … c+5`` (clamped to ``[0, N-1]``) around
    ``c = floor(50 t)``: the official round-down rule, so ``t = i / 25`` gives ``c = 2i`` and
    reproduces its table exactly. A timestamp that float rounding put a hair below a row
    boundary (``float32(3 / 25) * 50 = 5.9999998``) must not lose a whole row (20 ms), so ``50 t``
    gets a tolerance of one relative epsilon of the input's own precision (at least 1e-6 row
    = 20 ns) before rounding down. With float64 times ``i / fps`` this agrees with
    ``frame_feature_indices`` (checked for 30 000 frames at 15–60 fps, 29.97 and 23.976
    included); float32 cannot resolve row boundaries of long clips (beyond ~1 min at 29.97
    fps), so pass float64 timestamps.
    """
    raw = torch.as_tensor(times_s).reshape(-1).cpu()
    precision = torch.finfo(raw.dtype if raw.is_floating_point() else torch.float64).eps
    times = raw.to(torch.float64)
    if not bool(torch.isfinite(times).all()):
        raise ValueError("frame times must be finite")
    rows = times * ROWS_PER_SECOND
    tolerance = (rows.abs() * precision).clamp_(min=_TIME_EPS_ROWS)
    return _rows_around(torch.floor(rows + tolerance).long(), num_rows)


def gather_frame_tokens(features: Tensor, indices: Tensor) -> Tensor:
    """``(N, L, D)`` features + ``(n, 10)`` row indices → ``(n, 10 * L, D)`` tokens.

    Time-major, layer-minor like the official reshape: token ``L * k + layer`` is hidden
    state ``layer`` of the frame's ``k``-th row.
    """
    return features[indices.to(features.device)].flatten(1, 2)


def tokens_for_times(features: Tensor, times_s: Tensor | np.ndarray | list[float]) -> Tensor:
    """Per-frame U-Net conditioning tokens ``(n, 10 * (layers + 1), width)`` for frame times."""
    return gather_frame_tokens(features, feature_indices_at_times(features.shape[0], times_s))


# --------------------------------------------------------------------------------- extractor


class AudioFeatureExtractor:
    """Whisper hidden states at 50 Hz for a whole 16 kHz mono clip: ``(N, layers + 1, width)``.

    ``official=True`` reproduces LatentSync: consecutive non-overlapping 30 s windows, each
    zero-padded (in the normalised log-mel domain) to 30 s, truncated to ``int(seg_len / 2)``
    rows and concatenated.

    The default (seamless) mode encodes overlapping 30 s windows every ``hop_rows`` rows (20 s)
    and switches from one window to the next in the middle of their 10 s overlap, so a row
    only ever comes from windows where it has real audio context on both sides (≥ 6 s away
    from a switch, ≥ 4 s inside it), except at the clip's true start and end. A hard cut is
    not enough: Whisper adds an *absolute* positional embedding, so the same row carries a
    different position code in two windows (measured on random weights, a hard cut jumps as
    much as the official seam). The switch is therefore a linear crossfade over
    ``crossfade_rows`` (2 s), which spreads that difference below the natural row-to-row
    variation. Windows sit on the official's grid and the last one is zero-padded like the
    official's last segment, so a clip of ≤ 30 s (one window) gives bit-identical features
    in both modes, and clip ends see the same padding as the official.

    The encoder keeps its parameters (fp32 weights serve ``dtype`` inputs by casting on the
    fly, LayerNorm in fp32, as the official does); it is moved to ``device`` and set to eval.
    Features are returned on ``device`` in ``dtype``.
    """

    def __init__(
        self,
        encoder: WhisperEncoder,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        official: bool = False,
        batch_size: int = 4,
        hop_rows: int | None = None,
        crossfade_rows: int | None = None,
    ) -> None:
        if device is None:
            device = next(encoder.parameters()).device
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder = encoder.to(self.device).eval()
        self.official = official
        self.window_frames = encoder.max_mel_frames  # 3000 mel frames = 30 s for every Whisper
        window_rows = self.window_frames // 2
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if official:
            hop_rows, crossfade_rows = window_rows, 0
        else:
            # Defaults scale with the window: 1000-row (20 s) hop, 100-row (2 s) crossfade at 30 s.
            hop_rows = window_rows * 2 // 3 if hop_rows is None else hop_rows
            crossfade_rows = window_rows // 15 if crossfade_rows is None else crossfade_rows
            if not 0 < hop_rows < window_rows:
                raise ValueError(f"hop_rows must be in (0, {window_rows}), got {hop_rows}")
            if not 0 <= crossfade_rows <= window_rows - hop_rows:
                raise ValueError(
                    f"crossfade_rows must be in [0, {window_rows - hop_rows}] (the overlap), "
                    f"got {crossfade_rows}"
                )
        self.hop_rows = hop_rows
        self.crossfade_rows = crossfade_rows

    @property
    def num_hidden_states(self) -> int:
        return self.encoder.dims.n_audio_layer + 1

    @property
    def width(self) -> int:
        return self.encoder.dims.n_audio_state

    def __call__(self, waveform: Tensor | np.ndarray) -> Tensor:
        audio = _as_waveform(waveform)
        num_rows = num_feature_rows(audio.numel())
        if num_rows < 1:
            raise InputError(
                f"the audio is too short: {audio.numel()} samples "
                f"({audio.numel() / SAMPLE_RATE * 1000:.1f} ms at 16 kHz); at least "
                f"{2 * HOP_LENGTH} samples (20 ms) are needed for one feature row"
            )
        mel = log_mel_spectrogram(audio.to(self.device), n_mels=self.encoder.dims.n_mels)
        with torch.inference_mode():
            return self._stitch(mel, num_rows)

    tokens_for_times = staticmethod(tokens_for_times)

    def _window_starts(self, num_rows: int, num_mel: int) -> list[int]:
        """Window start rows: a grid of ``hop_rows`` until a window reaches the clip's end."""
        count = 1 + math.ceil(max(0, num_mel - self.window_frames) / (2 * self.hop_rows))
        # Official only: a last segment of a single mel frame yields int(1 / 2) = 0 rows.
        return [k * self.hop_rows for k in range(count) if k * self.hop_rows < num_rows]

    def _encode(self, mel: Tensor, starts: list[int]) -> Iterator[Tensor]:
        """Yield ``(window_rows, layers + 1, width)`` hidden states per window, batched."""
        frames = self.window_frames
        padded = F.pad(mel, (0, max(0, 2 * starts[-1] + frames - mel.shape[1])))
        for first in range(0, len(starts), self.batch_size):
            batch = torch.stack(
                [padded[:, 2 * s : 2 * s + frames] for s in starts[first : first + self.batch_size]]
            )
            hidden = self.encoder(batch.to(self.dtype))  # (b, layers + 1, rows, width)
            yield from hidden.transpose(1, 2)

    def _stitch(self, mel: Tensor, num_rows: int) -> Tensor:
        window_rows = self.window_frames // 2
        starts = self._window_starts(num_rows, mel.shape[1])
        # Window k owns rows [cut[k-1], cut[k]); cuts sit mid-overlap (official: at the seam).
        cuts = [s + (window_rows + self.hop_rows) // 2 for s in starts[:-1]]
        half = self.crossfade_rows // 2
        ramp = (torch.arange(self.crossfade_rows, device=self.device, dtype=torch.float32) + 0.5)
        ramp = (ramp / max(1, self.crossfade_rows))[:, None, None]
        out = torch.empty(
            num_rows, self.num_hidden_states, self.width, device=self.device, dtype=self.dtype
        )
        previous: Tensor | None = None
        for k, hidden in enumerate(self._encode(mel, starts)):
            start = starts[k]
            lo = cuts[k - 1] + (self.crossfade_rows - half) if k > 0 else 0
            hi = cuts[k] - half if k < len(cuts) else num_rows
            hi = min(hi, num_rows)
            out[lo:hi] = hidden[lo - start : hi - start]
            if k > 0 and self.crossfade_rows and previous is not None:
                a, b = cuts[k - 1] - half, cuts[k - 1] + (self.crossfade_rows - half)
                prev_start = starts[k - 1]
                mixed = torch.lerp(
                    previous[a - prev_start : b - prev_start].float(),
                    hidden[a - start : b - start].float(),
                    ramp,
                )
                out[a:b] = mixed.to(self.dtype)
            previous = hidden
        return out
