"""The ``latentdub`` command line.

Each command group lives in its own module; this one only assembles them and turns errors into
a clean message and exit code:

* :class:`~latentdub.errors.LatentdubError` → ``error: …``, its ``exit_code`` (2 for bad input);
* usage errors (missing option, ``--steps abc``, unknown command) → click's ``Usage: …`` and
  hint, then ``error: …`` (lowercase like every other message of ours, not click's ``Error:``),
  exit 2; no arguments at all → the help text on stderr, exit 2 (click ≥ 8.2's
  ``no_args_is_help`` convention, which typer's bundled click keeps);
* Ctrl-C (or :class:`~latentdub.errors.Cancelled`) → ``interrupted``, exit 130 (128 + SIGINT);
* anything else is a bug → ``internal error: …``, exit 3.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import typer

# Importing the command modules registers their commands on ``app``.
from latentdub.cli import audit as _audit  # noqa: F401
from latentdub.cli import batch as _batch  # noqa: F401
from latentdub.cli import compare as _compare  # noqa: F401
from latentdub.cli import doctor as _doctor  # noqa: F401
from latentdub.cli import dub as _dub  # noqa: F401
from latentdub.cli import eval as _eval  # noqa: F401
from latentdub.cli import faces as _faces  # noqa: F401
from latentdub.cli import keys as _keys  # noqa: F401
from latentdub.cli import serve as _serve  # noqa: F401
from latentdub.cli import verify as _verify  # noqa: F401
from latentdub.cli import weights as _weights  # noqa: F401
from latentdub.cli import worker as _worker  # noqa: F401
from latentdub.cli._app import app, console_err
from latentdub.errors import Cancelled, LatentdubError

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes click raises for usage errors, whichever click typer runs on.

    typer ≥ 0.26 bundles its own click, whose ``ClickException`` subclasses the public
    ``typer.TyperException`` and is *not* ``click.ClickException``; older typer used the
    installed click. Both are accepted, so a typer upgrade cannot turn usage errors into
    "internal error" again.
    """
    types: list[type[BaseException]] = []
    typer_exc = getattr(typer, "TyperException", None)
    if isinstance(typer_exc, type) and issubclass(typer_exc, BaseException):
        types.append(typer_exc)
    try:
        import click
    except ImportError:
        pass
    else:
        types.append(click.ClickException)
    return tuple(types)


def _abort_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [typer.Abort]
    try:
        import click
    except ImportError:
        pass
    else:
        types.append(click.exceptions.Abort)
    return tuple(types)


def _interrupted(detail: str = "") -> None:
    console_err.print(f"interrupted: {detail}" if detail else "interrupted", highlight=False)
    sys.exit(EXIT_INTERRUPTED)


def _show_usage_error(err: Any) -> None:
    show, message = getattr(err, "show", None), getattr(err, "format_message", None)
    if callable(show) and callable(message):
        # click writes "Usage: …\nTry '… --help' for help.\n\nError: MESSAGE" (the help text for
        # no arguments); its layout is kept, only its last line gets our prefix.
        buffer = io.StringIO()
        show(file=buffer)
        text, theirs = buffer.getvalue(), f"Error: {message()}"
        head, found, tail = text.rpartition(theirs)
        sys.stderr.write(f"{head}error: {message()}{tail}" if found else text)
    else:
        console_err.print(f"error: {err}", highlight=False, markup=False)
    code = getattr(err, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 2)


def main() -> None:
    try:
        # Non-standalone: errors come back to us as exceptions. typer then *returns* the exit
        # code of a typer.Exit instead of exiting — including Ctrl-C, which it maps to 130.
        code = app(standalone_mode=False, prog_name="latentdub")
    except Cancelled as err:
        _interrupted(str(err))
    except LatentdubError as err:
        console_err.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit:
        raise
    except Exception as err:
        if isinstance(err, _abort_types()):
            # Old typer/click turned Ctrl-C into Abort; EOF on a prompt is a plain abort.
            if isinstance(err.__cause__ or err.__context__, KeyboardInterrupt):
                _interrupted()
            console_err.print("aborted")
            sys.exit(1)
        if isinstance(err, _usage_error_types()):
            _show_usage_error(err)
        # A bug: say so plainly instead of dumping a traceback.
        console_err.print(
            f"[bold red]internal error:[/] {type(err).__name__}: {err}\n"
            "Set LATENTDUB_DEBUG=1 to see the traceback, and please report it.",
            highlight=False,
        )
        if os.environ.get("LATENTDUB_DEBUG"):
            raise
        sys.exit(EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED:
        _interrupted()
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)
