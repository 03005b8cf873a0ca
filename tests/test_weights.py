"""Resolving a local folder, make-tiny, strict loading, tampered checkpoints, 1.0 key mapping."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from latentdub.errors import WeightsError
from latentdub.models.unet import UNet3DConditionModel
from latentdub.weights import (
    ModelFiles,
    load_unet,
    load_vae,
    load_whisper,
    make_tiny,
    resolve_weights,
)
from latentdub.weights.checkpoint import load_module_strict
from latentdub.weights.tiny import tiny_unet_config, tiny_unet_state_dict


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _unet_inputs(cross_dim: int, frames: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 13, frames, 8, 8, generator=g), torch.randn(
        frames, 50, cross_dim, generator=g
    )


# ----------------------------------------------------------------------------- make-tiny


def test_make_tiny_layout_and_formats(tiny_weights: Path) -> None:
    cfg = json.loads((tiny_weights / "latentdub.json").read_text())
    assert cfg["random_weights"] is True and cfg["resolution"] == 256
    assert "RANDOM WEIGHTS" in (tiny_weights / "README.txt").read_text()

    unet = torch.load(tiny_weights / "latentsync_unet.pt", weights_only=True)
    assert set(unet) == {"state_dict", "global_step"} and unet["global_step"] == 0
    # Small non-zero weights everywhere (the official init would zero conv_out).
    assert unet["state_dict"]["conv_out.weight"].abs().sum() > 0

    whisper = torch.load(tiny_weights / "whisper" / "tiny.pt", weights_only=True)
    assert set(whisper) == {"dims", "model_state_dict"}
    assert all(v.dtype == torch.float16 for v in whisper["model_state_dict"].values())

    vae_cfg = json.loads((tiny_weights / "sd-vae-ft-mse" / "config.json").read_text())
    assert vae_cfg["_class_name"] == "AutoencoderKL" and len(vae_cfg["block_out_channels"]) == 4
    assert (tiny_weights / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_whisper_has_the_openai_key_layout(tiny_weights: Path, reference_dir: Path) -> None:
    """Same 167 keys as the real tiny.pt; shapes follow the real ones with our dims substituted."""
    ref = json.loads((reference_dir / "whisper_tiny_state_dict.json").read_text())
    ours = torch.load(tiny_weights / "whisper" / "tiny.pt", weights_only=True)
    sd, dims = ours["model_state_dict"], ours["dims"]
    assert set(sd) == set(ref["keys"])
    real = ref["model_dimensions"]
    scale = {
        real["n_audio_state"]: dims["n_audio_state"],
        4 * real["n_audio_state"]: 4 * dims["n_audio_state"],
        real["n_mels"]: dims["n_mels"],
        real["n_audio_ctx"]: dims["n_audio_ctx"],
        real["n_text_ctx"]: dims["n_text_ctx"],
        real["n_vocab"]: dims["n_vocab"],
        3: 3,
    }
    for key, info in ref["keys"].items():
        assert list(sd[key].shape) == [scale[n] for n in info["shape"]], key
    assert dims["n_audio_layer"] == real["n_audio_layer"] == 4  # 5 hidden states, as the real one


def _key_template(key: str) -> str:
    """``down_blocks.2.attentions.0.x`` -> ``down_blocks.N.attentions.N.x``: the kind of
    parameter, whatever the number of blocks and layers."""
    return re.sub(r"\.\d+(?=\.)", ".N", key)


def test_tiny_unet_keeps_the_official_structure(tiny_weights: Path, reference_dir: Path) -> None:
    """Smaller, but every kind of parameter of the official 1.5 UNet is there (all block types,
    motion modules with their position tables, audio cross-attention) and nothing else."""
    ref = json.loads((reference_dir / "unet_1.5_state_dict.json").read_text())
    sd = torch.load(tiny_weights / "latentsync_unet.pt", weights_only=True)["state_dict"]
    assert {_key_template(k) for k in sd} == {_key_template(k) for k in ref["keys"]}
    assert len(sd) < ref["num_keys"]  # fewer layers per block

    cfg = json.loads((tiny_weights / "latentdub.json").read_text())["unet_config"]
    official = ref["model_config"]
    assert set(cfg["down_block_types"]) == set(official["down_block_types"])
    assert set(cfg["up_block_types"]) == set(official["up_block_types"])
    assert cfg["in_channels"] == 13 and sd["conv_in.weight"].shape[1] == 13
    # The audio cross-attention reads Whisper-width tokens.
    whisper = torch.load(tiny_weights / "whisper" / "tiny.pt", weights_only=True)
    width = whisper["dims"]["n_audio_state"]
    audio_keys = [k for k in sd if re.search(r"\.attn2\.to_[kv]\.weight$", k)]
    assert audio_keys and all(sd[k].shape[1] == width for k in audio_keys)


def test_tiny_unet_attention_is_cheap_on_a_cpu(tiny_weights: Path) -> None:
    """What makes the tiny model fast: heads of width >= 16 (CPU attention kernels are far
    slower per FLOP on narrower heads) and no spatial attention over the 32x32 top level of a
    256 px face (1024-token sequences). ``attention_head_dim`` is the head count, as
    officially."""
    files = resolve_weights(None, tiny_weights)
    unet = load_unet(files)
    heads = files.unet_config["attention_head_dim"]
    seen: list[tuple[int, int, int]] = []  # (heads, head width, sequence length)

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        width = module.to_q.out_features
        seen.append((module.heads, width // module.heads, args[0].shape[1]))

    from latentdub.models.attention import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(record)
    latent = files.resolution // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 13, 2, latent, latent, generator=g)
    audio = torch.randn(2, 50, files.unet_config["cross_attention_dim"], generator=g)
    with torch.no_grad():
        unet(sample, 500, audio)
    assert seen
    spatial = [s for s in seen if s[2] != 2]  # temporal attention runs over the 2 frames
    assert {h for h, _, _ in spatial} == {heads}
    assert min(w for _, w, _ in seen) >= 16
    assert max(length for _, _, length in spatial) <= (latent // 2) ** 2


def test_make_tiny_is_deterministic_and_refuses_real_folders(tmp_path: Path) -> None:
    a = tiny_unet_state_dict(tiny_unet_config(), seed=5)
    b = tiny_unet_state_dict(tiny_unet_config(), seed=5)
    c = tiny_unet_state_dict(tiny_unet_config(), seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])

    real = tmp_path / "real"
    real.mkdir()
    (real / "latentsync_unet.pt").write_bytes(b"precious")
    with pytest.raises(WeightsError, match="refusing to overwrite"):
        make_tiny(real)
    assert (real / "latentsync_unet.pt").read_bytes() == b"precious"


# ----------------------------------------------------------------------------- resolve + load


def test_resolve_tiny_folder(tiny_weights: Path) -> None:
    files = resolve_weights("1.6", tiny_weights)
    assert isinstance(files, ModelFiles)
    assert files.version == "1.6"
    assert files.unet == tiny_weights.resolve() / "latentsync_unet.pt"
    assert files.whisper == tiny_weights.resolve() / "whisper" / "tiny.pt"
    assert files.vae_dir == tiny_weights.resolve() / "sd-vae-ft-mse"
    assert files.resolution == 256  # from latentdub.json, not the 1.6 default of 512
    saved = json.loads((tiny_weights / "latentdub.json").read_text())
    assert files.unet_config == saved["unet_config"]
    assert files.random_weights is True
    assert files.label == "tiny random model (1.6 layout, 256 px) — not a real dub"
    assert "local folder" in files.source
    assert resolve_weights(None, tiny_weights).version == "1.6"  # unrecorded -> default
    assert json.loads(json.dumps(files.to_dict()))["label"] == files.label


def test_round_trip_strict_load(tiny_weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = resolve_weights("1.5", tiny_weights)
    with caplog.at_level(logging.DEBUG):
        unet = load_unet(files)
        whisper = load_whisper(files)
        vae = load_vae(files)
    # The loaders stay silent about random weights: the pipeline warns once per dub.
    assert "RANDOM" not in caplog.text.upper() and files.random_weights

    saved = torch.load(files.unet, weights_only=True)["state_dict"]
    loaded = unet.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert not any(t.is_meta for t in loaded.values())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())

    sample, audio = _unet_inputs(32)
    with torch.no_grad():
        out = unet(sample, 501, audio)
        feats = whisper(torch.randn(1, 80, 400))
        lat = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert out.shape == (1, 4, 2, 8, 8) and out.abs().mean() > 1e-3  # not trivially zero
    assert feats.shape == (1, 5, 200, 32)
    assert lat.shape == (1, 4, 8, 8)


def test_load_dtype(tiny_weights: Path) -> None:
    files = resolve_weights("1.6", tiny_weights)
    unet = load_unet(files, dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_whisper(files, dtype=torch.float16).parameters()} == {
        torch.float16
    }


def test_load_module_strict_rebuilds_modules_with_volatile_buffers() -> None:
    """A module with a non-persistent buffer cannot be filled from a checkpoint alone: it must
    be built for real, never left with meta tensors."""

    class WithVolatile(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    sd = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2)}
    m = load_module_strict(WithVolatile, sd, Path("x.pt"), "Toy", dtype=torch.float32, device="cpu")
    assert torch.equal(m.table, torch.arange(3.0)) and torch.equal(m.lin.weight, torch.ones(2, 2))
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])


def test_missing_whisper_lists_the_layout(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "w")
    (folder / "whisper" / "tiny.pt").unlink()
    with pytest.raises(WeightsError) as err:
        resolve_weights("1.6", folder)
    msg = str(err.value)
    assert "whisper/tiny.pt" in msg and "DIR/sd-vae-ft-mse/config.json" in msg
    assert f"--dir {folder.resolve()}" in msg


def test_invalid_config_in_latentdub_json(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "w")
    cfg = json.loads((folder / "latentdub.json").read_text())
    cfg["unet_config"]["motion_module_type"] = "Sparse"
    (folder / "latentdub.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="cannot build the UNet") as err:
        load_unet(resolve_weights("1.6", folder))
    assert "Sparse" in str(err.value)
    (folder / "latentdub.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"latentdub\.json is not valid JSON"):
        resolve_weights("1.6", folder)


def test_missing_or_wrong_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("1.6", tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(WeightsError, match="is a file"):
        resolve_weights("1.6", f)
    with pytest.raises(WeightsError, match="unknown LatentSync version"):
        resolve_weights("2.0", tmp_path)


def test_recorded_version_must_match(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "w")
    cfg = json.loads((folder / "latentdub.json").read_text())
    cfg["version"] = "1.5"
    (folder / "latentdub.json").write_text(json.dumps(cfg))
    assert resolve_weights(None, folder).version == "1.5"
    with pytest.raises(WeightsError, match=r"holds LatentSync 1\.5 weights .* --version 1\.5"):
        resolve_weights("1.6", folder)


def test_vae_search_order(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "w")
    (folder / "sd-vae-ft-mse").rename(folder / "vae")
    assert resolve_weights("1.6", folder).vae_dir == folder.resolve() / "vae"
    (folder / "stabilityai").mkdir()
    shutil.copytree(folder / "vae", folder / "stabilityai" / "sd-vae-ft-mse")
    assert resolve_weights("1.6", folder).vae_dir == folder.resolve() / "vae"
    shutil.rmtree(folder / "vae")
    assert (
        resolve_weights("1.6", folder).vae_dir == folder.resolve() / "stabilityai" / "sd-vae-ft-mse"
    )


# ----------------------------------------------------------------------------- tampering


class _Evil:
    marker: Path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _tampered(tiny_weights: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A copy of the tiny folder with a broken UNet file; returns (folder, expected text)."""
    folder = _copy(tiny_weights, tmp_path / kind)
    path = folder / "latentsync_unet.pt"
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    if kind == "missing":
        del sd["conv_out.bias"]
        torch.save(ckpt, path)
        return folder, r"1 missing keys.*conv_out\.bias"
    if kind == "extra":
        sd["down_blocks.9.bogus.weight"] = torch.zeros(2)
        torch.save(ckpt, path)
        return folder, r"1 unexpected keys.*down_blocks\.9\.bogus\.weight"
    if kind == "shape":
        width = sd["conv_in.weight"].shape[0]
        sd["conv_in.weight"] = torch.zeros(width, 9, 3, 3)
        torch.save(ckpt, path)
        return (
            folder,
            rf"wrong shape.*conv_in\.weight \(file \[{width}, 9, 3, 3\], model \[{width}, 13, 3, 3\]\)",
        )
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return folder, "truncated or corrupt"
    if kind == "empty":
        path.write_bytes(b"")
        return folder, r"empty \(0 bytes\)"
    if kind == "whisper":
        shutil.copy(folder / "whisper" / "tiny.pt", path)
        return folder, "is a Whisper checkpoint"
    if kind == "no_state_dict":
        torch.save({"global_step": 3, "model": sd}, path)
        return folder, r"no 'state_dict' entry \(its top-level keys: global_step, model\)"
    if kind == "not_a_dict":
        torch.save([1, 2, 3], path)
        return folder, "holds a list"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
        return folder, "truncated or corrupt, or not a PyTorch checkpoint"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "extra",
        "shape",
        "truncated",
        "empty",
        "whisper",
        "no_state_dict",
        "not_a_dict",
        "text",
    ],
)
def test_tampered_unet_raises_weights_error(tiny_weights: Path, tmp_path: Path, kind: str) -> None:
    folder, expected = _tampered(tiny_weights, tmp_path, kind)
    files = resolve_weights("1.6", folder)
    with pytest.raises(WeightsError) as err:
        load_unet(files)
    msg = str(err.value)
    assert str(folder / "latentsync_unet.pt") in msg
    assert re.search(expected, msg, re.S), msg


