"""Checks every input and output file gets before a decoder or encoder sees it.

Messages name the file and say what to do; the pipeline runs these before any model loads,
so a bad path fails in milliseconds instead of after a 10-second model load.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from latentdub.errors import InputError

#: Extensions the writer can produce (see ``media.writer.CONTAINER_FORMATS``).
OUTPUT_EXTENSIONS = (".mp4", ".mov", ".mkv", ".m4v")


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


def check_output(output: Path, *inputs: Path) -> None:
    """Raise :class:`InputError` unless a video can be written to ``output``.

    Checks the extension, that the folder exists and is really writable, that ``output`` is
    not a folder, and that it is not the same file as any of ``inputs`` (the atomic rename
    would otherwise replace the source the pipeline is still reading).
    """
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise InputError(f"output {output} must end in .mp4, .mov, .mkv or .m4v")
    parent = output.parent
    if not parent.exists():
        raise InputError(f"the output folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"the output folder {parent} is a file, not a folder")
    if output.is_dir():
        raise InputError(f"output {output} is a folder")
    if output.exists():
        for src in inputs:
            if _same_file(output, Path(src)):
                raise InputError(f"output {output} would overwrite an input file")
    _check_writable(output)


def _same_file(a: Path, b: Path) -> bool:
    # samefile compares device and inode, so hard links and symlinks count as the same file.
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(output: Path) -> None:
    """Create and delete a scratch file beside ``output``.

    ``os.access`` is not enough: root passes it for a 0555 folder it still cannot write on a
    read-only mount, an immutable folder or a sysfs path, and network filesystems answer it
    from cached permissions. The writer needs exactly this (a temp file in the same folder).
    """
    parent = output.parent
    try:
        fd, scratch = tempfile.mkstemp(prefix=".latentdub-write-test-", dir=parent)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(
            f"cannot write the output {output}: the folder {parent} is not writable ({reason}); "
            "choose another output folder"
        ) from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(scratch)
