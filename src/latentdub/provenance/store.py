"""Where latentdub keeps its own files (signing keys, the audit log): the data folder.

``$LATENTDUB_DATA_DIR`` wins (tests and services point it elsewhere); otherwise the platform's
user data folder — ``platformdirs`` when it is installed, else the XDG rule
(``$XDG_DATA_HOME/latentdub``, default ``~/.local/share/latentdub``). The folder is created on
first use with mode 0700: it holds a private signing key and a log of who was dubbed.
"""

from __future__ import annotations

import os
from pathlib import Path

from latentdub.errors import InputError

ENV_VAR = "LATENTDUB_DATA_DIR"
APP_NAME = "latentdub"


def default_data_dir() -> Path:
    """The platform's per-user data folder for latentdub (not created)."""
    try:
        import platformdirs
    except ImportError:
        xdg = os.environ.get("XDG_DATA_HOME", "").strip()
        # XDG: a relative $XDG_DATA_HOME is invalid and must be ignored.
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
        return base / APP_NAME
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """The data folder (``$LATENTDUB_DATA_DIR`` or the platform default), created if missing."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return ensure_private_dir(Path(override).expanduser(), what=f"the latentdub data folder (${ENV_VAR})")
    return ensure_private_dir(default_data_dir(), what="the latentdub data folder")


def ensure_private_dir(path: Path, *, what: str = "folder") -> Path:
    """Create ``path`` (and parents) if missing; a folder we create gets mode 0700."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} exists but is not a folder.")
    if not path.exists():
        try:
            path.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; we want exactly 0700
        except OSError as err:
            raise InputError(f"cannot create {what} {path}: {err.strerror or err}") from err
    return path
