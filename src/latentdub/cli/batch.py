"""``latentdub batch MANIFEST``: dub every row of a CSV / JSON Lines manifest, resumably.

The work is in :mod:`latentdub.batch`; this module parses the flags, shows the progress and
turns the report into files, a table (or one JSON object) and the exit code:
0 every row done or skipped, 2 bad flags or manifest (nothing ran), 3 some rows failed,
130 interrupted (Ctrl-C: the item in flight stops cleanly, the summary is still written).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from latentdub.cli._app import (
    ProgressLines,
    app,
    console,
    console_err,
    format_eta,
    loading,
    plain_progress,
)
from latentdub.cli.options import with_option_flags
from latentdub.errors import InputError
from latentdub.options import DubOptions, OptionError

log = logging.getLogger("latentdub.cli")
_T = TypeVar("_T")

# One shared note for the option flags, not a second declaration of each.
_PANEL = "Dub options (the default for every row)"


def _batch(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="CSV (header row) or JSON Lines: video, audio, output, optional consent and option columns "
            "(steps, guidance, seed, …)."
        ),
    ],
    outdir: Annotated[
        Path | None,
        typer.Option(help="Folder for relative outputs and the summary (default: the manifest's folder)."),
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            help="Comma-separated devices, one worker and one loaded model each, e.g. cuda:0,cuda:1 "
            "(default: the first GPU if there is one, else cpu). Workers take the next row from one shared "
            "queue in manifest order. --device is the same.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", hidden=True)] = None,
    version: Annotated[str, typer.Option(help="Model version: 1.5 (256 px) or 1.6 (512 px).")] = "1.6",
    weights: Annotated[
        Path | None,
        typer.Option(help="Local weights folder (official layout) instead of the HF hub/cache. --weights-dir is the same."),
    ] = None,
    weights_dir: Annotated[Path | None, typer.Option("--weights-dir", hidden=True)] = None,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32 (default: official rule).")] = None,
    consent: Annotated[
        str | None,
        typer.Option(help="Consent record (JSON text or .json file) for rows without a consent column."),
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option(help="Where to write the summary: PATH.csv and PATH.json (default: batch-summary.* in --outdir "
                     "or beside the manifest)."),
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Only check the manifest and open every row's media (no model is loaded, "
                     "nothing runs)."),
    ] = False,
    set_options: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="NAME=VALUE",
                     help="Any dub option for every row, e.g. --set steps=8 (repeatable; wins over the option "
                     "flags, a manifest column wins over it)."),
    ] = None,
    signing_cert: Annotated[
        Path | None, typer.Option(help="Certificate chain (PEM, leaf first) to sign the content credentials with.")
    ] = None,
    signing_key: Annotated[Path | None, typer.Option(help="Private key (PEM) for --signing-cert.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="No bars on stdout; one JSON summary object last on stdout.")] = False,
    *,
    options: DubOptions,
) -> None:
    """Dub every row of MANIFEST; rerun it to finish what is left.

    Every row is checked before anything runs: a bad row is reported with its line number. The dub options are the defaults for every row; a manifest column overrides them.

    Each finished output gets a sidecar OUTPUT.latentdub.json; a rerun skips the rows whose inputs, options, consent, model and output still match it.

    A failing row is recorded and the batch goes on (exit 3 at the end). Ctrl-C stops the item in flight cleanly and writes the summary (exit 130).
    """
    from latentdub import batch as lib
    from latentdub.cli.dub import _signing
    from latentdub.devices import parse_devices

    base = _with_set(options, set_options or [])
    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    # Every check that needs no model first: flags, devices, then every manifest row.
    weights = _alias(weights, weights_dir, "--weights", "--weights-dir")
    default_consent = _default_consent(consent)
    keys = _signing(signing_cert, signing_key)
    device_list = parse_devices(_alias(devices, device, "--devices", "--device"))
    rows = _read_rows(manifest, outdir, default_consent, base, check=check, json_out=json_out)
    if check:
        _report_check(rows, manifest, json_out)
        return

    runner, forced = _run(rows, device_list, weights or version, version=version, dtype=dtype, keys=keys,
                          base=base, json_out=json_out)
    report = runner.report()
    target = summary or ((outdir.expanduser() if outdir else manifest.expanduser().resolve().parent) / lib.SUMMARY_STEM)
    csv_path, json_path = lib.write_summary(report, target, manifest=manifest)
    if json_out:
        data = report.to_dict()
        data.update(manifest=str(manifest), summary={"csv": str(csv_path), "json": str(json_path)})
        print(json.dumps(data, default=str))
    else:
        _print_report(report, csv_path, json_path)
    code = lib.EXIT_CANCELLED if forced else report.exit_code
    if forced and not runner.wait(2.0):
        # A dub is still inside torch / FFmpeg threads: a normal interpreter exit would abort in
        # their C++ code (exit 134). The summary is written; leave now. The partial file of the
        # item in flight is removed by the next run.
        console_err.print("interrupted", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(lib.EXIT_CANCELLED)
    if code:
        raise typer.Exit(code)


def _run(
    rows: list[Any], devices: list[str], weights: Path | str, *, version: str, dtype: str | None, keys: Any,
    base: DubOptions, json_out: bool,
) -> tuple[Any, bool]:
    """Load one model per device and run the rows, with progress and Ctrl-C handling; the
    runner (its report) and whether a second Ctrl-C forced the stop."""
    from latentdub import batch as lib

    with _quiet_library_warnings():
        with loading(f"loading the model on {', '.join(devices)}", json_out=json_out):
            pipes = lib.load_pipelines(devices, weights, version=version, dtype=dtype)
        for pipe in pipes:
            if keys is not None:
                pipe.provenance.signing = keys
        _warn_once_per_batch(pipes[0], base)

        cancel, force = threading.Event(), threading.Event()
        runner = lib.BatchRunner(rows, pipes, cancel=cancel, on_row=_row_line)
        with _cancel_on_signals(cancel, force), _display(runner, json_out) as display:
            runner.start()
            while not runner.wait(0.2) and not force.is_set():
                display.refresh()
            display.refresh()
    return runner, force.is_set()


def batch_command(options_cls: type[DubOptions] = DubOptions) -> Callable[..., None]:
    """The ``batch`` command function, with a flag for every field of ``options_cls`` (a
    subclass's new fields included); register it with ``app.command("batch")``."""
    return with_option_flags(options_cls, panel=_PANEL)(_batch)


batch = app.command("batch")(batch_command())


def _alias(value: _T | None, alias: _T | None, name: str, alias_name: str) -> _T | None:
    """One value from a flag and its hidden alias (kept working, kept out of the help)."""
    if value is not None and alias is not None and value != alias:
        raise InputError(f"{name} and {alias_name} are the same option: give one")
    return value if value is not None else alias


def _with_set(options: DubOptions, items: list[str]) -> DubOptions:
    try:
        return options.replace(**_parse_set(items, type(options)))
    except OptionError as err:
        raise InputError(f"--set {err}") from None


def _read_rows(
    manifest: Path, outdir: Path | None, default_consent: Any, base: DubOptions, *, check: bool, json_out: bool
) -> list[Any]:
    """The checked rows; with ``check`` every row's media opened too. Bad rows: a
    :class:`ManifestError` (with --json, also its JSON on stdout)."""
    from latentdub import batch as lib

    try:
        rows = lib.read_manifest(manifest, outdir=outdir, default_consent=default_consent, base_options=base)
        if check:
            problems = lib.probe_media(rows)
            if problems:
                raise lib.ManifestError(manifest.expanduser(), problems)
    except lib.ManifestError as err:
        if json_out:
            print(json.dumps({"status": "invalid_manifest", "exit_code": err.exit_code, **err.to_dict()}))
        raise
    return rows


def _parse_set(items: list[str], options_cls: type[DubOptions]) -> dict[str, Any]:
    """``["steps=8", "sampler=ddim"]`` → ``{"steps": "8", …}`` (DubOptions converts the text)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise InputError(f"--set {item!r}: give NAME=VALUE, e.g. --set steps=8")
        if name not in options_cls.model_fields:
            raise InputError(f"--set {name!r} is not an option; the options are: {', '.join(options_cls.model_fields)}")
        out[name] = value.strip()
    return out


def _default_consent(value: str | None) -> Any:
    """The --consent record for rows without their own (None: every row must bring one)."""
    if value is None:
        return None
    from latentdub.provenance.consent import parse_consent

    try:
        return parse_consent(value)
    except InputError as err:
        raise InputError(f"--consent: {err}") from None


def _report_check(rows: list[Any], manifest: Path, json_out: bool) -> None:
    if json_out:
        print(json.dumps({"status": "valid_manifest", "manifest": str(manifest), "rows": len(rows),
                          "outputs": [str(r.output) for r in rows]}))
        return
    console.print(f"manifest {manifest}: {len(rows)} row{'s' if len(rows) != 1 else ''}, all valid", highlight=False)


def _warn_once_per_batch(pipe: Any, base: DubOptions) -> None:
    """The warnings that are about the model, not a row: said once, before the first row."""
    from latentdub.pipeline import RANDOM_WEIGHTS_WARNING

    if pipe.model_info.get("random_weights"):
        console_err.print(f"[yellow]warning:[/] {RANDOM_WEIGHTS_WARNING}", highlight=False)
    elif pipe.device.type == "cpu":
        import torch

        from latentdub.estimate import cpu_warning

        message = cpu_warning(pipe.resolution, base.steps, base.guidance, base.deepcache, threads=torch.get_num_threads())
        console_err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


class _OnceWarnings(logging.Handler):
    """Library warnings on stderr, each distinct message once per batch: the per-row ones (no face
    found, audio header) are in each row's result and the summary anyway."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.seen: set[str] = set()
        self._lock_seen = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        from latentdub.pipeline import RANDOM_WEIGHTS_WARNING

        message = record.getMessage()
        with self._lock_seen:
            if message in self.seen or message == RANDOM_WEIGHTS_WARNING:  # said once already, up front
                return
            self.seen.add(message)
        console_err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@contextmanager
def _quiet_library_warnings() -> Iterator[None]:
    """While the batch runs, library warnings go through :class:`_OnceWarnings` only."""
    root = logging.getLogger("latentdub")
    saved, level = list(root.handlers), root.level
    for h in saved:
        root.removeHandler(h)
    handler = _OnceWarnings()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


@contextmanager
def _cancel_on_signals(cancel: threading.Event, force: threading.Event) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) once: the dub in flight stops cleanly and no new row starts; a second
    one sets ``force``: stop at once (the summary is still written; the next run removes the
    partial file). Flags, not an exception: a KeyboardInterrupt inside ``Thread.join`` would
    leave the interpreter unable to shut down cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        if cancel.is_set():
            force.set()
            return
        cancel.set()
        console_err.print("stopping: the item in flight is cancelled, no new one starts "
                          "(Ctrl-C again to stop at once)", highlight=False)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_STAGE_LABELS = {
    "check": "checking sidecar",
    "read": "reading inputs",
    "fit": "fitting audio",
    "faces": "faces",
    "audio_features": "audio features",
    "dub": "dubbing",
    "finalize": "finalizing",
    "sidecar": "writing sidecar",
}


