"""``latentdub weights …`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import latentdub.cli  # noqa: F401  (registers the command groups on the app)
from latentdub.cli._app import app
from latentdub.errors import InputError, WeightsError

runner = CliRunner()


def _last_json(output: str) -> object:
    return json.loads(output.strip().splitlines()[-1])


def test_make_tiny_info_convert_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny"

    result = runner.invoke(app, ["weights", "make-tiny", str(folder), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output
    assert (folder / "latentsync_unet.pt").is_file() and (folder / "whisper" / "tiny.pt").is_file()

    result = runner.invoke(app, ["weights", "info", "--weights", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = _last_json(result.output)
    assert isinstance(info, dict)
    assert info["random_weights"] is True and info["resolution"] == 256
    assert info["label"].startswith("tiny random model") and "256 px" in info["label"]
    sd = torch.load(folder / "latentsync_unet.pt", weights_only=True)["state_dict"]
    assert info["unet_checkpoint"]["keys"] == len(sd)
    assert info["unet_checkpoint"]["parameters"] == sum(t.numel() for t in sd.values())
    assert info["unet_checkpoint"]["layout"] == "1.5/1.6"

    result = runner.invoke(app, ["weights", "info", "--weights", str(folder)])
    assert result.exit_code == 0 and "tiny random model (1.6 layout, 256 px)" in result.output

    result = runner.invoke(app, ["weights", "convert", str(folder)])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    assert (folder / "latentsync_unet.fp16.safetensors").is_file()

    result = runner.invoke(app, ["weights", "info", "--dir", str(folder), "--json"])
    info = _last_json(result.output)
    assert isinstance(info, dict)
    assert info["unet"].endswith("latentsync_unet.pt")
    assert info["unet_fp16"].endswith("latentsync_unet.fp16.safetensors")

    result = runner.invoke(app, ["weights", "list", "--dir", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    entries = _last_json(result.output)
    assert isinstance(entries, list) and len(entries) == 3
    assert [e["complete"] for e in entries] == [False, False, True]
    assert entries[2]["converted"] is True

    result = runner.invoke(app, ["weights", "list", "--dir", str(folder)])
    assert result.exit_code == 0 and "RANDOM" in result.output


def test_make_tiny_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("keep me")
    result = runner.invoke(app, ["weights", "make-tiny", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    assert "not empty" in str(result.exception)


def test_download_offline_is_a_clean_weights_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["weights", "download", "--version", "1.6"])
    assert isinstance(result.exception, WeightsError)
    msg = str(result.exception)
    assert "could not download LatentSync 1.6 weights" in msg and "unset HF_HUB_OFFLINE" in msg
    assert "weights download" not in msg  # not the command that just failed
    assert "latentdub weights make-tiny DIR" in msg
    result = runner.invoke(app, ["weights", "download", "--version", "1.7"])
    assert isinstance(result.exception, WeightsError)
    assert "unknown LatentSync version '1.7'" in str(result.exception)


def test_main_prints_the_message_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real entry point: no traceback, exit code 2."""
    from latentdub.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["latentdub", "weights", "info", "--version", "1.5"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "LatentSync 1.5 weights are not available" in err and "Traceback" not in err
