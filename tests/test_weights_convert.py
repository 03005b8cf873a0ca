"""``convert_weights``: fp16 safetensors beside the official files, preferred while fresh."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from latentdub.errors import WeightsError
from latentdub.weights import convert_weights, load_unet, load_vae, load_whisper, resolve_weights

UNET16 = "latentsync_unet.fp16.safetensors"
WHISPER16 = "whisper/tiny.fp16.safetensors"
VAE16 = "sd-vae-ft-mse/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture()
def converted(tiny_weights: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "w"
    shutil.copytree(tiny_weights, folder)
    done = convert_weights(folder)
    assert {c.target.relative_to(folder).as_posix() for c in done} == {UNET16, WHISPER16, VAE16}
    assert all(c.written for c in done)
    return folder


def _assert_fp16_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        # fp16 keeps 11 significant bits: relative rounding error <= 2**-11 (+ tiny subnormals)
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2**-11, atol=1e-7)


def test_convert_writes_fp16_files_that_are_preferred(converted: Path) -> None:
    with safe_open(str(converted / UNET16), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert meta["latentdub_source"] == "latentsync_unet.pt" and meta["global_step"] == "0"
    pt_size = (converted / "latentsync_unet.pt").stat().st_size
    assert (converted / UNET16).stat().st_size < 0.55 * pt_size

    files = resolve_weights("1.6", converted)
    root = converted.resolve()
    assert files.unet == root / "latentsync_unet.pt" and files.unet_fp16 == root / UNET16
    assert files.whisper_fp16 == root / WHISPER16
    # 16-bit inference reads the converted file; fp32 the exact official one.
    assert files.unet_file(torch.float16) == files.unet_file(torch.bfloat16) == root / UNET16
    assert files.unet_file(torch.float32) == root / "latentsync_unet.pt"
    assert files.whisper_file() == root / WHISPER16  # lossless: tiny.pt is fp16 already

    original = torch.load(converted / "latentsync_unet.pt", weights_only=True)["state_dict"]
    half = load_unet(files, dtype=torch.float16).state_dict()
    _assert_fp16_close(half, original)
    assert all(torch.equal(half[k], v.half()) for k, v in original.items())
    exact = load_unet(files).state_dict()
    assert all(torch.equal(exact[k], v) for k, v in original.items())

    whisper_ref = load_whisper(converted / "whisper" / "tiny.pt").state_dict()
    whisper = load_whisper(files).state_dict()
    assert all(torch.equal(whisper[k], v) for k, v in whisper_ref.items())

    vae_ref = load_vae(files).state_dict()  # fp32: the original safetensors
    vae_half = load_vae(files, dtype=torch.float16).state_dict()
    assert all(torch.equal(vae_half[k], v.half()) for k, v in vae_ref.items())
    (converted / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").unlink()
    _assert_fp16_close(load_vae(files).state_dict(), vae_ref)  # only the fp16 file is left

    # prefer_converted=False ignores the converted files.
    plain = resolve_weights("1.6", converted, prefer_converted=False)
    assert plain.unet_fp16 is None and plain.whisper_fp16 is None


def test_convert_skips_up_to_date_and_force_rewrites(converted: Path) -> None:
    again = convert_weights(converted)
    assert not any(c.written for c in again)
    assert all(c.written for c in convert_weights(converted, force=True))


def test_stale_conversion_is_ignored(converted: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The source replaced after converting (other size, newer): back to the official file."""
    src = converted / "latentsync_unet.pt"
    ckpt = torch.load(src, weights_only=True)
    ckpt["global_step"] = 123456789  # another checkpoint of the same layout
    ckpt["note"] = "replaced"
    torch.save(ckpt, src)
    later = (converted / UNET16).stat().st_mtime_ns + 5_000_000_000
    os.utime(src, ns=(later, later))
    with caplog.at_level(logging.WARNING, logger="latentdub.weights"):
        files = resolve_weights("1.6", converted)
    assert files.unet_fp16 is None and files.unet_file(torch.float16) == src.resolve()
    assert "re-run `latentdub weights convert`" in caplog.text


def test_same_size_but_newer_source_is_stale(converted: Path) -> None:
    src = converted / "whisper" / "tiny.pt"
    later = (converted / WHISPER16).stat().st_mtime_ns + 5_000_000_000
    os.utime(src, ns=(later, later))
    assert resolve_weights("1.6", converted).whisper_file().name == "tiny.pt"
    # A copied folder (new mtimes, same order, same sizes) keeps using the conversion.
    os.utime(converted / WHISPER16, ns=(later + 1, later + 1))
    assert resolve_weights("1.6", converted).whisper_file().name == "tiny.fp16.safetensors"


def test_converted_files_alone_are_enough(converted: Path) -> None:
    """Users may delete the 5 GB .pt and keep the compact file."""
    (converted / "latentsync_unet.pt").unlink()
    (converted / "whisper" / "tiny.pt").unlink()
    (converted / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").unlink()
    files = resolve_weights("1.6", converted)
    assert files.unet.name == UNET16 and files.unet_file(torch.float32).name == UNET16
    load_unet(files)
    load_whisper(files)
    load_vae(files)


def test_convert_validates_the_source_first(tiny_weights: Path, tmp_path: Path) -> None:
    folder = tmp_path / "w"
    shutil.copytree(tiny_weights, folder)
    ckpt = torch.load(folder / "latentsync_unet.pt", weights_only=True)
    del ckpt["state_dict"]["conv_in.weight"]
    torch.save(ckpt, folder / "latentsync_unet.pt")
    with pytest.raises(WeightsError, match=r"missing keys.*conv_in\.weight"):
        convert_weights(folder)
    assert not (folder / UNET16).exists()
    assert not list(folder.glob("*.partial"))


def test_convert_needs_a_weights_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is not a folder"):
        convert_weights(tmp_path / "nope")
    with pytest.raises(WeightsError, match=r"no latentsync_unet\.pt to convert"):
        convert_weights(tmp_path)


def test_corrupt_converted_file_is_reported(converted: Path) -> None:
    path = converted / UNET16
    data = path.read_bytes()
    (converted / "latentsync_unet.pt").unlink()  # so the converted file is used
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="not a readable safetensors file") as err:
        load_unet(resolve_weights("1.6", converted))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """make-tiny and convert write files as open() would (0o666 less the umask), not 0600
    (which is what safetensors' own writer gives)."""
    from latentdub.weights import make_tiny

    previous = os.umask(umask)
    try:
        folder = make_tiny(tmp_path / "tiny")
        convert_weights(folder)
    finally:
        os.umask(previous)
    modes = {
        p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert {UNET16, WHISPER16, VAE16, "sd-vae-ft-mse/diffusion_pytorch_model.safetensors"} <= set(
        modes
    )
    want = 0o666 & ~umask
    assert modes == dict.fromkeys(modes, want), {k: oct(v) for k, v in modes.items()}
