"""The deployment's secret watermark key: who holds it can read, make and remove the mark.

The watermark's chip layout and signs come from a key (:mod:`latentdub.provenance.watermark`).
With a public key anyone could strip the mark, or forge any job id onto genuine footage, so each
deployment makes its own: 32 random bytes in ``watermark.key`` in its data folder (the user's
latentdub data folder, or the service's ``data_dir``), mode 0600, made once (``latentdub keys
init-watermark``, or on the first dub), atomically and under a lock so that several workers
starting at once end up with one key. Verifying needs the same key, so a service verifies on the
server side and the key never leaves it.

:data:`PUBLIC_KEY` (the constant every version before this one used) is kept only to read files
made with it: anyone could have made or removed such a mark, and verify says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from latentdub.errors import InputError
from latentdub.files import atomic_write
from latentdub.provenance.store import data_dir, ensure_private_dir
from latentdub.provenance.watermark import DEFAULT_KEY

try:  # POSIX: serialises two processes creating the key at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

KEY_FILE = "watermark.key"
KEY_BYTES = 32
MIN_KEY_BYTES = 16  # a user's own key file: at least 128 bits
MAX_KEY_BYTES = 4096
PUBLIC_KEY: bytes = bytes(DEFAULT_KEY)
PUBLIC_KEY_NOTE = "public key: anyone could have made or removed this mark"


class WatermarkKeyError(InputError):
    """A watermark key file that cannot be used (missing, empty, too short, unreadable)."""


def key_path(folder: str | os.PathLike[str] | None = None) -> Path:
    """Where the key of a data folder lives (default: the latentdub data folder); not created."""
    return (Path(folder) if folder is not None else data_dir()) / KEY_FILE


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (to tell keys apart in reports; reveals nothing)."""
    return hashlib.sha256(b"latentdub-watermark-key-id:" + bytes(key)).hexdigest()[:16]


def is_public(key: bytes | str) -> bool:
    return (key.encode("utf-8") if isinstance(key, str) else bytes(key)) == PUBLIC_KEY


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path`` (its raw bytes), with a clear error when it cannot be one."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # bounded: `--key /dev/zero` or a video must not be read whole
            data = f.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise WatermarkKeyError(f"the watermark key file {path} does not exist.") from None
    except IsADirectoryError:
        raise WatermarkKeyError(f"the watermark key file {path} is a folder, not a file.") from None
    except OSError as err:
        raise WatermarkKeyError(f"cannot read the watermark key file {path}: {err.strerror or err}") from None
    if len(data) < MIN_KEY_BYTES:
        raise WatermarkKeyError(
            f"the watermark key file {path} holds {len(data)} bytes; a key has at least {MIN_KEY_BYTES} "
            "(make one with `latentdub keys init-watermark`)."
        )
    if len(data) > MAX_KEY_BYTES:
        raise WatermarkKeyError(f"the watermark key file {path} is too large to be a key (over {MAX_KEY_BYTES} bytes).")
    return data


def init_key(folder: str | os.PathLike[str] | None = None, *, force: bool = False) -> tuple[Path, bytes]:
    """Make the key of a data folder; refuses to replace one unless ``force`` (every mark made
    with the old key could then no longer be read here)."""
    path = key_path(folder)
    with _lock(path.parent):
        if path.exists() and not force:
            raise WatermarkKeyError(
                f"a watermark key already exists at {path}; replacing it makes every mark made with it "
                "unreadable here (`latentdub keys init-watermark --force` if you mean it)."
            )
        return path, _write(path)


def ensure_key(folder: str | os.PathLike[str] | None = None) -> tuple[bytes, bool]:
    """The key of a data folder, made on first use: ``(key, created)``. Safe when several
    processes start at once: they take the same lock, and one of them makes the key."""
    path = key_path(folder)
    if path.exists():  # the common case: the file appears whole (atomic rename), no lock needed
        return load_key(path), False
    with _lock(path.parent):
        if path.exists():
            return load_key(path), False
        return _write(path), True


def existing_key(folder: str | os.PathLike[str] | None = None) -> bytes | None:
    """The key of a data folder if it has one (never made here: verifying changes nothing)."""
    path = key_path(folder)
    if not path.exists():
        return None
    return load_key(path)


def _write(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    atomic_write(path, key, mode=0o600)  # mode set before the secret is written, then renamed in
    return key


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    ensure_private_dir(folder, what="the folder of the watermark key")
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder / f".{KEY_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
