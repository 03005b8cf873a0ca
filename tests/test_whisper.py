"""Whisper encoder: layout against the reference key list, maths against an explicit
re-derivation, and strict, safe checkpoint loading."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latentdub.errors import WeightsError
from latentdub.models.whisper import TINY_DIMS, LayerNorm, WhisperDims, WhisperEncoder
from latentdub.weights.whisper import load_whisper_checkpoint, save_whisper_safetensors

SMALL_DIMS = WhisperDims(
    n_mels=80, n_audio_ctx=50, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
    n_vocab=100, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_reference(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "whisper_tiny_state_dict.json").read_text())


def _perturbed(dims: WhisperDims, seed: int) -> WhisperEncoder:
    """A random encoder whose every parameter (LayerNorm scales, biases included) is non-trivial."""
    encoder = WhisperEncoder(dims).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("ln.weight") or name.endswith("ln_post.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
    return encoder


# ------------------------------------------------------------------------------- architecture


def test_layout_matches_openai_tiny(tiny_reference: dict) -> None:
    dims = WhisperDims.from_dict(tiny_reference["model_dimensions"])
    assert dims == TINY_DIMS
    encoder = WhisperEncoder(dims)
    expected = {
        key.removeprefix("encoder."): tuple(spec["shape"])
        for key, spec in tiny_reference["keys"].items()
        if key.startswith("encoder.")
    }
    got = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in encoder.parameters()) == tiny_reference["encoder_parameter_count"]
    # The positional embedding is a persistent buffer, not a parameter (as in the reference).
    assert "encoder.positional_embedding" in tiny_reference["buffer_keys"]
    assert "positional_embedding" in dict(encoder.named_buffers())
    assert "positional_embedding" not in dict(encoder.named_parameters())


def test_positional_embedding_is_whisper_sinusoid() -> None:
    pe = WhisperEncoder(TINY_DIMS).positional_embedding.double()
    half = 192
    # channel j < half: sin(t * 10000^(-j/(half-1))); channel half + j: the matching cos.
    for t, j in [(0, 0), (1, 0), (7, 5), (1499, 0), (1499, 100), (300, 191)]:
        rate = 10000.0 ** (-j / (half - 1))
        assert pe[t, j].item() == pytest.approx(math.sin(t * rate), abs=2e-5)
        assert pe[t, half + j].item() == pytest.approx(math.cos(t * rate), abs=2e-5)


def _explicit_encoder(encoder: WhisperEncoder, mel: torch.Tensor) -> torch.Tensor:
    """The encoder written out op by op in float64, with an explicit softmax."""
    p = {k: v.double() for k, v in encoder.state_dict().items()}
    heads = encoder.dims.n_audio_head

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    x = F.gelu(F.conv1d(mel.double(), p["conv1.weight"], p["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1))
    x = x.transpose(1, 2) + p["positional_embedding"][: x.shape[2]]
    states = [x]
    for i in range(encoder.dims.n_audio_layer):
        b = f"blocks.{i}."
        h = ln(x, b + "attn_ln")
        q = h @ p[b + "attn.query.weight"].T + p[b + "attn.query.bias"]
        k = h @ p[b + "attn.key.weight"].T  # the key projection has no bias
        v = h @ p[b + "attn.value.weight"].T + p[b + "attn.value.bias"]
        bsz, length, width = q.shape
        d = width // heads
        q, k, v = (t.reshape(bsz, length, heads, d).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(bsz, length, width)
        x = x + attended @ p[b + "attn.out.weight"].T + p[b + "attn.out.bias"]
        h = ln(x, b + "mlp_ln")
        h = F.gelu(h @ p[b + "mlp.0.weight"].T + p[b + "mlp.0.bias"])
        x = x + h @ p[b + "mlp.2.weight"].T + p[b + "mlp.2.bias"]
        states.append(x)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("frames", [100, 37, 8])
def test_forward_matches_explicit_maths(frames: int) -> None:
    encoder = _perturbed(SMALL_DIMS, seed=1)
    mel = torch.randn(2, 80, frames, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = encoder(mel)
    rows = (frames + 1) // 2  # stride-2 stem with padding 1
    assert out.shape == (2, SMALL_DIMS.n_audio_layer + 1, rows, SMALL_DIMS.n_audio_state)
    expected = _explicit_encoder(encoder, mel)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    # The states are taken before ln_post: applying it changes them, so it was not applied.
    assert not torch.allclose(encoder.ln_post(out[:, -1]), out[:, -1], atol=1e-2)


def test_forward_rejects_bad_input() -> None:
    encoder = WhisperEncoder(SMALL_DIMS)
    with pytest.raises(ValueError, match="mel frames exceed"):
        encoder(torch.zeros(1, 80, 2 * SMALL_DIMS.n_audio_ctx + 2))
    with pytest.raises(ValueError, match="log-mel batch"):
        encoder(torch.zeros(1, 64, 20))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_stay_close(dtype: torch.dtype) -> None:
    encoder = _perturbed(SMALL_DIMS, seed=3)
    mel = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = encoder(mel)
        low = encoder(mel.to(dtype))
    assert low.dtype == dtype
    assert encoder.conv1.weight.dtype == torch.float32  # weights cast on the fly, not changed
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_runs_in_fp32(dtype: torch.dtype) -> None:
    """Half-precision inputs are normalised with fp32 statistics and weights, then cast back
    (a LayerNorm evaluated in half precision differs in about a third of the values here)."""
    gen = torch.Generator().manual_seed(7)
    ln = LayerNorm(384)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(384, generator=gen))
        ln.bias.copy_(0.3 * torch.randn(384, generator=gen))
    x = (30 + 3 * torch.randn(8, 384, generator=gen)).to(dtype)
    expected = F.layer_norm(x.float(), (384,), ln.weight, ln.bias, 1e-5).to(dtype)
    assert torch.equal(ln(x), expected)


# -------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def full_tiny_checkpoint(tiny_reference: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every key of OpenAI's tiny.pt (encoder + decoder) with small random fp16 values."""
    gen = torch.Generator().manual_seed(0)
    state = {
        key: (0.02 * torch.randn(spec["shape"], generator=gen)).half()
        for key, spec in tiny_reference["keys"].items()
    }
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save({"dims": tiny_reference["model_dimensions"], "model_state_dict": state}, path)
    return path, state