def test_pickle_that_runs_code_is_refused(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "evil")
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    _Evil.marker = marker
    torch.save({"state_dict": {"conv_in.weight": evil}}, folder / "latentsync_unet.pt")
    with pytest.raises(
        WeightsError, match=r"would run code when loaded \(it references posix\.system\)"
    ) as err:
        load_unet(resolve_weights("1.6", folder))
    assert str(folder / "latentsync_unet.pt") in str(err.value)
    assert not marker.exists()


def test_many_bad_keys_are_summarised(tiny_weights: Path, tmp_path: Path) -> None:
    """A wrong model altogether: counts plus the first 10 of each list, not 1000 lines."""
    folder = _copy(tiny_weights, tmp_path / "w")
    files = resolve_weights("1.6", folder)
    from dataclasses import replace

    from latentdub.models.unet import unet_config

    with pytest.raises(WeightsError) as err:
        load_unet(replace(files, unet_config=unet_config("1.6")))  # full-size config
    msg = str(err.value)
    assert re.search(r"\d+ keys with the wrong shape", msg)
    assert "… and " in msg and len(msg) < 6000


# ----------------------------------------------------------------------------- 1.0 layout


def _v10_folder(tiny_weights: Path, tmp_path: Path, *, record_version: bool) -> tuple[Path, dict]:
    """A tiny 1.0-style checkpoint: no motion modules, audio layers as audio_cross_attn.*"""
    cfg = tiny_unet_config()
    cfg["use_motion_module"] = False
    sd = tiny_unet_state_dict(cfg, seed=7)
    assert not any("motion_modules" in k for k in sd)
    old = {}
    for k, v in sd.items():
        k = re.sub(r"(transformer_blocks\.\d+)\.norm2\.", r"\1.audio_cross_attn.norm.", k)
        k = re.sub(r"(transformer_blocks\.\d+)\.attn2\.", r"\1.audio_cross_attn.attn.", k)
        old[k] = v
    assert any(".audio_cross_attn.attn.to_q." in k for k in old)
    folder = _copy(tiny_weights, tmp_path / "v10")
    torch.save({"state_dict": old, "global_step": 1}, folder / "latentsync_unet.pt")
    meta = json.loads((folder / "latentdub.json").read_text())
    meta["unet_config"] = cfg
    if record_version:
        meta["version"] = "1.0"
    (folder / "latentdub.json").write_text(json.dumps(meta))
    return folder, sd


