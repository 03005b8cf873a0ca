"""``latentdub dub``: the main job."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from latentdub.cli._app import (
    ProgressLines,
    app,
    console,
    console_err,
    loading,
    show_library_warnings,
)
from latentdub.cli.options import with_option_flags
from latentdub.errors import InputError
from latentdub.options import DubOptions
from latentdub.progress import ProgressEvent

log = logging.getLogger("latentdub.cli")


def _dub(
    video: Annotated[Path, typer.Argument(help="The video of the person speaking.")],
    audio: Annotated[Path, typer.Argument(help="The new speech track (any audio or video file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the dubbed video (.mp4).")],
    version: Annotated[str, typer.Option(help="Model version: 1.5 (256 px) or 1.6 (512 px).")] = "1.6",
    weights: Annotated[
        Path | None, typer.Option(help="Local weights folder (official layout) instead of the HF hub/cache.")
    ] = None,
    consent: Annotated[
        str | None,
        typer.Option(help="Required. The consent record: JSON text or a .json file with subject, granted_by, method and evidence."),
    ] = None,
    signing_cert: Annotated[
        Path | None, typer.Option(help="Certificate chain (PEM, leaf first) to sign the content credentials with.")
    ] = None,
    signing_key: Annotated[Path | None, typer.Option(help="Private key (PEM) for --signing-cert.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32 (default: official rule).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary as the last line.")] = False,
    *,
    options: DubOptions,
) -> None:
    """Dub VIDEO with the speech in AUDIO and write the result to OUTPUT."""
    from latentdub.devices import parse_device
    from latentdub.media.writer import check_encoder
    from latentdub.pipeline import LipSyncPipeline, read_inputs

    show_library_warnings()
    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    # Every check that needs no model, before the model loads (seconds, not minutes).
    parse_device(device, flag="--device")
    check_encoder(options.encoder)  # an explicit --encoder nvenc that cannot open
    record = _consent(consent)
    keys = _signing(signing_cert, signing_key)
    inputs = read_inputs(video, audio, output)
    _check_segments(inputs, options, json_out=json_out)

    with loading("loading model", json_out=json_out):
        pipe = LipSyncPipeline.from_pretrained(weights or version, version=version, device=device, dtype=dtype)
    if keys is not None:
        pipe.provenance.signing = keys
    if pipe.device.type == "cpu" and not pipe.model_info.get("random_weights"):
        import torch

        from latentdub.estimate import cpu_warning

        log.warning(cpu_warning(pipe.resolution, options.steps, options.guidance, options.deepcache,
                                threads=torch.get_num_threads(), fps=inputs.info.fps or 25.0))

    with _progress(json_out) as on_event, _cancel_on_ctrl_c() as cancel:
        result = pipe.dub(inputs, options, consent=record, progress=on_event, cancel=cancel)

    summary = result.to_dict()
    if json_out:
        print(json.dumps(summary, default=str))
        return
    _print_summary(summary)


def dub_command(options_cls: type[DubOptions] = DubOptions) -> Callable[..., None]:
    """The ``dub`` command function, with a flag for every field of ``options_cls`` (a subclass's
    new fields included); register it with ``app.command("dub")``."""
    return with_option_flags(options_cls)(_dub)


dub = app.command("dub")(dub_command())


def _check_segments(inputs: Any, options: DubOptions, *, json_out: bool) -> None:
    """--segments against the video before the model loads: times, overlaps and audio files;
    and when a segment names a track or a point, pass 1 now (the dub reuses it) to check those."""
    if not options.segments:
        return
    from latentdub.segments import check_segments, needs_analysis, resolve_segments

    try:
        check_segments(options.segments, duration_s=inputs.info.duration_s, fps=inputs.info.fps)
        if needs_analysis(options.segments):
            from latentdub.face import analyze_video

            with loading("finding faces (pass 1, to check --segments)", json_out=json_out):
                inputs.analysis = analyze_video(inputs.video, info=inputs.info)
            resolve_segments(options.segments, inputs.analysis)
    except InputError as err:
        raise InputError(f"--segments: {err}") from None


def _consent(value: str | None) -> Any:
    from latentdub.provenance.consent import require_consent

    try:
        return require_consent(value, how="--consent")
    except InputError as err:
        raise InputError(f"--consent: {err}") from None


def _signing(cert: Path | None, key: Path | None) -> Any:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise InputError("--signing-cert and --signing-key go together: give both, or neither for the local key")
    from latentdub.provenance.keys import load_signing

    return load_signing(cert, key)


@contextmanager
def _cancel_on_ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C cancels the dub through the engine (clean stop, no file); a second one
    interrupts at once."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        console_err.print("stopping… (Ctrl-C again to force)", highlight=False)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


_STAGE_LABELS = {
    "read": "read inputs",
    "fit": "fit audio",
    "faces": "faces",
    "audio_features": "audio features",
    "dub": "dubbing",
    "finalize": "finalize",
}


@contextmanager
def _progress(json_out: bool) -> Iterator[Callable[[ProgressEvent], None]]:
    """The engine's progress events as rich bars (one per stage) on a terminal, as plain lines
    on stderr otherwise (a log, nohup, CI); nothing with --json off a terminal."""
    if not console_err.is_terminal:
        lines = ProgressLines() if not json_out else None

        def on_line(event: ProgressEvent) -> None:
            if lines is not None:
                rate = f"{event.fps:.1f} fps" if event.fps and event.stage in ("faces", "dub") else ""
                lines.update(_STAGE_LABELS.get(event.stage, event.stage), event.done, event.total,
                             eta_s=event.eta_s, detail=rate)

        try:
            yield on_line
        finally:
            if lines is not None:
                lines.finish()
        return
    with Progress(
        TextColumn("[bold]{task.description:<15}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console_err,
        transient=json_out,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def on_event(event: ProgressEvent) -> None:
            rate = f"{event.fps:.1f} fps" if event.fps and event.stage in ("faces", "dub") else ""
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(_STAGE_LABELS.get(event.stage, event.stage), total=event.total, rate=rate)
            bar.update(tasks[event.stage], completed=event.done, total=event.total, rate=rate)

        yield on_event


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("output", summary["output"])
    table.add_row("frames", f"{summary['frames']} ({summary['dubbed_frames']} dubbed) at {summary['fps']} fps")
    table.add_row("duration", f"{summary['duration_s']:.2f} s")
    table.add_row("size", f"{summary['width']}x{summary['height']}")
    for t in summary.get("tracks") or []:
        spans = ", ".join(f"{r['start_s']:.2f}–{r['end_s']:.2f}" for r in t["dubbed_ranges"][:6])
        more = f" (+{len(t['dubbed_ranges']) - 6} more)" if len(t["dubbed_ranges"]) > 6 else ""
        how = ", ".join(f"{k} {v}" for k, v in t["chosen_by"].items())
        table.add_row(f"face #{t['track']}", f"dubbed {t['frames']} frames: {spans} s{more} ({how})")
    for r in summary["passthrough_ranges"]:
        table.add_row("untouched", f"{r['start_s']:.2f}–{r['end_s']:.2f} s (frames {r['start_frame']}–{r['end_frame'] - 1}): {r['reason']}")
    occlusion = summary.get("occlusion")
    if occlusion and occlusion["occluded_frames"]:
        spans = ", ".join(f"{r['start_s']:.2f}–{r['end_s']:.2f}" for r in occlusion["occluded"][:6])
        more = f" (+{len(occlusion['occluded']) - 6} more)" if len(occlusion["occluded"]) > 6 else ""
        table.add_row("occluded", f"{occlusion['occluded_frames']} frames kept the occluder's pixels: {spans} s{more}")
    if summary.get("fit"):
        table.add_row("fit", json.dumps(summary["fit"], default=str))
    table.add_row("timings", ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items()))
    console.print(table)

