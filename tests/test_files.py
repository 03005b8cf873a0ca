"""latentdub.files: atomic writes, file modes from the umask, output checks, hashes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentdub import files
from latentdub.errors import InputError
from latentdub.files import (
    atomic_path,
    atomic_write,
    check_output,
    current_umask,
    default_file_mode,
    sha256_file,
)


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    assert atomic_write(target, "new ✓") == target
    assert target.read_text(encoding="utf-8") == "new ✓"
    atomic_write(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert _siblings(tmp_path) == ["a.json"]


def test_atomic_write_failing_at_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert _siblings(tmp_path) == ["a.json"]  # no temporary file left behind


def test_atomic_write_failing_while_writing_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert _siblings(tmp_path) == ["a.json"]


def test_atomic_write_of_data_that_cannot_be_encoded_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write(target, "half a surrogate \ud800")
    assert target.read_text() == "old"
    assert _siblings(tmp_path) == ["a.txt"]


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="library failed"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"half")
        raise RuntimeError("library failed")
    assert target.read_bytes() == b"old"
    assert _siblings(tmp_path) == ["w.bin"]

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _siblings(tmp_path) == ["w.bin"]
    assert target.stat().st_mode & 0o777 == default_file_mode()  # not mkstemp's 0600


def test_an_explicit_mode_is_kept(tmp_path: Path) -> None:
    secret = atomic_write(tmp_path / "signing.key", b"secret", mode=0o600)
    assert secret.stat().st_mode & 0o777 == 0o600


# -- the umask ----------------------------------------------------------------------------------
_UMASK_PROBE = """
import os, sys
os.umask(int(sys.argv[2], 8))
from pathlib import Path
from latentdub.files import atomic_path, atomic_write, current_umask
folder = Path(sys.argv[1])
atomic_write(folder / "a.txt", "x")
with atomic_path(folder / "b.bin") as tmp:
    tmp.write_bytes(b"y")
print(oct(current_umask()))
"""


@pytest.mark.parametrize(("umask", "want"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_files_get_the_mode_open_would_give(tmp_path: Path, umask: int, want: int) -> None:
    """Set in a fresh process: the umask is process-wide, so the test must not change ours."""
    run = subprocess.run(
        [sys.executable, "-c", _UMASK_PROBE, str(tmp_path), oct(umask)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert run.stdout.strip() == oct(umask)
    for name in ("a.txt", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_reading_the_umask_does_not_change_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(files.os, "umask", lambda mask: calls.append(mask) or real(mask))
    before = current_umask()
    assert default_file_mode() == 0o666 & ~before
    assert current_umask() == before
    assert calls == []  # read from /proc, never set (os.umask is process-wide)


# -- output checks ------------------------------------------------------------------------------
def test_check_output_accepts_a_writable_new_file(tmp_path: Path) -> None:
    check_output(tmp_path / "out.mp4")
    check_output(tmp_path / "OUT.MKV")
    assert _siblings(tmp_path) == []  # the write test leaves nothing


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("out.avi", r"must end in \.mp4, \.mov, \.mkv or \.m4v"),
        ("missing/out.mp4", "folder .*missing does not exist"),
        ("afile/out.mp4", "is a file, not a folder"),
        ("adir.mp4", "is a folder"),
        ("input.mp4", "would overwrite an input file"),
        ("link.mp4", "would overwrite an input file"),
    ],
)
def test_check_output_rejections(tmp_path: Path, name: str, match: str) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.mp4").mkdir()
    source = tmp_path / "input.mp4"
    source.write_bytes(b"video")
    (tmp_path / "link.mp4").symlink_to(source)
    with pytest.raises(InputError, match=match) as err:
        check_output(tmp_path / name, source)
    assert err.value.__cause__ is None or isinstance(err.value.__cause__, OSError)


def test_check_output_rejects_an_unwritable_folder_even_as_root(tmp_path: Path) -> None:
    """/proc is read-only for everyone, root included: os.access alone would say yes to root."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    with pytest.raises(InputError, match="not writable"):
        check_output(Path("/proc/self/out.mp4"))


def test_check_output_extensions_and_name_are_options(tmp_path: Path) -> None:
    check_output(tmp_path / "report.html", extensions=(".html",), what="--report")
    check_output(tmp_path / "anything.bin", extensions=())
    with pytest.raises(InputError, match=r"^--report .*must end in \.html$"):
        check_output(tmp_path / "report.txt", extensions=(".html",), what="--report")


# -- hashes -------------------------------------------------------------------------------------
def test_sha256_file_streams(tmp_path: Path) -> None:
    blob = np.random.default_rng(1).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(blob).hexdigest()
    with pytest.raises(InputError, match="does not exist"):
        sha256_file(tmp_path / "nope")
    with pytest.raises(InputError, match="is a folder"):
        sha256_file(tmp_path)


def test_no_other_module_changes_the_umask() -> None:
    """os.umask can only be read by setting it, which races with every thread creating files;
    files.py reads it once at import (a fallback where /proc is missing), nobody else."""
    src = Path(files.__file__).parent
    offenders = [
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if "os.umask(" in path.read_text(encoding="utf-8") and path.name != "files.py"
    ]
    assert offenders == []