def test_v10_checkpoint_is_mapped(tiny_weights: Path, tmp_path: Path) -> None:
    folder, sd = _v10_folder(tiny_weights, tmp_path, record_version=True)
    files = resolve_weights(None, folder)
    assert files.version == "1.0"
    unet = load_unet(files)

    ref = UNet3DConditionModel.from_config(files.unet_config)
    ref.load_state_dict(sd, strict=True)
    ref.eval()
    sample, audio = _unet_inputs(32)
    with torch.no_grad():
        expected = ref(sample, 301, audio)
        torch.testing.assert_close(unet(sample, 301, audio), expected, atol=0, rtol=0)
        # The audio really flows through the mapped layers.
        assert not torch.allclose(unet(sample, 301, torch.zeros_like(audio)), expected)


def test_v10_checkpoint_with_wrong_version(tiny_weights: Path, tmp_path: Path) -> None:
    folder, _ = _v10_folder(tiny_weights, tmp_path, record_version=False)
    with pytest.raises(
        WeightsError, match=r"looks like a LatentSync 1\.0 checkpoint .* 1\.6 was requested"
    ):
        load_unet(resolve_weights("1.6", folder))


def test_v15_checkpoint_requested_as_v10(tiny_weights: Path) -> None:
    files = resolve_weights("1.0", tiny_weights)
    with pytest.raises(WeightsError, match=r"1\.5/1\.6 checkpoint .* version 1\.0 was requested"):
        load_unet(files)


def test_checkpoint_without_motion_modules_for_15(tiny_weights: Path, tmp_path: Path) -> None:
    """A stage-1 style file (no motion modules, modern names) is named as such."""
    cfg = tiny_unet_config()
    cfg["use_motion_module"] = False
    folder = _copy(tiny_weights, tmp_path / "s1")
    torch.save({"state_dict": tiny_unet_state_dict(cfg)}, folder / "latentsync_unet.pt")
    with pytest.raises(WeightsError, match="has no motion modules"):
        load_unet(resolve_weights("1.5", folder))


def test_bare_state_dict_is_accepted(tiny_weights: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_weights, tmp_path / "bare")
    sd = torch.load(folder / "latentsync_unet.pt", weights_only=True)["state_dict"]
    torch.save(sd, folder / "latentsync_unet.pt")
    unet = load_unet(resolve_weights("1.6", folder))
    assert torch.equal(unet.state_dict()["conv_out.weight"], sd["conv_out.weight"])
