"""What a newcomer trips over on a fresh machine: the README's commands as written, the install
script's silence, and the first errors met offline (no weights, no network, a wrong path)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import latentdub.cli  # noqa: F401  (registers the command groups on the app)
from latentdub.cli._app import app
from latentdub.errors import WeightsError
from latentdub.weights import download_weights, resolve_version_or_folder, resolve_weights

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# -- the README ---------------------------------------------------------------------------------
def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _readme_bash() -> list[str]:
    blocks = _bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```bash blocks"
    return blocks


# `latentdub` where a shell looks it up on PATH: at the start of a command.
_BARE = re.compile(r"(?:^|[;&|(]|\$\()\s*latentdub\b", re.MULTILINE)


def test_bare_latentdub_is_caught() -> None:
    """The check below can fail: it sees a bare command, wherever a command starts."""
    for line in ("latentdub dub a b", "x && latentdub doctor", "K=$(latentdub keys create)", " latentdub serve &"):
        assert _BARE.search(line), line
    for line in (".venv/bin/latentdub dub a b", "--data-dir /srv/latentdub", "postgresql://latentdub@h/latentdub"):
        assert not _BARE.search(line), line


def test_readme_commands_run_the_installed_program() -> None:
    """scripts/install.sh does not put latentdub on PATH: the README's commands must say
    .venv/bin/latentdub, or a copied line fails with "command not found"."""
    bare = [line for block in _readme_bash() for line in block.splitlines() if _BARE.search(line)]
    assert bare == []
    assert any(".venv/bin/latentdub" in block for block in _readme_bash())


_ENVIRONMENT = {"HOME", "PATH", "PWD", "USER"}


def _unset_variables(blocks: list[str]) -> list[str]:
    """Variables used in the blocks (in reading order) before any line assigns them."""
    assigned: set[str] = set(_ENVIRONMENT)
    unset: list[str] = []
    for line in "\n".join(blocks).splitlines():
        code = line.split(" #", 1)[0]
        used = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", code)
        unset += [name for name in used if name not in assigned and name not in unset]
        assigned |= set(re.findall(r"(?:^|[\s;&(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", code))
    return unset


def test_unset_variables_are_caught() -> None:
    assert _unset_variables(["curl -H \"Bearer $KEY\" http://h/jobs/$ID"]) == ["KEY", "ID"]
    assert _unset_variables(["KEY=$(make | tail -n1)\ncurl $KEY"]) == []


def test_readme_variables_are_set_before_use() -> None:
    """`$KEY` and `$ID` in the curl lines must come from lines a reader can run."""
    blocks = _readme_bash()
    assert _unset_variables(blocks) == []
    text = "\n".join(blocks)
    assert re.search(r"^KEY=\$\(\.venv/bin/latentdub keys create .*\| tail -n1\)", text, re.MULTILINE)
    assert re.search(r"^ID=\$\(curl ", text, re.MULTILINE) and '["id"]' in text


def test_keys_create_prints_the_key_as_the_last_stdout_line(tmp_path: Path) -> None:
    """What `KEY=$(… keys create … | tail -n1)` relies on: stdout is the key alone."""
    pytest.importorskip("sqlalchemy")
    result = runner.invoke(app, ["keys", "create", "--data-dir", str(tmp_path), "--name", "studio"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\S{20,}", lines[-1])


def test_job_response_names_its_id_field_id() -> None:
    """The README reads the submitted job's id as ``["id"]``."""
    from latentdub.service.schemas import JobOut

    assert "id" in JobOut.model_fields


