"""``latentdub dub`` (the main job) and ``latentdub doctor``."""

from __future__ import annotations

import json
import logging
import platform
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

from latentdub.cli._app import app, console, console_err
from latentdub.errors import InputError


@app.command("dub")
def dub(
    video: Annotated[Path, typer.Argument(help="The video of the person speaking.")],
    audio: Annotated[Path, typer.Argument(help="The new speech track (any audio or video file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the dubbed video (.mp4).")],
    version: Annotated[str, typer.Option(help="Model version: 1.5 (256 px) or 1.6 (512 px).")] = "1.6",
    weights: Annotated[
        Path | None, typer.Option(help="Local weights folder (official layout) instead of the HF hub/cache.")
    ] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Audio classifier-free guidance (1 = off).")] = 1.5,
    seed: Annotated[int, typer.Option(help="Random seed (official default 1247).")] = 1247,
    deepcache: Annotated[bool, typer.Option("--deepcache/--no-deepcache", help="DeepCache, interval 3.")] = True,
    length_policy: Annotated[
        str, typer.Option(help="When lengths differ: pingpong (official), loop, cut, pad.")
    ] = "pingpong",
    fit: Annotated[str, typer.Option(help="Fit the dub to the picture: none, stretch (WSOLA), align (DTW).")] = "none",
    max_stretch: Annotated[float, typer.Option(help="Largest time-stretch ratio --fit may use.")] = 1.25,
    face: Annotated[str, typer.Option(help="Which face: largest, X,Y@T (pixel at T s), or track:N.")] = "largest",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32 (default: official rule).")] = None,
    crf: Annotated[int, typer.Option(help="x264 quality (lower is better; 18 ≈ visually lossless).")] = 18,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary as the last line.")] = False,
) -> None:
    """Dub VIDEO with the speech in AUDIO and write the result to OUTPUT."""
    from latentdub.face import parse_policy
    from latentdub.pipeline import DubOptions, LipSyncPipeline, check_output_path, read_inputs

    parse_policy(face)  # a clear error for a malformed --face before anything runs
    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    for path, what in ((video, "video"), (audio, "audio")):
        if not path.exists():
            raise InputError(f"{what} file {path} does not exist")
        if path.is_dir():
            raise InputError(f"{what} {path} is a folder, not a file")
    DubOptions(steps=steps, guidance=guidance, seed=seed, length_policy=length_policy, fit=fit,
               max_stretch=max_stretch, face=face, crf=crf).validate()
    check_output_path(output, video, audio)
    read_inputs(video, audio)  # fail fast on bad input, before loading a model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    status = console_err.status("loading model…") if not json_out else None
    if status:
        status.start()
    try:
        pipe = LipSyncPipeline.from_pretrained(weights or version, version=version, device=device, dtype=dtype)
    finally:
        if status:
            status.stop()
    if pipe.model_info.get("random_weights"):
        console_err.print("[bold yellow]warning:[/] RANDOM WEIGHTS (smoke-test model): the output is not a real dub")

    with Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} frames"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console_err,
        transient=json_out,
        disable=not console_err.is_terminal and json_out,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            label = {"faces": "1/2 faces", "dub": "2/2 dubbing"}.get(stage, stage)
            if stage not in tasks:
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = pipe(
            video,
            audio,
            output,
            progress=progress,
            steps=steps,
            guidance=guidance,
            seed=seed,
            deepcache=deepcache,
            length_policy=length_policy,
            fit=fit,
            max_stretch=max_stretch,
            face=face,
            crf=crf,
        )

    summary = result.to_dict()
    if json_out:
        print(json.dumps(summary, default=str))
        return
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("output", summary["output"])
    table.add_row("frames", f"{summary['frames']} ({summary['dubbed_frames']} dubbed) at {summary['fps']} fps")
    table.add_row("duration", f"{summary['duration_s']:.2f} s")
    table.add_row("size", f"{summary['width']}x{summary['height']}")
    for r in summary["passthrough_ranges"]:
        table.add_row("untouched", f"{r['start_s']:.2f}–{r['end_s']:.2f} s (frames {r['start_frame']}–{r['end_frame'] - 1}): {r['reason']}")
    if summary.get("fit"):
        table.add_row("fit", json.dumps(summary["fit"], default=str))
    table.add_row("timings", ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items()))
    for w in summary["warnings"]:
        table.add_row("[yellow]warning[/]", w)
    console.print(table)


@app.command("doctor")
def doctor(
    weights: Annotated[Path | None, typer.Option(help="Also check this local weights folder.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Report Python, torch, GPUs, codecs, face models and which weights are present."""
    import av
    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "pyav": av.__version__,
        "codecs": {name: name in av.codecs_available for name in ("libx264", "aac", "h264", "hevc", "mpeg4", "mp3")},
    }
    try:
        import mediapipe

        report["mediapipe"] = mediapipe.__version__
    except Exception as err:  # report, don't fail: doctor is for diagnosing broken installs
        report["mediapipe"] = f"unavailable: {err}"
    try:
        from latentdub.weights import weights_status

        report["weights"] = weights_status(weights)
    except Exception as err:
        report["weights"] = f"unavailable: {err}"
    if json_out:
        print(json.dumps(report, default=str))
        return
    table = Table(title="latentdub doctor", show_header=False)
    for key, value in report.items():
        if key != "weights":
            table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict | list) else str(value))
    console.print(table)
    weights_rows = report["weights"]
    if not isinstance(weights_rows, list):
        console.print(f"weights: {weights_rows}")
        return
    wt = Table(title="weights")
    for col in ("version", "where", "location", "complete", "converted", "random"):
        wt.add_column(col)
    for row in weights_rows:
        wt.add_row(str(row.get("version")), str(row.get("where")), str(row.get("location")),
                   "yes" if row.get("complete") else "no", "yes" if row.get("converted") else "no",
                   "[yellow]RANDOM[/]" if row.get("random_weights") else "")
    console.print(wt)
