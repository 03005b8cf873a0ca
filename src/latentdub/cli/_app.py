"""The shared typer application and consoles (stdout for results, stderr for messages)."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


class StderrWarnings(logging.Handler):
    """Library warnings (random weights, nothing dubbed, CPU cost, audio header) as ``warning: …``
    lines on stderr, through the console, which follows ``sys.stderr`` even when it is swapped."""

    def emit(self, record: logging.LogRecord) -> None:
        console_err.print(f"[yellow]warning:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


def show_library_warnings() -> None:
    """Route the library's warnings to stderr, once per process however many commands run."""
    root = logging.getLogger("latentdub")
    if not any(isinstance(h, StderrWarnings) for h in root.handlers):
        root.addHandler(StderrWarnings(level=logging.WARNING))
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


def frame_bars(label_width: int, *, json_out: bool, eta: bool = False) -> Progress:
    """Transient "label  ━━━  done/total frames  elapsed [ETA]" bars on stderr, shown only on a
    terminal and never with ``--json``."""
    columns = [
        TextColumn(f"[bold]{{task.description:<{label_width}}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} frames"),
        TimeElapsedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console_err, transient=True, disable=json_out or not console_err.is_terminal)
