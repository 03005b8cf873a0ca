"""Files: the checks every input and output path gets, atomic writes, file modes and hashes.

The one home of these helpers; everything that writes or checks a file calls them. Messages
name the file and say what to do; the pipeline runs the checks before any model loads, so a
bad path fails in milliseconds instead of after a 10-second model load.

Atomic writes go through a temporary sibling and ``os.replace``, so a reader (or a resumed
run) never sees half a file. New files get the mode ``open()`` would give them (``0o666`` less
the umask); the umask is read without being changed, since ``os.umask`` is process-wide and
setting it from one thread races with every other thread that creates files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from latentdub.errors import InputError

#: Extensions the video writer can produce (see ``media.writer.CONTAINER_FORMATS``).
OUTPUT_EXTENSIONS = (".mp4", ".mov", ".mkv", ".m4v")


# -- input and output checks --------------------------------------------------------------------
def check_input_file(path: Path, what: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a non-empty, readable file.

    ``what`` names the expected kind of file in the message ("video", "audio or video").
    """
    if not path.exists():
        raise InputError(f"{path}: no such file (file not found); check the path of the {what} file")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the path of a {what} file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes); the file was not written completely")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} cannot be read (permission denied)")


def check_output(
    output: Path,
    *inputs: Path,
    extensions: Sequence[str] = OUTPUT_EXTENSIONS,
    what: str = "output",
) -> None:
    """Raise :class:`InputError` unless a file can be written to ``output``.

    Checks the extension (one of ``extensions``; empty: any), that the folder exists and is
    really writable, that ``output`` is not a folder, and that it is not the same file as any
    of ``inputs`` (the atomic rename would otherwise replace a source still being read).
    ``what`` names the output in messages (``"output"``, ``"--report"``).
    """
    output = Path(output)
    if extensions and output.suffix.lower() not in extensions:
        raise InputError(f"{what} {output} must end in {_or_list(extensions)}")
    parent = output.parent
    if not parent.exists():
        raise InputError(f"the {what} folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"the {what} folder {parent} is a file, not a folder")
    if output.is_dir():
        raise InputError(f"{what} {output} is a folder")
    if output.exists():
        for src in inputs:
            if same_file(output, Path(src)):
                raise InputError(f"{what} {output} would overwrite an input file")
    check_writable_folder(parent, for_=output)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (device and inode: hard links and symlinks count)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_folder(folder: Path, *, for_: Path | None = None) -> None:
    """Create and delete a scratch file in ``folder``.

    ``os.access`` is not enough: root passes it for a 0555 folder it still cannot write on a
    read-only mount, an immutable folder or a sysfs path, and network filesystems answer it
    from cached permissions. Writers need exactly this (a temp file in the same folder).
    """
    try:
        fd, scratch = tempfile.mkstemp(prefix=".latentdub-write-test-", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        target = f"the output {for_}" if for_ is not None else f"into {folder}"
        raise InputError(
            f"cannot write {target}: the folder {folder} is not writable ({reason}); choose another output folder"
        ) from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(scratch)


def _or_list(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# -- file modes ---------------------------------------------------------------------------------
def _umask_at_import() -> int:
    # Import time is single-threaded in practice; only used where /proc is missing.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else as at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would give a new file."""
    return 0o666 & ~current_umask()


# -- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a library to write (``torch.save``, safetensors);
    on a clean exit it gets ``mode`` (default: :func:`default_file_mode`) and is renamed into
    place; on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None, fsync: bool = True
) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` through a temporary sibling and a rename.

    ``mode`` is set before any byte is written (secrets never sit in a wider-mode file);
    default :func:`default_file_mode`. ``fsync`` makes the content durable before the rename.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# -- hashes -------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (any size, bounded memory); lowercase hex."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a file") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()
