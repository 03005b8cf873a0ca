"""The LatentSync-compatible 3-D U-Net against the official golden tensors and manifests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from latentdub.models import DeepCache, UNet3DConditionModel, UNetConfig, unet_config
from latentdub.models.resnet import VideoGroupNorm

ATOL = 1e-4  # golden tolerance (float64 / explicit-softmax recomputations agree within 3.3e-6)
BLOCKS = ["time_embedding", "conv_in", "mid_block"] + [
    f"{kind}.{i}" for kind in ("down_blocks", "up_blocks") for i in range(4)
]


@pytest.fixture(scope="module")
def small_config(reference_dir) -> dict:
    return json.loads((reference_dir / "golden_unet_small_config.json").read_text())["model_config"]


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def golden(request, reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / f"golden_unet_small_seed{request.param}.safetensors")


@pytest.fixture(scope="module")
def golden1(reference_dir) -> dict[str, torch.Tensor]:
    """B=2, F=6, 16x24, per-sample timesteps (the cheaper file to run)."""
    return load_file(reference_dir / "golden_unet_small_seed1.safetensors")


def _state_dict(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "state_dict."
    return {k[len(p) :]: v for k, v in g.items() if k.startswith(p)}


def _model(config: dict, g: dict[str, torch.Tensor]) -> UNet3DConditionModel:
    model = UNet3DConditionModel.from_config(config).eval()
    model.load_state_dict(_state_dict(g), strict=True)
    return model


def _inputs(g):
    return g["input.sample"], g["input.timestep"], g["input.encoder_hidden_states"]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# golden equivalence


@torch.inference_mode()
def test_golden_outputs_and_intermediates(small_config, golden):
    model = _model(small_config, golden)
    sample, t, audio = _inputs(golden)
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, _inp, out):
            captured[name] = out[0] if isinstance(out, tuple) else out

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in BLOCKS]
    out = model(sample, t, audio)
    for h in handles:
        h.remove()

    assert out.shape == golden["output.sample"].shape
    assert _maxdiff(out, golden["output.sample"]) < ATOL
    assert sorted(captured) == sorted(BLOCKS)
    for name in BLOCKS:
        assert _maxdiff(captured[name], golden[f"intermediate.{name}"]) < ATOL, name

    out_none = model(sample, t, None)
    assert _maxdiff(out_none, golden["output.sample_audio_none"]) < ATOL
    out_zeros = model(sample, t, torch.zeros_like(audio))
    assert _maxdiff(out_zeros, golden["output.sample_audio_zeros"]) < ATOL
    # None and zeros are different things (norm2/attn2 skipped vs run on zeros)
    assert _maxdiff(out_none, out_zeros) > 10 * ATOL

    # 4-D audio layout (B, F, L, D) is the same as (B*F, L, D) in (b f) order
    b, _, f = sample.shape[:3]
    out4 = model(sample, t, audio.reshape(b, f, *audio.shape[1:]))
    assert _maxdiff(out4, out) == 0.0


@torch.inference_mode()
def test_golden_comparison_can_fail(small_config, golden1):
    """Sensitivity: a wrong audio order or a tiny weight change breaks the tolerance."""
    model = _model(small_config, golden1)
    sample, t, audio = _inputs(golden1)  # B = 2
    ref = golden1["output.sample"]
    assert _maxdiff(model(sample, t, audio), ref) < ATOL

    # (f b) instead of (b f) audio order
    b = sample.shape[0]
    swapped = audio.reshape(b, -1, *audio.shape[1:]).transpose(0, 1).flatten(0, 1)
    assert _maxdiff(model(sample, t, swapped), ref) > 100 * ATOL

    # a perturbation of 1e-2 in one bias of the deepest motion module
    key = "down_blocks.3.motion_modules.1.temporal_transformer.proj_out.bias"
    with torch.no_grad():
        model.get_parameter(key).add_(1e-2)
    assert _maxdiff(model(sample, t, audio), ref) > ATOL


@torch.inference_mode()
def test_timestep_forms(small_config, golden1):
    model = _model(small_config, golden1)
    sample, _, audio = _inputs(golden1)  # B = 2
    ref = model(sample, torch.tensor([501, 501]), audio)
    for t in (501, 501.0, torch.tensor(501), torch.tensor([501])):
        assert _maxdiff(model(sample, t, audio), ref) == 0.0
    per_sample = model(sample, torch.tensor([501, 21]), audio)
    assert _maxdiff(per_sample[:1], ref[:1]) == 0.0
    assert _maxdiff(per_sample[1:], ref[1:]) > 10 * ATOL
    with pytest.raises(ValueError, match="timestep"):
        model(sample, torch.tensor([1, 2, 3]), audio)


def _half_precision_error(config, g, dtype) -> float:
    model = _model(config, g).to(dtype)
    sample, t, audio = _inputs(g)
    out = model(sample.to(dtype), t, audio.to(dtype))
    assert out.dtype == dtype
    ref = g["output.sample"]
    return ((out.float() - ref).norm() / ref.norm()).item()


@torch.inference_mode()
def test_bf16_forward_close_to_fp32(small_config, golden):
    assert _half_precision_error(small_config, golden, torch.bfloat16) < 5e-2


@torch.inference_mode()
def test_fp16_forward_close_to_fp32(small_config, golden1):
    assert _half_precision_error(small_config, golden1, torch.float16) < 1e-2


# ---------------------------------------------------------------------------------------------
# full configs: key layout and size


@pytest.mark.parametrize("version", ["1.5", "1.6"])
def test_full_config_state_dict_layout(reference_dir, version):
    manifest = json.loads((reference_dir / f"unet_{version}_state_dict.json").read_text())
    assert unet_config(version) == manifest["model_config"]
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(manifest["model_config"])
    sd = model.state_dict()
    assert len(sd) == manifest["num_keys"] == 1246
    assert list(sd) == list(manifest["keys"])  # same keys, same order
    for key, spec in manifest["keys"].items():
        assert list(sd[key].shape) == spec["shape"], key
        assert str(sd[key].dtype).removeprefix("torch.") == spec["dtype"], key
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameter_count"]
    assert manifest["total_parameter_count"] == 1_267_099_844
    assert sorted(n for n, _ in model.named_buffers()) == sorted(manifest["buffer_keys"])
    assert model.max_frames == 24


def test_v10_config_has_no_motion_modules(reference_dir):
    manifest = json.loads((reference_dir / "unet_1.5_state_dict.json").read_text())
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(unet_config("1.0"))
    keys = set(model.state_dict())
    assert not any("motion_modules" in k for k in keys)
    assert keys == {k for k in manifest["keys"] if "motion_modules." not in k}
    assert sum(p.numel() for p in model.parameters()) == 849_962_244
    assert model.max_frames is None


# ---------------------------------------------------------------------------------------------
# DeepCache


@torch.inference_mode()
def test_deepcache_shallow_step_equals_full_on_same_inputs(small_config, golden1):
    model = _model(small_config, golden1)
    sample, t, audio = _inputs(golden1)
    ref = model(sample, t, audio)

    cache = DeepCache(interval=3)
    full = model(sample, t, audio, deep_cache=cache)  # step 0: full
    shallow = model(sample, t, audio, deep_cache=cache)  # step 1: shallow, cached deep part
    assert cache.step == 2
    assert _maxdiff(full, ref) < 1e-5
    assert _maxdiff(shallow, ref) < 1e-5

    # a changed sample: the shallow step uses stale deep features by design
    moved = sample + 0.1 * torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
    fresh = model(moved, t, audio)
    stale = model(moved, t, audio, deep_cache=cache)  # step 2: shallow
    assert _maxdiff(stale, fresh) > 1e-3
    assert _maxdiff(model(moved, t, audio, deep_cache=cache), fresh) < 1e-5  # step 3: full

    # reset starts a new window with a full step; a shape change forces a full step
    cache.reset()
    assert _maxdiff(model(moved, t, audio, deep_cache=cache), fresh) < 1e-5
    shorter = moved[:, :, :4]
    ref_short = model(shorter, t, audio.reshape(sample.shape[0], -1, *audio.shape[1:])[:, :4])
    out_short = model(
        shorter, t, audio.reshape(sample.shape[0], -1, *audio.shape[1:])[:, :4], deep_cache=cache
    )
    assert _maxdiff(out_short, ref_short) < 1e-5

    with pytest.raises(ValueError):
        DeepCache(interval=0)


# ---------------------------------------------------------------------------------------------
# input checks, config checks, odd sizes, building blocks


@torch.inference_mode()
def test_window_longer_than_position_encoding_raises(small_config):
    model = UNet3DConditionModel.from_config(small_config).eval()
    x = torch.randn(1, 13, 25, 8, 8)
    with pytest.raises(ValueError, match="at most 24 frames"):
        model(x, 10, torch.randn(25, 50, 32))
    assert model(x[:, :, :24], 10, torch.randn(24, 50, 32)).shape == (1, 4, 24, 8, 8)


@torch.inference_mode()
def test_bad_audio_shapes_raise(small_config):
    model = UNet3DConditionModel.from_config(small_config).eval()
    x = torch.randn(2, 13, 3, 8, 8)
    for bad in (torch.randn(3, 50, 32), torch.randn(3, 2, 50, 32), torch.randn(6, 50, 16)):
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            model(x, 10, bad)


def test_config_validation(small_config):
    cfg = dict(small_config)
    UNetConfig.from_dict({**cfg, "sample_size": 32, "_class_name": "UNet3DConditionModel"})
    for key, value in [
        ("use_inflated_groupnorm", True),
        ("motion_module_type", "Conv"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("use_linear_projection", True),
        ("mid_block_type", "UNetMidBlock3DSimpleCrossAttn"),
    ]:
        with pytest.raises(ValueError, match=key):
            UNetConfig.from_dict({**cfg, key: value})
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**cfg, "no_such_key": 1})
    with pytest.raises(ValueError, match="Temporal_Self"):
        UNetConfig.from_dict(
            {**cfg, "motion_module_kwargs": {"attention_block_types": ["Temporal_Cross"]}}
        )
    with pytest.raises(ValueError, match="version"):
        unet_config("2.0")
    model = UNet3DConditionModel.from_config(cfg)
    assert model.config == cfg and model.config is not cfg


@torch.inference_mode()
def test_latent_size_not_multiple_of_8_and_attention_chunking(small_config, golden1):
    model = _model(small_config, golden1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 13, 4, 12, 20, generator=g)
    audio = torch.randn(4, 50, 32, generator=g)
    out = model(x, 300, audio)
    assert out.shape == (1, 4, 4, 12, 20)
    assert torch.isfinite(out).all()
    model.set_attention_batch_chunk(3)
    assert _maxdiff(model(x, 300, audio), out) < 1e-5
    model.set_attention_batch_chunk(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_group_norm_matches_5d_group_norm(dtype):
    g = torch.Generator().manual_seed(0)
    norm = VideoGroupNorm(4, 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
    x = (torch.randn(2, 3, 16, 5, 6, generator=g) * 3 + 7).to(dtype)
    frame_major = x.transpose(1, 2)  # logical (B, C, F, H, W), frames outermost in memory
    ref = torch.nn.functional.group_norm(frame_major.float(), 4, norm.weight, norm.bias, 1e-5)
    norm = norm.to(dtype)
    out = norm(frame_major)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert _maxdiff(out, ref) < tol
    assert _maxdiff(norm(frame_major.contiguous()), ref) < tol  # native fallback path
