"""Audio features: official log-mel and index tables against the golden reference, the official
segmentation, and the seamless long-audio mode (no 30 s seam) on real speech."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors import safe_open

from latentdub.audio import (
    AudioFeatureExtractor,
    feature_indices_at_times,
    frame_feature_indices,
    log_mel_spectrogram,
    num_feature_rows,
    official_num_frames,
    tokens_for_times,
)
from latentdub.errors import InputError
from latentdub.models.whisper import TINY_DIMS, WhisperDims, WhisperEncoder

SR = 16000
# Same structure as tiny (80 mels, 1500-row context = 30 s windows), narrower: for the tests
# whose point is the segmentation, not the width.
NARROW_DIMS = WhisperDims(**{**TINY_DIMS.to_dict(), "n_audio_state": 64, "n_audio_head": 4, "n_audio_layer": 2})


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(reference_dir / "golden_audio.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def speech(media_dir: Path) -> np.ndarray:
    """Real English speech, 16 kHz mono, 60 s."""
    wave, rate = sf.read(media_dir / "audio_musetalk_eng_60s_16k.wav", dtype="float32")
    assert rate == SR and wave.ndim == 1
    return wave


@pytest.fixture(scope="module")
def tiny_encoder() -> WhisperEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return WhisperEncoder(TINY_DIMS).eval()


@pytest.fixture(scope="module")
def narrow_encoder() -> WhisperEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return WhisperEncoder(NARROW_DIMS).eval()


# ------------------------------------------------------------------------------------ log-mel


def test_log_mel_matches_golden(golden: tuple[dict, dict]) -> None:
    tensors, meta = golden
    mel = log_mel_spectrogram(tensors["waveform"])
    assert mel.shape == tensors["log_mel"].shape == (80, int(meta["num_samples"]) // 160)
    assert (mel - tensors["log_mel"]).abs().max().item() < 1e-4
    # numpy input and float64 give the same result.
    mel_np = log_mel_spectrogram(tensors["waveform"].double().numpy())
    assert (mel_np - tensors["log_mel"]).abs().max().item() < 1e-4


def test_log_mel_uses_whole_clip_maximum(golden: tuple[dict, dict]) -> None:
    wave = golden[0]["waveform"]
    loud_tail = torch.cat([wave * 0.001, wave])
    mel = log_mel_spectrogram(loud_tail)
    # The quiet half is floored at (whole-clip max - 8), i.e. (max - 8 + 4) / 4 after scaling.
    assert mel.min().item() == pytest.approx(mel.max().item() - 2.0, abs=1e-5)
    assert mel.shape[1] == loud_tail.numel() // 160


def test_log_mel_rejects_unusable_audio() -> None:
    with pytest.raises(InputError, match="too short"):
        log_mel_spectrogram(torch.zeros(200))
    with pytest.raises(InputError, match="NaN"):
        log_mel_spectrogram(torch.tensor([0.0, float("nan")] * 500))
    with pytest.raises(InputError, match="mono"):
        log_mel_spectrogram(torch.zeros(2, 8000))


# ------------------------------------------------------------------------------- index tables


def test_official_table_and_counts_match_golden(golden: tuple[dict, dict]) -> None:
    tensors, meta = golden
    rows = ast.literal_eval(meta["feature_array_shape"])[0]
    assert rows == num_feature_rows(int(meta["num_samples"])) == 160
    assert official_num_frames(rows) == int(meta["num_chunks"]) == 82
    table = frame_feature_indices(rows, official_num_frames(rows), fps=25.0)
    assert table.dtype == torch.long
    assert torch.equal(table, tensors["chunk_feature_indices"])


def test_official_frame_count_rule() -> None:
    # §3.2 step 7: a 10 s clip (N = 500) gives 252 chunks; odd N rounds down.
    assert official_num_frames(500) == 252
    assert official_num_frames(161) == 82
    assert num_feature_rows(10 * SR) == 500
    assert num_feature_rows(319) == 0 and num_feature_rows(320) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_times_at_25fps_reproduce_official_table(golden: tuple[dict, dict], dtype: torch.dtype) -> None:
    table = golden[0]["chunk_feature_indices"]
    times = torch.arange(82, dtype=dtype) / 25
    assert torch.equal(feature_indices_at_times(160, times), table)
    assert torch.equal(feature_indices_at_times(160, [i * 0.04 for i in range(82)]), table)


def _rows(centre: int, num_rows: int = 10_000) -> list[int]:
    return [min(max(r, 0), num_rows - 1) for r in range(centre - 4, centre + 6)]


def test_times_at_other_rates_and_vfr() -> None:
    n = 10_000
    # Hand-derived centres floor(50 t): 30 fps frame 30 (t = 1 s) → 50; frame 1 → 1.67 → 1.
    got = feature_indices_at_times(n, torch.tensor([30 / 30, 1 / 30, 7 / 30], dtype=torch.float64))
    assert got.tolist() == [_rows(50), _rows(1), _rows(11)]  # 7/30 s → 11.67 → 11
    # 29.97 fps frame 100: 100 / 29.97 s → 166.83 → 166.
    assert feature_indices_at_times(n, [100 / 29.97]).tolist() == [_rows(166)]
    # Irregular (VFR) timestamps.
    vfr = [0.0, 0.031, 0.075, 0.5004, 1.0199, 2.2]
    assert feature_indices_at_times(n, vfr).tolist() == [
        _rows(0), _rows(1), _rows(3), _rows(25), _rows(50), _rows(110)
    ]
    # Near the clip's end rows are clamped to N - 1.
    assert feature_indices_at_times(112, [2.2]).tolist() == [[106, 107, 108, 109, 110, 111, 111, 111, 111, 111]]
    with pytest.raises(ValueError):
        feature_indices_at_times(n, [float("nan")])


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97, 30000 / 1001, 24.0, 60.0])
def test_times_agree_with_official_rule_at_constant_rates(fps: float) -> None:
    frames = 5000
    times = torch.arange(frames, dtype=torch.float64) / fps
    assert torch.equal(
        feature_indices_at_times(10**6, times), frame_feature_indices(10**6, frames, fps)
    )


def test_tokens_are_time_major_layer_minor() -> None:
    rows, layers, width = 30, 5, 3
    # Every value encodes (row, layer) so the gathered order can be read back.
    features = (
        torch.arange(rows)[:, None, None] * 100 + torch.arange(layers)[None, :, None]
    ).float().expand(rows, layers, width).contiguous()
    times = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)
    tokens = tokens_for_times(features, times)
    assert tokens.shape == (3, 10 * layers, width)
    idx = feature_indices_at_times(rows, times)
    for i in range(3):
        for token in range(10 * layers):
            k, layer = divmod(token, layers)  # token index = layers * k + layer
            assert tokens[i, token, 0].item() == idx[i, k].item() * 100 + layer
    assert AudioFeatureExtractor.tokens_for_times is tokens_for_times


# --------------------------------------------------------------------------------- extraction


def _official_by_hand(encoder: WhisperEncoder, wave: np.ndarray) -> torch.Tensor:
    """LatentSync's segmentation written out: 3000-frame segments, zero-padded, truncated."""
    mel = log_mel_spectrogram(wave)
    parts = []
    for seek in range(0, mel.shape[1], 3000):
        segment = mel[:, seek : seek + 3000]
        padded = F.pad(segment, (0, 3000 - segment.shape[1]))
        with torch.no_grad():
            hidden = encoder(padded[None])[0].transpose(0, 1)  # (1500, layers + 1, width)
        parts.append(hidden[: segment.shape[1] // 2])
    return torch.cat(parts)


def test_official_mode_reproduces_segmentation(narrow_encoder: WhisperEncoder, speech: np.ndarray) -> None:
    # 65.01 s: three segments, the last one short and odd-length (501 mel frames).
    wave = np.concatenate([speech, speech[: 5 * SR + 160]])
    expected = _official_by_hand(narrow_encoder, wave)
    got = AudioFeatureExtractor(narrow_encoder, official=True, batch_size=2)(wave)
    assert got.shape == (num_feature_rows(wave.size), 3, 64) == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_seamless_equals_official_up_to_30s(narrow_encoder: WhisperEncoder, speech: np.ndarray) -> None:
    for seconds in (30.0, 4.0):
        wave = speech[: int(seconds * SR)]
        official = AudioFeatureExtractor(narrow_encoder, official=True)(wave)
        seamless = AudioFeatureExtractor(narrow_encoder)(wave)
        assert torch.equal(official, seamless), seconds


def test_seamless_rows_come_from_overlapping_windows(
    narrow_encoder: WhisperEncoder, speech: np.ndarray
) -> None:
    wave = speech[: 55 * SR]
    feats = AudioFeatureExtractor(narrow_encoder)(wave)
    official = AudioFeatureExtractor(narrow_encoder, official=True)(wave)
    assert feats.shape == official.shape == (2750, 3, 64)
    mel = log_mel_spectrogram(wave)
    with torch.no_grad():
        second = narrow_encoder(mel[None, :, 2000:5000])[0].transpose(0, 1)  # 20–50 s window
        third = narrow_encoder(F.pad(mel[None, :, 4000:], (0, 7000 - mel.shape[1])))[0].transpose(0, 1)
    # Rows up to the first switch (25 s ± 1 s) are the first window = the official's first segment.
    assert torch.equal(feats[:1200], official[:1200])
    # Between switches: the window starting at 20 s, not a 30 s segment.
    torch.testing.assert_close(feats[1300:2200], second[300:1200], atol=1e-5, rtol=1e-5)
    # After the last switch (45 s): the last window, zero-padded at the clip's end like the official.
    torch.testing.assert_close(feats[2300:], third[300:750], atol=1e-5, rtol=1e-5)
    # Inside the crossfade both windows contribute.
    assert not torch.allclose(feats[1250], official[1250])


def test_extractor_input_handling(narrow_encoder: WhisperEncoder, speech: np.ndarray) -> None:
    extractor = AudioFeatureExtractor(narrow_encoder)
    pcm = np.round(speech[: 2 * SR] * 32767).astype(np.int16)
    from_int = extractor(pcm)
    from_float = extractor(torch.from_numpy(pcm.astype(np.float32) / 32768.0)[:, None])
    assert torch.equal(from_int, from_float)
    assert extractor(np.zeros(320, dtype=np.float64)).shape == (1, 3, 64)
    with pytest.raises(InputError, match="too short"):
        extractor(np.zeros(319, dtype=np.float32))
    with pytest.raises(InputError, match="mono"):
        extractor(np.zeros((2, SR), dtype=np.float32))


# ---------------------------------------------------------------------------------- the seam


@pytest.fixture(scope="module")
def long_features(tiny_encoder: WhisperEncoder, speech: np.ndarray) -> dict[str, torch.Tensor]:
    """70 s of real speech (the 60 s clip + its first 10 s) through a random tiny encoder."""
    wave = np.concatenate([speech, speech[: 10 * SR]])
    modes = {"official": {"official": True}, "seamless": {}, "hard_cut": {"crossfade_rows": 0}}
    out = {}
    for name, kwargs in modes.items():
        start = time.perf_counter()
        out[name] = AudioFeatureExtractor(tiny_encoder, **kwargs)(wave)
        print(f"{name}: {time.perf_counter() - start:.2f} s for 70 s of audio")
    return out


def _jumps(features: torch.Tensor) -> torch.Tensor:
    """|f[r+1] - f[r]| over all hidden states: jumps[r] is the step from row r to r + 1."""
    return (features[1:] - features[:-1]).flatten(1).norm(dim=1)


OFFICIAL_SEAMS = (1499, 2999)  # steps 30 s and 60 s (rows 1500, 3000)
SEAMLESS_SWITCHES = (1250, 2250)  # mid-overlap switches at 25 s and 45 s


def _split(jumps: torch.Tensor, crossfade: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Jumps near any boundary of either scheme, and all others (the natural distribution)."""
    near = torch.zeros_like(jumps, dtype=torch.bool)
    for seam in OFFICIAL_SEAMS:
        near[seam - 2 : seam + 3] = True
    for switch in SEAMLESS_SWITCHES:
        near[switch - crossfade // 2 - 2 : switch + crossfade // 2 + 2] = True
    return jumps[near], jumps[~near]


def test_official_has_a_seam_every_30s(long_features: dict[str, torch.Tensor]) -> None:
    jumps = _jumps(long_features["official"])
    _, elsewhere = _split(jumps)
    p999 = torch.quantile(elsewhere, 0.999).item()
    for seam in OFFICIAL_SEAMS:
        ratio = jumps[seam].item() / p999
        print(f"official step {seam}->{seam + 1}: {jumps[seam]:.2f} = {ratio:.2f} x p99.9 elsewhere")
        assert ratio > 3.0


def test_seamless_has_no_seam(long_features: dict[str, torch.Tensor]) -> None:
    jumps = _jumps(long_features["seamless"])
    near, elsewhere = _split(jumps)
    p999 = torch.quantile(elsewhere, 0.999).item()
    worst = near.max().item()
    print(f"seamless worst step near boundaries {worst:.2f} = {worst / p999:.3f} x p99.9 elsewhere")
    # No step anywhere near a boundary of either scheme stands out from the natural steps.
    assert worst <= max(1.05 * p999, elsewhere.max().item())
    # Same features as the official far from any boundary (the first window is shared).
    assert torch.equal(long_features["seamless"][:1200], long_features["official"][:1200])


def test_hard_cut_would_leave_a_seam(long_features: dict[str, torch.Tensor]) -> None:
    """Why the crossfade: with a hard switch the position-code change itself is a seam."""
    jumps = _jumps(long_features["hard_cut"])
    _, elsewhere = _split(jumps)
    p999 = torch.quantile(elsewhere, 0.999).item()
    for switch in SEAMLESS_SWITCHES:
        assert jumps[switch - 1].item() > 3.0 * p999


# ------------------------------------------------------------------------------------- dtypes


def test_bf16_extraction_stays_close_to_fp32(
    tiny_encoder: WhisperEncoder, golden: tuple[dict, dict]
) -> None:
    tensors, meta = golden
    wave = tensors["waveform"]
    ref = AudioFeatureExtractor(tiny_encoder, dtype=torch.float32, official=True)(wave)
    low = AudioFeatureExtractor(tiny_encoder, dtype=torch.bfloat16, official=True)(wave)
    assert ref.shape == low.shape == ast.literal_eval(meta["feature_array_shape"])
    assert low.dtype == torch.bfloat16
    assert tiny_encoder.conv1.weight.dtype == torch.float32  # the encoder itself is untouched
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    cosine = F.cosine_similarity(low.float().flatten(1), ref.flatten(1), dim=1).min().item()
    print(f"bf16 vs fp32: relative error {rel:.4f}, min row cosine {cosine:.5f}")
    assert rel < 0.02 and cosine > 0.999