def test_full_official_checkpoint_loads_strictly(full_tiny_checkpoint: tuple[Path, dict]) -> None:
    path, state = full_tiny_checkpoint
    encoder = load_whisper_checkpoint(path)
    assert encoder.dims == TINY_DIMS
    assert not encoder.training
    loaded = encoder.state_dict()
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    assert len(encoder_keys) == len(loaded)
    for key in encoder_keys:
        value = loaded[key.removeprefix("encoder.")]
        assert value.dtype == torch.float32  # fp16 file widened like the official
        assert torch.equal(value, state[key].float()), key
    assert all(t.device.type == "cpu" for t in loaded.values())
    with torch.no_grad():
        assert encoder(torch.zeros(1, 80, 20)).shape == (1, 5, 10, 384)


def _encoder_only_state(seed: int = 0) -> dict[str, torch.Tensor]:
    encoder = _perturbed(TINY_DIMS, seed)
    return {f"encoder.{k}": v.half() for k, v in encoder.state_dict().items()}


def _save(path: Path, state: dict, dims: dict | None = None) -> Path:
    torch.save({"dims": dims or TINY_DIMS.to_dict(), "model_state_dict": state}, path)
    return path


def _expect_weights_error(path: Path, *fragments: str) -> str:
    with pytest.raises(WeightsError) as info:
        load_whisper_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def encoder_state() -> dict[str, torch.Tensor]:
    return _encoder_only_state()


def test_encoder_only_checkpoint_loads(encoder_state: dict, tmp_path: Path) -> None:
    encoder = load_whisper_checkpoint(_save(tmp_path / "enc.pt", encoder_state))
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, encoder_state[f"encoder.{key}"].float())


def test_missing_key(encoder_state: dict, tmp_path: Path) -> None:
    state = dict(encoder_state)
    del state["encoder.blocks.2.mlp.0.bias"]
    _expect_weights_error(_save(tmp_path / "m.pt", state), "missing", "blocks.2.mlp.0.bias")


def test_extra_encoder_key(encoder_state: dict, tmp_path: Path) -> None:
    state = dict(encoder_state)
    state["encoder.blocks.0.attn.key.bias"] = torch.zeros(384, dtype=torch.float16)
    _expect_weights_error(_save(tmp_path / "x.pt", state), "unexpected", "blocks.0.attn.key.bias")


