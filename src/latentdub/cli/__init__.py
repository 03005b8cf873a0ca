"""The ``latentdub`` command line.

Each command group lives in its own module; this one only assembles them and turns
:class:`~latentdub.errors.LatentdubError` into a clean message and exit code.
"""

from __future__ import annotations

import sys

import typer

# Importing the command modules registers their commands on ``app``.
from latentdub.cli import dub as _dub  # noqa: F401
from latentdub.cli import faces as _faces  # noqa: F401
from latentdub.cli import weights as _weights  # noqa: F401
from latentdub.cli._app import app, console_err
from latentdub.errors import LatentdubError


def main() -> None:
    try:
        app(standalone_mode=False)
    except LatentdubError as err:
        console_err.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        console_err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console_err.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # a bug: say so plainly instead of dumping a traceback
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        console_err.print(
            f"[bold red]internal error:[/] {type(err).__name__}: {err}\n"
            "Set LATENTDUB_DEBUG=1 to see the traceback, and please report it.",
            highlight=False,
        )
        import os

        if os.environ.get("LATENTDUB_DEBUG"):
            raise
        sys.exit(3)
