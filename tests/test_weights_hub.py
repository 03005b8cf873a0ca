"""Hugging Face hub resolution without network: offline errors, a pre-filled cache, download."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from latentdub.errors import WeightsError
from latentdub.weights import download_weights, resolve_weights, weights_status

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(home: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        dst = root / "snapshots" / COMMIT / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def test_offline_with_empty_cache_gives_one_clear_message(empty_hf_home: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_weights("1.6")
    msg = str(err.value)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg
    assert "ByteDance/LatentSync-1.6: latentsync_unet.pt, whisper/tiny.pt" in msg
    assert "stabilityai/sd-vae-ft-mse: config.json, diffusion_pytorch_model.safetensors" in msg
    assert "latentdub weights download --version 1.6 --dir DIR" in msg
    assert "DIR/whisper/tiny.pt" in msg and "--weights DIR" in msg
    assert str(empty_hf_home / "hub") in msg
    assert err.value.__cause__ is None and "Traceback" not in msg
    with pytest.raises(WeightsError, match=r"1\.0 weights are not fetched automatically"):
        resolve_weights("1.0")


def test_download_false_never_touches_the_network(
    empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls: list[dict[str, Any]] = []

    def fake(repo: str, filename: str, **kw: Any) -> str:
        calls.append(kw)
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(WeightsError, match="not in the cache"):
        resolve_weights("1.5", download=False)
    assert calls and all(kw["local_files_only"] for kw in calls)


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_hub_fails_fast_with_one_message(
    empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """No network: one WeightsError within seconds (huggingface_hub alone retries each file
    for ~30 s and logs every retry twice), saying how to supply the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        resolve_weights("1.6")
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert "cannot be reached" in msg and os.environ["HF_ENDPOINT"] in msg
    assert "--weights DIR" in msg and "latentdub weights download" in msg
    assert "ByteDance/LatentSync-1.6: latentsync_unet.pt, whisper/tiny.pt" in msg
    out, errout = capfd.readouterr()
    assert "Retry" not in out + errout and "thrown while requesting" not in out + errout


def test_hub_is_probed_only_when_something_must_be_downloaded(
    empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is looked at first (no network); offline mode or download=False never probe."""
    import latentdub.weights.hub as hub

    probes: list[str] = []
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda ep, *a: probes.append(ep) or "x")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    with pytest.raises(WeightsError, match="offline mode is on"):
        resolve_weights("1.6")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(WeightsError, match="downloading was not allowed"):
        resolve_weights("1.6", download=False)
    assert probes == []
    with pytest.raises(WeightsError, match=r"hub \(http://hub\.invalid\) cannot be reached \(x\)"):
        resolve_weights("1.6")
    assert probes == ["http://hub.invalid"]


def test_connection_lost_during_download_is_not_retried_per_file(
    empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub answered the probe, then the first download broke: the other files are not
    tried over the network again (each try would cost huggingface_hub's retries)."""
    import latentdub.weights.hub as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example")
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda *a: None)
    calls: list[tuple[str, bool, str]] = []

    def fake(repo: str, filename: str, **kw: Any) -> str:
        calls.append((filename, kw["local_files_only"], kw["endpoint"]))
        err = LocalEntryNotFoundError("cannot find the requested files in the local cache")
        raise err from ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(WeightsError) as err:
        resolve_weights("1.6")
    msg = str(err.value)
    assert "could not be reached (" in msg and "Name or service not known" in msg
    assert [local_only for _, local_only, _ in calls] == [True, True, True, True, False]
    assert calls[4][0] == "latentsync_unet.pt" and calls[4][2] == "http://hub.example"


def test_resolve_from_a_filled_cache_offline(
    empty_hf_home: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    _fake_cache(
        empty_hf_home,
        "ByteDance/LatentSync-1.6",
        {
            "latentsync_unet.pt": tiny_weights / "latentsync_unet.pt",
            "whisper/tiny.pt": tiny_weights / "whisper" / "tiny.pt",
        },
    )
    vae = tiny_weights / "sd-vae-ft-mse"
    _fake_cache(
        empty_hf_home,
        "stabilityai/sd-vae-ft-mse",
        {n: vae / n for n in ("config.json", "diffusion_pytorch_model.safetensors")},
    )
    files = resolve_weights("1.6")
    snap = empty_hf_home / "hub" / "models--ByteDance--LatentSync-1.6" / "snapshots" / COMMIT
    assert files.unet == snap / "latentsync_unet.pt"
    assert files.whisper == snap / "whisper" / "tiny.pt"
    assert (files.vae_dir / "config.json").is_file()
    assert files.resolution == 512 and files.random_weights is False
    assert files.label == "LatentSync 1.6 (512 px)"
    assert files.unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert "Hugging Face cache" in files.source

    status = {(e["version"], e["where"]): e for e in weights_status(tiny_weights)}
    assert status[("1.6", "hf-cache")]["complete"] is True
    assert status[("1.5", "hf-cache")]["complete"] is False
    assert status[("1.5", "hf-cache")]["vae"] is not None  # shared VAE is found for both
    folder = status[("1.6", "folder")]
    assert folder["complete"] and folder["random_weights"] and folder["error"] is None
    json.dumps(list(status.values()))

    # The official checkpoints/ folder has no VAE: it then comes from the cache.
    official = tmp_path / "official-layout"
    shutil.copytree(tiny_weights, official, ignore=shutil.ignore_patterns("sd-vae-ft-mse"))
    files = resolve_weights("1.6", official)
    assert files.vae_dir.parent.parent.name == "models--stabilityai--sd-vae-ft-mse"
    assert "VAE from the Hugging Face cache" in files.source


def test_download_into_dir_records_the_version(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download --dir writes the official layout + latentdub.json {"version"} (hub mocked)."""
    sources = {
        "latentsync_unet.pt": tiny_weights / "latentsync_unet.pt",
        "whisper/tiny.pt": tiny_weights / "whisper" / "tiny.pt",
        "config.json": tiny_weights / "sd-vae-ft-mse" / "config.json",
        "diffusion_pytorch_model.safetensors": tiny_weights
        / "sd-vae-ft-mse"
        / "diffusion_pytorch_model.safetensors",
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    seen: list[tuple[str, str]] = []

    def fake(repo: str, filename: str, *, local_dir: Path, token: Any, **kw: Any) -> str:
        assert token is None  # huggingface_hub then reads HF_TOKEN itself
        seen.append((repo, filename))
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[filename], dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    dest = tmp_path / "ckpt"
    files = download_weights("1.5", dest)
    assert ("ByteDance/LatentSync-1.5", "latentsync_unet.pt") in seen
    assert ("stabilityai/sd-vae-ft-mse", "config.json") in seen
    assert files.unet == dest.resolve() / "latentsync_unet.pt"
    assert files.vae_dir == dest.resolve() / "sd-vae-ft-mse"
    assert json.loads((dest / "latentdub.json").read_text())["version"] == "1.5"
    assert resolve_weights(None, dest).resolution == 256  # the recorded version decides
    with pytest.raises(WeightsError, match=r"already holds LatentSync 1\.5"):
        download_weights("1.6", dest)
