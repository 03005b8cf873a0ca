"""The dub-option flags come from ``DubOptions`` (a subclass's new field becomes a flag with no
other edit), ``--help`` shows flags bare and option names whole, and every message of the CLI
starts with the same ``error:``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from cli_helpers import TEST_CONSENT_JSON, invoke
from latentdub.cli._app import app
from latentdub.cli.batch import batch_command
from latentdub.cli.dub import dub_command
from latentdub.errors import InputError
from latentdub.options import DubOptions


class ExtraOptions(DubOptions):
    """A subclass as a plug-in would write it: two fields the CLI has never heard of."""

    shimmer: float = Field(0.5, ge=0.0, le=1.0, description="Test-only: how much shimmer to add.")
    mood: Literal["calm", "wild"] = Field("calm", description="Test-only: the mood of the dub.")


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (sub)command of the real CLI, with its path."""
    found = [(path, command)] if path else []
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def _all_commands() -> list[tuple[tuple[str, ...], Any]]:
    return _commands(typer.main.get_command(app))


class _FakePipe:
    """Stands in for a loaded pipeline: records the options each dub gets, then fails the dub."""

    def __init__(self, seen: list[DubOptions]) -> None:
        import torch

        self.seen = seen
        self.device = torch.device("cpu")
        self.model_info = {"name": "fake", "random_weights": True}
        self.resolution = 256
        self.provenance = type("Provenance", (), {"signing": None})()

    def dub(self, inputs: Any, options: DubOptions, **kwargs: Any) -> Any:
        self.seen.append(options)
        raise InputError("the fake pipeline stops here")


# -- flags from the schema ----------------------------------------------------------------------
def test_a_field_added_to_a_subclass_becomes_a_flag_of_dub_and_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentdub.batch as batch_lib
    import latentdub.pipeline as pipeline_mod

    test_app = typer.Typer()
    test_app.command("dub")(dub_command(ExtraOptions))
    test_app.command("batch")(batch_command(ExtraOptions))
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("dub", "batch"):
        result = runner.invoke(test_app, [command, "--help"])
        assert result.exit_code == 0, result.output
        flat = _flat(result.stdout)
        assert "--shimmer" in flat and "Test-only: how much shimmer to add." in flat, command
        assert "--mood" in flat and "calm, wild" in flat, command  # choices the description does not name

    seen: list[DubOptions] = []
    monkeypatch.setattr(pipeline_mod, "read_inputs", lambda *a: type("Inputs", (), {"info": None})())
    monkeypatch.setattr(pipeline_mod.LipSyncPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: _FakePipe(seen)))
    result = runner.invoke(test_app, ["dub", "v.mp4", "a.wav", "-o", str(tmp_path / "o.mp4"), "--consent",
                                      TEST_CONSENT_JSON, "--shimmer", "0.25", "--mood", "wild", "--steps", "3"])
    assert isinstance(result.exception, InputError), result.output
    (options,) = seen
    assert isinstance(options, ExtraOptions)
    assert (options.shimmer, options.mood, options.steps) == (0.25, "wild", 3)

    result = runner.invoke(test_app, ["dub", "v.mp4", "a.wav", "-o", str(tmp_path / "o.mp4"), "--shimmer", "2"])
    assert "--shimmer must be at most 1" in str(result.exception)

    # batch: the flag is every row's default, a manifest column of the new field overrides it.
    for name in ("v.mp4", "a.wav"):
        (tmp_path / name).write_bytes(b"\0" * 64)  # never opened: the fake pipeline fails first
    (tmp_path / "m.csv").write_text("video,audio,output,shimmer\nv.mp4,a.wav,one.mp4,\nv.mp4,a.wav,two.mp4,0.75\n")
    monkeypatch.setattr(batch_lib, "load_pipelines", lambda *a, **k: [_FakePipe(seen)])
    seen.clear()
    result = runner.invoke(test_app, ["batch", str(tmp_path / "m.csv"), "--consent", TEST_CONSENT_JSON,
                                      "--devices", "cpu", "--shimmer", "0.25", "--set", "mood=wild", "--json"])
    assert result.exit_code == 3, result.output  # both rows failed in the fake pipeline
    assert sorted(o.shimmer for o in seen) == [0.25, 0.75]
    assert all(isinstance(o, ExtraOptions) and o.mood == "wild" for o in seen)