class _Display:
    """On a terminal: one overall bar (items and video seconds, ETA) and one line per device with
    its item's stage. Off a terminal the bars draw nothing (with --json, nothing at all)."""

    def __init__(self, runner: Any, json_out: bool) -> None:
        self.runner = runner
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console_err,
            transient=json_out,
            disable=not console_err.is_terminal,
        )
        self.overall: TaskID | None = None
        self.workers: list[TaskID] = []

    def __enter__(self) -> _Display:
        self.bar.__enter__()
        self.overall = self.bar.add_task("[bold]batch", total=1, detail="")
        self.workers = [self.bar.add_task(f"  {d}", total=1, detail="idle") for d in self.runner.devices]
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def refresh(self) -> None:
        snap = self.runner.progress()
        assert self.overall is not None
        if snap.seconds_total > 0:
            completed, total = snap.seconds_done, snap.seconds_total
        else:
            completed, total = float(snap.items_finished), float(max(snap.items_total, 1))
        detail = f"{_items(snap)} · {snap.seconds_done:.1f}/{snap.seconds_total:.1f} s of video · {format_eta(snap.eta_s)}"
        if snap.failed:
            detail += f" · [red]{snap.failed} failed[/]"
        self.bar.update(self.overall, completed=completed, total=total, detail=detail)
        for task, state in zip(self.workers, snap.workers, strict=True):
            if state.line is None:
                self.bar.update(task, completed=0, total=1, detail="idle")
                continue
            stage = _STAGE_LABELS.get(state.stage, state.stage)
            count = f" {state.done}/{state.total}" if state.total > 1 else ""
            eta = f" · {format_eta(state.eta_s)}" if state.stage in ("faces", "dub") and state.eta_s is not None else ""
            self.bar.update(task, completed=state.done, total=max(state.total, 1),
                            detail=f"line {state.line} {state.output}: {stage}{count}{eta}")


