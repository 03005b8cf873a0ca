"""The shared typer application and consoles (stdout for results, stderr for messages)."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="latentdub",
    help="Photorealistic AI video dubbing (LatentSync 1.5 / 1.6 compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
console_err = Console(stderr=True)