# -- scripts/install.sh -------------------------------------------------------------------------
def test_install_script_says_what_it_does_before_each_step() -> None:
    """pip runs with -q for minutes; every step announces itself first."""
    lines = [
        ln.strip()
        for ln in (ROOT / "scripts" / "install.sh").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    steps = [i for i, ln in enumerate(lines) if "pip install" in ln or "-m venv" in ln]
    assert len(steps) >= 3
    for i in steps:
        assert lines[i - 1].startswith("step "), f"no message before: {lines[i]}"
    torch_step = next(i for i in steps if "torch==" in lines[i])
    assert "torch" in lines[torch_step - 1] and "minutes" in lines[torch_step - 1]
    assert 'step() { echo "' in "\n".join(lines)


# -- offline, no weights ------------------------------------------------------------------------
def test_no_weights_offline_points_to_the_tiny_smoke_model(empty_hf_home: Path) -> None:
    """`latentdub dub` without --weights on a machine with no cache and no network."""
    for resolve in (lambda: resolve_weights("1.6"), lambda: resolve_version_or_folder("1.6")):
        with pytest.raises(WeightsError) as err:
            resolve()
        msg = str(err.value)
        assert "offline mode is on" in msg
        assert "latentdub weights make-tiny DIR" in msg and "--weights DIR" in msg


def test_download_offline_does_not_suggest_itself(empty_hf_home: Path) -> None:
    for dest in (None, empty_hf_home.parent / "weights"):
        with pytest.raises(WeightsError) as err:
            download_weights("1.6", dest)
        msg = str(err.value)
        assert "could not download LatentSync 1.6 weights" in msg
        assert "weights download" not in msg
        assert "unset HF_HUB_OFFLINE" in msg and "make-tiny" in msg


def test_failed_download_leaves_no_new_folder(empty_hf_home: Path, tmp_path: Path) -> None:
    """huggingface_hub makes .cache/huggingface/…/*.lock and empty folders in the target before
    it finds out it cannot download; none of that may stay behind."""
    dest = tmp_path / "new" / "weights"
    with pytest.raises(WeightsError):
        download_weights("1.6", dest, syncnet=True)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in empty_hf_home.iterdir()) == []  # the cache untouched too


def test_failed_download_keeps_a_folder_as_it_was(empty_hf_home: Path, tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    (dest / "whisper").mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    with pytest.raises(WeightsError):
        download_weights("1.6", dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before


def test_failed_download_keeps_partial_data_for_resuming(
    empty_hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost mid-file: the part already fetched stays so the next try resumes."""
    import huggingface_hub

    import latentdub.weights.hub as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda *a: None)
    dest = tmp_path / "weights"

    def fake(repo: str, filename: str, *, local_dir: Path, local_files_only: bool, **kw: object) -> str:
        meta = Path(local_dir) / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / f"{filename.replace('/', '_')}.lock").touch()
        if not local_files_only:
            (meta / "abc.incomplete").write_bytes(b"first half")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(WeightsError, match="could not download"):
        download_weights("1.6", dest)
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert left == [".cache/huggingface/download/abc.incomplete"]


# -- a wrong --weights path ---------------------------------------------------------------------
@pytest.mark.parametrize("given", ["nosuchdir/", "./nosuch", "~/no/such/weights", "nosuchdir"])
def test_a_missing_weights_folder_is_named_as_a_folder(given: str, empty_hf_home: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_version_or_folder(given)
    msg = str(err.value)
    assert msg.startswith(f"weights folder {given} does not exist")
    assert "unknown LatentSync version" not in msg


def test_a_missing_weights_path_object_is_a_folder(empty_hf_home: Path, tmp_path: Path) -> None:
    """--weights arrives as a Path (its trailing slash gone): still a folder, never a version."""
    with pytest.raises(WeightsError, match=r"^weights folder .*1\.6 does not exist;"):
        resolve_version_or_folder(tmp_path / "1.6")


def test_versions_and_folders_are_told_apart(
    empty_hf_home: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WeightsError, match=r"unknown LatentSync version '1\.7'"):
        resolve_version_or_folder("1.7")
    with pytest.raises(WeightsError, match=r"LatentSync 1\.5 weights are not available"):
        resolve_version_or_folder("v1.5")
    assert resolve_version_or_folder(tiny_weights).random_weights
    assert resolve_version_or_folder(str(tiny_weights) + "/").random_weights
    # An existing folder wins even when its name looks like a version.
    shutil.copytree(tiny_weights, tmp_path / "1.6")
    monkeypatch.chdir(tmp_path)
    assert resolve_version_or_folder("1.6").random_weights
    with pytest.raises(WeightsError, match="is a file"):
        resolve_version_or_folder(str(tiny_weights / "latentsync_unet.pt"))