def test_wrong_shape(encoder_state: dict, tmp_path: Path) -> None:
    state = dict(encoder_state)
    state["encoder.conv1.weight"] = torch.zeros(384, 80, 5, dtype=torch.float16)
    _expect_weights_error(_save(tmp_path / "s.pt", state), "conv1.weight", "[384, 80, 5]")


def test_non_finite_weights(encoder_state: dict, tmp_path: Path) -> None:
    state = dict(encoder_state)
    state["encoder.ln_post.bias"] = torch.full((384,), float("nan"), dtype=torch.float16)
    _expect_weights_error(_save(tmp_path / "n.pt", state), "ln_post.bias")


def test_foreign_and_odd_decoder_keys(encoder_state: dict, tmp_path: Path) -> None:
    state = dict(encoder_state)
    state["proj_out.weight"] = torch.zeros(2, 2)
    _expect_weights_error(_save(tmp_path / "f.pt", state), "proj_out.weight")
    state = dict(encoder_state)
    state["decoder.mystery.weight"] = torch.zeros(2, 2)
    _expect_weights_error(_save(tmp_path / "d.pt", state), "decoder.mystery.weight")


def test_bad_dims(encoder_state: dict, tmp_path: Path) -> None:
    dims = TINY_DIMS.to_dict()
    del dims["n_audio_head"]
    _expect_weights_error(_save(tmp_path / "dims.pt", encoder_state, dims), "n_audio_head")


def test_truncated_file(full_tiny_checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    data = full_tiny_checkpoint[0].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    _expect_weights_error(path, "corrupt")


def test_garbage_and_missing_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02" + os.urandom(4096))  # looks like a legacy pickle
    _expect_weights_error(garbage, "corrupt")
    _expect_weights_error(tmp_path / "absent.pt", "does not exist")


class Payload:
    """A harmless custom class: weights_only loading must still refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 1


class RunsCommand:
    """Unpickling this would run a shell command (touching a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickles_needing_code_are_refused(encoder_state: dict, tmp_path: Path) -> None:
    custom = tmp_path / "custom.pt"
    torch.save({"dims": TINY_DIMS.to_dict(), "model_state_dict": encoder_state, "x": Payload()}, custom)
    _expect_weights_error(custom, "Refusing", "Payload")

    marker = tmp_path / "was-executed"
    evil = tmp_path / "evil.pt"
    torch.save({"dims": TINY_DIMS.to_dict(), "model_state_dict": {"a": RunsCommand(marker)}}, evil)
    _expect_weights_error(evil, "Refusing", "system")
    assert not marker.exists()


def test_unet_checkpoint_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "latentsync_unet.pt"
    unet_like = {
        "conv_in.weight": torch.zeros(320, 13, 3, 3),
        "down_blocks.0.resnets.0.norm1.weight": torch.zeros(320),
        "up_blocks.3.attentions.2.proj_out.weight": torch.zeros(320, 320, 1, 1),
    }
    torch.save({"state_dict": unet_like, "global_step": 1}, path)
    _expect_weights_error(path, "not an OpenAI Whisper checkpoint", "U-Net")


def test_safetensors_round_trip(tmp_path: Path) -> None:
    encoder = _perturbed(SMALL_DIMS, seed=5)
    path = tmp_path / "whisper.safetensors"
    save_whisper_safetensors(encoder, SMALL_DIMS, path)
    loaded = load_whisper_checkpoint(path)
    assert loaded.dims == SMALL_DIMS
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    # Also recognised by content when renamed.
    renamed = tmp_path / "whisper.bin"
    renamed.write_bytes(path.read_bytes())
    assert load_whisper_checkpoint(renamed).dims == SMALL_DIMS


def test_safetensors_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    encoder = _perturbed(SMALL_DIMS, seed=6)
    no_dims = tmp_path / "nodims.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(no_dims))
    _expect_weights_error(no_dims, "dims")

    good = tmp_path / "good.safetensors"
    save_whisper_safetensors(encoder, SMALL_DIMS, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    _expect_weights_error(truncated, "corrupt")

    wrong = tmp_path / "wrongdims.safetensors"
    other = WhisperDims(**{**SMALL_DIMS.to_dict(), "n_audio_layer": 3})
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(wrong), metadata={"dims": json.dumps(other.to_dict())})
    _expect_weights_error(wrong, "missing", "blocks.2.")
