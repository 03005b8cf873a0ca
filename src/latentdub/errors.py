"""Errors that carry a message meant for the user.

Everything the user can cause (bad files, missing weights, impossible options) raises a
subclass of :class:`LatentdubError`; the CLI prints its message and exits non-zero without a
traceback. Anything else reaching the CLI is a bug and is reported as such.
"""

from __future__ import annotations


class LatentdubError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing explanation."""

    exit_code = 2


class InputError(LatentdubError):
    """A user-supplied file or option cannot be used (unreadable, wrong kind, out of range)."""


class WeightsError(LatentdubError):
    """Model weights are missing, corrupt, of the wrong version or do not fit the model."""


class Cancelled(LatentdubError):
    """The dub was cancelled by the caller (cancel event or Ctrl-C); nothing was written."""

    exit_code = 130


class HookError(LatentdubError):
    """A caller-supplied hook (progress callback, frame filter, finalizer) failed; nothing was written."""

    exit_code = 1
