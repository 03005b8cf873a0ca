"""The shared typer application, consoles (stdout for results, stderr for messages) and progress.

Progress goes to stderr: rich bars on a terminal; plain :class:`ProgressLines` when stderr is a
log, nohup or CI (a bar there shows nothing for the whole run); nothing with ``--json`` off a
terminal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

#: Seconds between two plain progress lines of one stage; ``LATENTDUB_PROGRESS_INTERVAL`` overrides it.
PROGRESS_INTERVAL_S = 10.0


class _LatentdubGroup(TyperGroup):
    """The root group. typer's rich help gives every flag a ``<bool>`` type, as if it took a
    value; each command is tidied as click resolves it, so every help page (subcommands of
    subgroups included) shows flags bare."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _bare_flags(command, ctx)
        return command

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _bare_flag(param)
        return params


def _bare_flags(command: Any, ctx: Any) -> None:
    for param in [*command.params, command.get_help_option(ctx)]:
        _bare_flag(param)
    for sub in getattr(command, "commands", {}).values():
        _bare_flags(sub, ctx)


def _bare_flag(param: Any) -> None:
    # An empty metavar is what typer shows in the type column; click shows none for flags anyway.
    if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""


app = typer.Typer(
    name="latentdub",
    help="Photorealistic AI video dubbing (LatentSync 1.5 / 1.6 compatible).",
    cls=_LatentdubGroup,
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


# -- progress -----------------------------------------------------------------------------------
def plain_progress(json_out: bool) -> bool:
    """Whether progress goes out as plain lines: stderr is not a terminal and not ``--json``."""
    return not json_out and not console_err.is_terminal


def progress_interval() -> float:
    """:data:`PROGRESS_INTERVAL_S`, or ``LATENTDUB_PROGRESS_INTERVAL`` (seconds) when set."""
    text = os.environ.get("LATENTDUB_PROGRESS_INTERVAL", "").strip()
    try:
        return max(0.0, float(text)) if text else PROGRESS_INTERVAL_S
    except ValueError:
        return PROGRESS_INTERVAL_S


def format_eta(seconds: float | None) -> str:
    """``ETA h:mm:ss`` (``ETA -:--:--`` while unknown)."""
    if seconds is None:
        return "ETA -:--:--"
    s = round(seconds)
    return f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLines:
    """Progress as plain lines on stderr, for logs: ``NAME: started``, then about one line per
    ``interval_s`` (``NAME: done/total (pct %) · detail · ETA h:mm:ss``), then ``NAME: finished``
    once ``done`` reaches ``total`` (or at :meth:`end` / :meth:`finish`)."""

    def __init__(self, *, interval_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = progress_interval() if interval_s is None else interval_s
        self._clock = clock
        self._open: dict[str, tuple[float, float]] = {}  # name → (start, last line)

    def update(
        self, name: str, done: float, total: float | None, *, eta_s: float | None = None, detail: str = ""
    ) -> None:
        now = self._clock()
        first = name not in self._open
        if first:
            self._open[name] = (now, now)
            _say(f"{name}: started{f' ({_count(total)})' if total else ''}")
        start, last = self._open[name]
        if total and done >= total:
            self.end(name, f"{_count(done)}/{_count(total)}")
        elif not first and now - last >= self.interval_s:
            self._open[name] = (start, now)
            if eta_s is None and total and done > 0:
                eta_s = (now - start) / done * (total - done)
            parts = [f"{_count(done)}/{_count(total)} ({100 * done / total:.0f} %)" if total else _count(done)]
            parts += [detail] if detail else []
            parts += [format_eta(eta_s)] if total else []
            _say(f"{name}: {' · '.join(parts)}")

    def end(self, name: str, what: str = "") -> None:
        """``NAME: finished [what] in N s`` if ``name`` is running."""
        if name in self._open:
            start, _ = self._open.pop(name)
            _say(f"{name}: finished{' ' + what if what else ''} in {self._clock() - start:.1f} s")

    def finish(self) -> None:
        """End every stage still running."""
        for name in list(self._open):
            self.end(name)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _say(text: str) -> None:
    console_err.print(text, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def loading(what: str, *, json_out: bool) -> Iterator[None]:
    """A spinner on a terminal, ``what…`` and ``what: finished in N s`` lines in a log."""
    if plain_progress(json_out):
        lines = ProgressLines()
        lines.update(what, 0, None)
        yield
        lines.finish()
    elif json_out:
        yield
    else:
        with console_err.status(f"{what}…"):
            yield


class _LineProgress(Progress):
    """A rich ``Progress`` that draws nothing and prints :class:`ProgressLines` instead, so the
    commands that drive bars (``add_task`` / ``update`` / ``advance``) log the same way."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **{**kwargs, "disable": True})
        self.lines = ProgressLines()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        task = next((t for t in self.tasks if t.id == task_id), None)
        if task is not None:
            self.lines.update(task.description, task.completed, task.total)

    def stop(self) -> None:
        super().stop()
        self.lines.finish()


def frame_bars(label_width: int, *, json_out: bool, eta: bool = False) -> Progress:
    """Transient "label  ━━━  done/total frames  elapsed [ETA]" bars on stderr on a terminal;
    plain progress lines when stderr is not one; nothing with ``--json`` off a terminal."""
    columns = [
        TextColumn(f"[bold]{{task.description:<{label_width}}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} frames"),
        TimeElapsedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    if plain_progress(json_out):
        return _LineProgress(*columns, console=console_err)
    return Progress(*columns, console=console_err, transient=True, disable=json_out or not console_err.is_terminal)