class _PlainDisplay:
    """Off a terminal (a log, nohup, CI): :class:`ProgressLines` for the whole batch (video
    seconds, items, ETA) and for each worker's stage of its row."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.lines = ProgressLines()
        self.current: dict[str, str] = {}  # device → the name of its stage now

    def __enter__(self) -> _PlainDisplay:
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lines.finish()

    def refresh(self) -> None:
        snap = self.runner.progress()
        failed = f" · {snap.failed} failed" if snap.failed else ""
        self.lines.update("batch", snap.items_finished, snap.items_total, eta_s=snap.eta_s,
                          detail=f"{snap.seconds_done:.1f}/{snap.seconds_total:.1f} s of video{failed}")
        for state in snap.workers:
            name = ""
            if state.line is not None:
                name = f"{state.device} line {state.line} {state.output}: {_STAGE_LABELS.get(state.stage, state.stage)}"
            previous = self.current.get(state.device, "")
            if previous and previous != name:
                self.lines.end(previous)
            self.current[state.device] = name
            if name:
                self.lines.update(name, state.done, state.total or None, eta_s=state.eta_s)


def _items(snap: Any) -> str:
    return f"{snap.items_finished}/{snap.items_total} items"


def _display(runner: Any, json_out: bool) -> _Display | _PlainDisplay:
    return _PlainDisplay(runner) if plain_progress(json_out) else _Display(runner, json_out)


def _row_line(row: Any, result: Any) -> None:
    """One line on stderr as each row ends (printed above the live bars)."""
    from latentdub.pipeline import RANDOM_WEIGHTS_WARNING

    name = f"line {result.line} {Path(result.output).name}"
    if result.status == "done":
        warnings = [w for w in result.warnings if w != RANDOM_WEIGHTS_WARNING]
        extra = f" · {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
        console_err.print(f"[green]done[/]      {name}: {result.duration_s or 0:.2f} s of video in "
                          f"{result.seconds:.1f} s{extra}", highlight=False)
    elif result.status == "skipped":
        console_err.print(f"[cyan]skipped[/]   {name}: already done (its sidecar matches)", highlight=False)
    elif result.status == "failed":
        console_err.print(f"[red]failed[/]    {name}: {result.error}", highlight=False, soft_wrap=True)
    elif result.status == "cancelled":
        console_err.print(f"[yellow]cancelled[/] {name}: {result.note}", highlight=False)


def _print_report(report: Any, csv_path: Path, json_path: Path) -> None:
    counts = report.counts
    parts = [f"{counts[s]} {s}" for s in ("done", "skipped", "failed", "cancelled") if counts[s]]
    console.print(f"{len(report.rows)} rows: {', '.join(parts) or 'nothing to do'} in {report.elapsed_s:.1f} s",
                  highlight=False)
    trouble = [r for r in report.rows if r.status in ("failed", "cancelled")]
    if trouble:
        table = Table(box=None, show_header=True, header_style="bold")
        table.add_column("line", justify="right")
        table.add_column("status")
        table.add_column("output")
        table.add_column("why", overflow="fold")
        for r in trouble:
            table.add_row(str(r.line), r.status, r.output, r.error or r.note)
        console.print(table)
    console.print(f"summary: {csv_path} and {json_path}", highlight=False, soft_wrap=True)