def test_steps_not_given_follows_the_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import latentdub.pipeline as pipeline_mod

    seen: list[DubOptions] = []
    monkeypatch.setattr(pipeline_mod, "read_inputs", lambda *a: type("Inputs", (), {"info": None})())
    monkeypatch.setattr(pipeline_mod.LipSyncPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: _FakePipe(seen)))
    base = ["dub", "v.mp4", "a.wav", "-o", str(tmp_path / "o.mp4"), "--consent", TEST_CONSENT_JSON]
    for extra, steps in (([], 20), (["--sampler", "dpm++"], 10), (["--sampler", "dpm++", "--steps", "20"], 20)):
        CliRunner().invoke(app, [*base, *extra])
        assert seen.pop().steps == steps, extra


@pytest.mark.parametrize("command", ["dub", "batch"])
def test_help_lists_every_option_field(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = invoke([command, "--help"], monkeypatch, capsys)
    assert code == 0
    flat = _flat(out)
    for name in DubOptions.model_fields:
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{re.escape(flag)}(?![\w-])", flat), (command, flag)
        assert DubOptions.describe(name)[:40] in flat, (command, name)
    for flag in ("--preset", "--encoder", "--sampler", "--no-deepcache", "--no-watermark"):
        assert flag in flat


@pytest.mark.parametrize("columns", ["80", "250"])
def test_help_shows_flags_bare_and_option_names_whole(
    columns: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    commands = _all_commands()
    assert {("dub",), ("batch",), ("faces",)} <= {path for path, _ in commands}
    for path, command in commands:
        code, out, err = invoke([*path, "--help"], monkeypatch, capsys)
        assert code == 0, (path, err)
        assert "<bool>" not in out, path  # a flag takes no value
        assert not re.search(r"--[\w-]*…", out), (path, out)  # no option name cut short
        names = [n for p in command.params if not getattr(p, "hidden", False) for n in (*p.opts, *p.secondary_opts)]
        for name in (n for n in names if n.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), (path, name)


def test_hidden_aliases_still_work(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--device`` and ``--weights-dir`` stay accepted by batch, out of the help's way."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,audio,output\nnone.mp4,none.wav,o.mp4\n")
    code, _, err = invoke(["batch", str(manifest), "--device", "tpu"], monkeypatch, capsys)
    assert code == 2 and "--devices: unknown device 'tpu'" in err
    code, _, err = invoke(["batch", str(manifest), "--weights", "a", "--weights-dir", "b"], monkeypatch, capsys)
    assert code == 2 and "--weights and --weights-dir" in err


# -- one error prefix ---------------------------------------------------------------------------
def test_usage_errors_and_our_errors_both_start_with_lowercase_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = ["dub", "--consent", TEST_CONSENT_JSON, str(tmp_path / "v.mp4"), str(tmp_path / "a.wav"), "-o",
            str(tmp_path / "o.mp4")]
    usage = invoke([*base, "--steps", "abc"], monkeypatch, capsys)  # click's: not a number
    ours = invoke([*base, "--steps", "0"], monkeypatch, capsys)  # DubOptions': out of range
    unknown = invoke(["no-such-command"], monkeypatch, capsys)
    for (code, _, err), message in ((usage, "error: Invalid value for '--steps'"),
                                    (ours, "error: --steps must be at least 1"),
                                    (unknown, "error: No such command")):
        assert code == 2, err
        assert any(line.startswith(message) for line in err.splitlines()), err
        assert "Error:" not in err and "Traceback" not in err
