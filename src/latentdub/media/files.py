"""Checks every input file gets before a decoder sees it, with messages a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

from latentdub.errors import InputError


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
