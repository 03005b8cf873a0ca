"""The DDIM scheduler and the VAE: official configuration, strict loading, forced scaling."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from latentdub.errors import WeightsError
from latentdub.models.scheduler import OFFICIAL_SCHEDULER_CONFIG, build_scheduler
from latentdub.models.vae import build_vae
from latentdub.weights import load_vae
from latentdub.weights.tiny import TINY_VAE_CONFIG

# ᾱ at the 20 timesteps as listed in latentsync.md §1.3 (diffusers 0.32.2, official config).
ALPHA_BARS_20 = [
    0.008155, 0.014005, 0.023077, 0.036546, 0.055719, 0.081917, 0.116325, 0.159816, 0.212782,
    0.274999, 0.345558, 0.422881, 0.504818, 0.588818, 0.672151, 0.752143, 0.826399, 0.892980,
    0.950524, 0.998296,
]  # fmt: skip


# ----------------------------------------------------------------------------- scheduler


def test_scheduler_20_steps_timesteps_and_alphas() -> None:
    sched = build_scheduler()
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == list(range(951, 0, -50))
    assert sched.init_noise_sigma == 1
    alpha_bars = sched.alphas_cumprod[sched.timesteps].tolist()
    assert alpha_bars == pytest.approx(ALPHA_BARS_20, abs=2e-6)
    # set_alpha_to_one False: the step after t=1 uses alphas_cumprod[0], not 1.
    assert float(sched.final_alpha_cumprod) == pytest.approx(0.99915, abs=1e-6)


def _alpha_bars_by_formula() -> torch.Tensor:
    """ᾱ_t of SD 1.x's "scaled_linear" schedule, derived here in float64: β linear in √β
    from √0.00085 to √0.012 over 1000 steps, ᾱ_t = Π_{s<=t} (1 - β_s)."""
    sqrt_betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64)
    return torch.cumprod(1 - sqrt_betas**2, dim=0)


def test_scheduler_50_steps_and_noise_schedule() -> None:
    sched = build_scheduler()
    sched.set_timesteps(50)
    # "leading" spacing: 1000 // 50 = 20 apart, shifted by steps_offset = 1.
    assert sched.timesteps.tolist() == list(range(981, 0, -20))
    expected = _alpha_bars_by_formula()
    torch.testing.assert_close(sched.alphas_cumprod.double(), expected, atol=2e-6, rtol=1e-5)
    # The formula agrees with the values listed in latentsync.md (a check on the check).
    listed = expected[list(range(951, 0, -50))].tolist()
    assert listed == pytest.approx(ALPHA_BARS_20, abs=2e-6)
    with pytest.raises(TypeError):  # the shared official config cannot be mutated by accident
        OFFICIAL_SCHEDULER_CONFIG["steps_offset"] = 0  # type: ignore[index]


def test_scheduler_predicts_epsilon_without_clipping() -> None:
    """epsilon prediction: given the exact ε, the step's x̂0 is the true x0; clip_sample off:
    an x0 far outside [-1, 1] is not clipped."""
    sched = build_scheduler()
    sched.set_timesteps(1)  # timesteps [1]: one step from t=1 to the final alpha
    assert sched.timesteps.tolist() == [1]
    g = torch.Generator().manual_seed(5)
    x0 = 3 * torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.float64)  # |x0| up to ~10
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a1 = _alpha_bars_by_formula()[1]
    x1 = a1.sqrt() * x0 + (1 - a1).sqrt() * eps
    out = sched.step(eps.float(), 1, x1.float(), eta=0.0)
    torch.testing.assert_close(out.pred_original_sample.double(), x0, atol=1e-4, rtol=1e-4)
    assert out.pred_original_sample.abs().max() > 1.5


def test_scheduler_step_is_deterministic_ddim() -> None:
    """One eta=0 DDIM step equals the closed form x_prev = √ᾱ' x̂0 + √(1-ᾱ') ε, with ᾱ from
    the schedule's formula (not from the scheduler under test)."""
    sched = build_scheduler()
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    alpha_bars = _alpha_bars_by_formula()
    t, t_prev = 951, 901
    a, a_prev = alpha_bars[t], alpha_bars[t_prev]
    x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps.double()
    out = sched.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    # Last step (t=1): set_alpha_to_one False, so it lands on ᾱ_0 = 1 - β_0, not on 1.
    last = sched.step(eps, 1, x, eta=0.0).prev_sample
    a1, a0 = alpha_bars[1], 1 - 0.00085
    x0 = (x.double() - (1 - a1).sqrt() * eps.double()) / a1.sqrt()
    expected_last = a0**0.5 * x0 + (1 - a0) ** 0.5 * eps.double()
    torch.testing.assert_close(last.double(), expected_last, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- VAE


def test_sd_vae_config_architecture() -> None:
    """The default build is sd-vae-ft-mse: its published parameter count (83,653,863; encoder
    34,163,592, decoder 49,490,179) and a downscale of 8 to 4 latent channels."""
    vae = build_vae().eval()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in vae.encoder.parameters()) == 34_163_592
    assert sum(p.numel() for p in vae.decoder.parameters()) == 49_490_179
    assert vae.config.scaling_factor == 0.18215 and not vae.config.shift_factor
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert latent.shape == (1, 4, 8, 6)


def _save_tiny_vae(folder: Path, *, config_overrides: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    vae = build_vae(TINY_VAE_CONFIG)
    vae.save_pretrained(folder, safe_serialization=True)
    if config_overrides:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config_overrides)
        (folder / "config.json").write_text(json.dumps(cfg))
    return vae


def test_load_vae_forces_official_scaling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = _save_tiny_vae(tmp_path, config_overrides={"scaling_factor": 0.5, "shift_factor": 0.1})
    with caplog.at_level(logging.WARNING, logger="latentdub.weights"):
        vae = load_vae(tmp_path)
    assert vae.config.scaling_factor == 0.18215
    assert not vae.config.shift_factor  # 0 / None: no shift, as in the official code
    assert "scaling_factor 0.5" in caplog.text
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(lat, ref.encode(x).latent_dist.mean)
        assert lat.shape == (1, 4, 8, 8)  # 4 levels -> downscale 8
        assert vae.decode(lat).sample.shape == (1, 3, 64, 64)


def test_load_vae_old_attention_names_from_bin(tmp_path: Path) -> None:
    """Old diffusers files (like sd-vae-ft-mse's) use query/key/value/proj_attn; a .bin is read
    with weights_only and the names are mapped."""
    ref = _save_tiny_vae(tmp_path)
    old = {}
    for k, v in ref.state_dict().items():
        for new_name, old_name in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            k = k.replace(new_name, old_name)
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    loaded = load_vae(tmp_path).state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(loaded[k], v)


def test_load_vae_bin_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    _save_tiny_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="would run code") as err:
        load_vae(tmp_path)
    assert "diffusion_pytorch_model.bin" in str(err.value)
    assert not marker.exists()


def test_load_vae_strict(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _save_tiny_vae(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["decoder.conv_out.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    save_file(sd, weights)
    with pytest.raises(WeightsError) as err:
        load_vae(tmp_path)
    msg = str(err.value)
    assert str(weights) in msg
    assert "decoder.conv_out.weight" in msg and "encoder.extra.weight" in msg


def test_load_vae_missing_folder_parts(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_vae(tmp_path / "nope")
    with pytest.raises(WeightsError, match=r"no config\.json"):
        load_vae(tmp_path)
    _save_tiny_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no weights"):
        load_vae(tmp_path)
