"""Evaluation SyncNet: layout against the reference key list, strict loading of the raw
state-dict file, tiny random models, the MFCC front end and the LSE offset/confidence maths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdub.errors import InputError, WeightsError
from latentdub.evaluation.syncnet import (
    audio_levels,
    average_scores,
    lip_sync_scores,
    mfcc,
    scores_from_embeddings,
)
from latentdub.models.syncnet import SYNCNET_V2_DIMS, TINY_SYNCNET_DIMS, SyncNet, SyncNetDims
from latentdub.weights.syncnet import (
    load_syncnet,
    make_tiny_syncnet,
    read_syncnet_sidecar,
    sidecar_path,
)


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "syncnet_v2_eval_state_dict.json").read_text())


# ------------------------------------------------------------------------------ architecture


def test_full_model_matches_reference_keys_and_shapes(reference: dict) -> None:
    with torch.device("meta"):
        model = SyncNet(SYNCNET_V2_DIMS)
    state = model.state_dict()
    ref = reference["keys"]
    assert len(ref) == reference["num_keys"] == 102
    assert list(state) == list(ref) or set(state) == set(ref)
    for key, info in ref.items():
        assert list(state[key].shape) == info["shape"], key
        assert str(state[key].dtype) == "torch." + info["dtype"], key
    assert sum(p.numel() for p in model.parameters()) == reference["total_parameter_count"]
    assert sum(t.numel() for t in state.values()) == reference["total_state_dict_numel"]
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == set(reference["buffer_keys"])


def test_full_model_forward_shapes(reference: dict) -> None:
    torch.manual_seed(0)
    model = SyncNet().eval()
    shapes = reference["input_shapes"]
    with torch.no_grad():
        a = model.forward_audio(torch.randn(*shapes["forward_aud(MFCC)"]))
        v = model.forward_video(torch.rand(*shapes["forward_lip"]) * 255)
    assert list(a.shape) == reference["output_shapes"]["forward_aud"]
    assert list(v.shape) == reference["output_shapes"]["forward_lip"]


def test_dims_validation_and_round_trip() -> None:
    assert SyncNetDims.from_dict(TINY_SYNCNET_DIMS.to_dict()) == TINY_SYNCNET_DIMS
    assert SYNCNET_V2_DIMS.video_final_kernel == 6
    with pytest.raises(ValueError, match="too small"):
        SyncNetDims(image_size=16)
    with pytest.raises(ValueError, match="six positive"):
        SyncNetDims(audio_widths=(1, 2))
    with pytest.raises(ValueError, match="audio input"):
        SyncNet(TINY_SYNCNET_DIMS).forward_audio(torch.zeros(1, 1, 13, 19))


# ---------------------------------------------------------------------------------- weights


def test_tiny_round_trip(tmp_path: Path) -> None:
    path = make_tiny_syncnet(tmp_path / "auxiliary" / "syncnet_v2.model", seed=3)
    raw = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())  # raw state dict, as official
    side = read_syncnet_sidecar(path)
    assert side["random_weights"] is True and "RANDOM" in side["warning"]
    model = load_syncnet(path)
    assert model.random_weights is True and model.dims == TINY_SYNCNET_DIMS
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key
    x = torch.randn(2, 1, 13, 20)
    with torch.no_grad():
        assert torch.allclose(model.forward_audio(x), load_syncnet(path).forward_audio(x))
    # Same seed, same file content; refuses to overwrite a non-random file.
    again = make_tiny_syncnet(tmp_path / "again.model", seed=3)
    other = torch.load(again, weights_only=True)
    assert all(torch.equal(raw[k], other[k]) for k in raw)
    sidecar_path(again).unlink()
    with pytest.raises(WeightsError, match="refusing"):
        make_tiny_syncnet(again)


def _official_like_file(tmp_path: Path, mutate) -> Path:
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in SyncNet().state_dict().items()}
    state = {k: torch.zeros(s, dtype=d) for k, (s, d) in shapes.items()}
    mutate(state)
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)
    return path


def test_official_layout_loads_strictly(tmp_path: Path) -> None:
    model = load_syncnet(_official_like_file(tmp_path, lambda s: None))
    assert model.dims == SYNCNET_V2_DIMS and model.random_weights is False


def test_missing_key_is_refused(tmp_path: Path) -> None:
    path = _official_like_file(tmp_path, lambda s: s.pop("netfclip.3.weight"))
    with pytest.raises(WeightsError, match="missing keys") as err:
        load_syncnet(path)
    assert "netfclip.3.weight" in str(err.value) and "syncnet_v2.model" in str(err.value)


def test_extra_key_is_refused(tmp_path: Path) -> None:
    path = _official_like_file(tmp_path, lambda s: s.update(extra=torch.zeros(1)))
    with pytest.raises(WeightsError, match="unexpected keys") as err:
        load_syncnet(path)
    assert "extra" in str(err.value)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    def mutate(s: dict) -> None:
        s["netcnnlip.0.weight"] = torch.zeros(96, 1, 5, 7, 7)  # a grayscale-input variant

    with pytest.raises(WeightsError, match="wrong shape") as err:
        load_syncnet(_official_like_file(tmp_path, mutate))
    assert "netcnnlip.0.weight" in str(err.value)


def _tiny_state_without_counters(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny random SyncNet re-saved without its BatchNorm ``num_batches_tracked`` keys, as
    a state dict written by torch < 0.4.1 is."""
    path = make_tiny_syncnet(tmp_path / "syncnet_v2.model", seed=5)
    state = torch.load(path, weights_only=True)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters  # the model has BatchNorm layers, else this test proves nothing
    for k in counters:
        del state[k]
    torch.save(state, path)
    return path, state


