"""The shared typer application and consoles (stdout for results, stderr for messages)."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="latentdub",
    help="Photorealistic AI video dubbing (LatentSync 1.5 / 1.6 compatible).",
    # Bare `latentdub` prints the help on stderr and exits 2 (click >= 8.2 convention; see main()).
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
console_err = Console(stderr=True)