def test_file_without_batchnorm_counters_loads(tmp_path: Path) -> None:
    path, state = _tiny_state_without_counters(tmp_path)
    model = load_syncnet(path)
    loaded = model.state_dict()
    for k, v in state.items():  # every stored weight and statistic arrives unchanged
        assert torch.equal(loaded[k], v), k
    counters = {k: v for k, v in loaded.items() if k.endswith("num_batches_tracked")}
    assert counters and all(int(v) == 0 for v in counters.values())
    # Same outputs as the complete file: the counters play no part in eval mode.
    full = load_syncnet(make_tiny_syncnet(tmp_path / "full.model", seed=5))
    x = torch.rand(2, 3, 5, full.dims.image_size, full.dims.image_size) * 255
    assert torch.equal(model.forward_video(x), full.forward_video(x))


def test_file_without_counters_still_refuses_a_missing_weight(tmp_path: Path) -> None:
    path, state = _tiny_state_without_counters(tmp_path)
    victim = next(k for k in state if k.endswith("running_var"))
    del state[victim]
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing keys") as err:
        load_syncnet(path)
    assert victim in str(err.value)
    assert "num_batches_tracked" not in str(err.value)  # only the real gap is named


def test_file_without_counters_still_refuses_an_extra_key(tmp_path: Path) -> None:
    path, state = _tiny_state_without_counters(tmp_path)
    state["netcnnlip.99.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    torch.save(state, path)
    with pytest.raises(WeightsError, match="unexpected keys") as err:
        load_syncnet(path)
    assert "netcnnlip.99.num_batches_tracked" in str(err.value)


def test_wrapped_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stable_syncnet.pt"
    torch.save({"state_dict": {"audio_encoder.conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match="not the evaluation model"):
        load_syncnet(path)


# -------------------------------------------------------------------------------------- MFCC


def test_mfcc_of_pure_tone() -> None:
    t = np.arange(32_000) / 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    cc = mfcc(tone)
    assert cc.shape == (13, 1 + int(np.ceil((32_000 - 400) / 160)))  # 199: ~100 per second
    assert np.isfinite(cc).all()
    # c0 is the log frame energy: steady for a steady tone (the zero-padded last frame aside)
    # and up by 2 ln 2 at double amplitude, which leaves c1..c12 unchanged (a constant offset
    # of the log filterbank only moves the DCT's DC term).
    assert np.ptp(cc[0, 1:-2]) < 1e-6
    loud = mfcc(tone.astype(np.float64) * 2)
    assert np.allclose(loud[0] - cc[0], 2 * np.log(2))
    assert np.allclose(loud[1:], cc[1:], atol=1e-6)
    assert np.isfinite(mfcc(np.zeros(16_000))).all()  # silence: eps floor, no -inf


def _as_official_wav(signal: np.ndarray) -> np.ndarray:
    """``signal`` (float32 in [-1, 1], 16 kHz) through the official route: FFmpeg's
    libswresample writes a pcm_s16le WAV, ``scipy.io.wavfile.read`` reads it back as int16."""
    import io

    import av
    from scipy.io import wavfile

    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=16_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(signal[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = 16_000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    rate, data = wavfile.read(buf)
    assert rate == 16_000 and data.dtype == np.int16
    return data


def _quiet_float_audio(seconds: float = 1.0) -> np.ndarray:
    """A quiet tone with sub-level float noise: rounding to int16 levels changes it."""
    rng = np.random.default_rng(7)
    t = np.arange(int(16_000 * seconds)) / 16_000
    x = 0.002 * np.sin(2 * np.pi * 220 * t) + rng.normal(scale=1.5e-5, size=t.size)
    x[4000:6000] = rng.normal(scale=1e-5, size=2000)  # "silence" of float noise (< 1 level)
    x[100] = 1.5  # one clipped sample
    return x.astype(np.float32)


def test_mfcc_input_is_the_int16_wav_the_official_code_reads() -> None:
    x = _quiet_float_audio()
    wav = _as_official_wav(x)
    assert np.array_equal(audio_levels(x), wav.astype(np.float64))
    assert np.array_equal(mfcc(audio_levels(x)), mfcc(wav))
    # The test can fail: without rounding the features differ (most in the near-silence).
    unrounded = mfcc(x.astype(np.float64) * 32768.0)
    assert np.abs(unrounded - mfcc(wav)).max() > 1.0


def test_scores_of_float_audio_equal_scores_of_its_int16_wav(tmp_path: Path) -> None:
    model = load_syncnet(make_tiny_syncnet(tmp_path / "s.model", seed=2))
    rng = np.random.default_rng(3)
    size = model.dims.image_size
    crops = rng.integers(0, 256, size=(30, size, size, 3), dtype=np.uint8)
    x = _quiet_float_audio(30 / 25)
    a = lip_sync_scores(crops, x, model)
    b = lip_sync_scores(crops, _as_official_wav(x), model)
    assert a.offset_distances == b.offset_distances


# ------------------------------------------------------------------------------- LSE maths


def _embeddings_with_offset(n: int, k: int, dim: int = 16, seed: int = 0):
    """Audio window t matches video window t + k (the video lags by k frames)."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(size=(n, dim))
    video = rng.normal(size=(n, dim))
    for i in range(n):
        if 0 <= i - k < n:
            video[i] = audio[i - k] + 0.01 * rng.normal(size=dim)
    return video, audio


@pytest.mark.parametrize("k", [0, 3, -7, 15])
def test_offset_search_finds_known_shift(k: int) -> None:
    video, audio = _embeddings_with_offset(60, k)
    scores = scores_from_embeddings(video, audio)
    assert scores.offset == k
    assert scores.lse_c > 1.0
    assert len(scores.offset_distances) == 31 and len(scores.per_frame_distance) == 60
    assert scores.lse_d == pytest.approx(min(scores.offset_distances))
    assert scores.lse_c == pytest.approx(np.median(scores.offset_distances) - scores.lse_d)


def test_confidence_falls_when_pairs_are_shuffled() -> None:
    video, audio = _embeddings_with_offset(60, 2)
    good = scores_from_embeddings(video, audio)
    shuffled = scores_from_embeddings(video, audio[np.random.default_rng(1).permutation(60)])
    assert shuffled.lse_c < good.lse_c / 3
    assert shuffled.lse_d > good.lse_d
    c, d = average_scores([good, shuffled])
    assert c == pytest.approx((good.lse_c + shuffled.lse_c) / 2)
    assert d == pytest.approx((good.lse_d + shuffled.lse_d) / 2)


class _FakeSyncNet:
    """Hands out fixed embeddings in the order windows are asked for (time order)."""

    def __init__(self, video: np.ndarray, audio: np.ndarray) -> None:
        self.video = torch.tensor(video, dtype=torch.float32)
        self.audio = torch.tensor(audio, dtype=torch.float32)
        self.nv = self.na = 0
        self.video_shapes: list[tuple[int, ...]] = []

    def forward_video(self, x: torch.Tensor) -> torch.Tensor:
        self.video_shapes.append(tuple(x.shape))
        out = self.video[self.nv : self.nv + x.shape[0]]
        self.nv += x.shape[0]
        return out

    def forward_audio(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[1:]) == (1, 13, 20)
        out = self.audio[self.na : self.na + x.shape[0]]
        self.na += x.shape[0]
        return out


def test_lip_sync_scores_end_to_end_with_fake_model() -> None:
    frames, seconds = 50, 2.0
    n_windows = frames - 5
    video, audio = _embeddings_with_offset(n_windows, 4, seed=5)
    fake = _FakeSyncNet(video, audio)
    crops = np.random.default_rng(0).integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)
    sound = np.random.default_rng(1).normal(scale=0.1, size=int(seconds * 16_000))
    scores = lip_sync_scores(crops, sound, fake, batch_size=7)
    assert fake.nv == fake.na == n_windows
    assert all(s[1:] == (3, 5, 32, 32) for s in fake.video_shapes)
    assert scores.offset == 4 and scores.lse_c > 0
    assert len(scores.per_frame_distance) == n_windows
    with pytest.raises(InputError, match="too short"):
        lip_sync_scores(crops[:5], sound, _FakeSyncNet(video, audio))


def test_lip_sync_scores_with_tiny_random_model(tmp_path: Path) -> None:
    model = load_syncnet(make_tiny_syncnet(tmp_path / "s.model"))
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (12, 40, 40), dtype=np.uint8)  # grayscale, resized to 96
    sound = rng.normal(scale=0.1, size=16_000).astype(np.float32)
    scores = lip_sync_scores(crops, sound, model)
    assert scores.random_weights is True
    assert -15 <= scores.offset <= 15 and scores.lse_c >= 0
    assert np.isfinite(scores.per_frame_distance).all() and len(scores.per_frame_distance) == 7
