"""``latentdub compare ORIGINAL DUBBED -o OUT.mp4``: a side-by-side review video of a dub."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console, console_err, frame_bars


@app.command("compare")
def compare(
    original: Annotated[Path, typer.Argument(help="The original video (before dubbing).")],
    dubbed: Annotated[Path, typer.Argument(help="The dubbed video.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The review video to write (.mp4, .mov, .mkv).")],
    face: Annotated[
        str, typer.Option(help="The face the dub used: largest, X,Y@T (pixel at T s) or track:N.")
    ] = "largest",
    height: Annotated[
        int, typer.Option(help="Largest height of each top panel, px (small videos are shown at 360 px).")
    ] = 720,
    crf: Annotated[float, typer.Option(help="x264 quality of the review video (0–51, lower is better).")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (the last line of stdout).")] = False,
    occlusion: Annotated[
        bool,
        typer.Option(
            "--occlusion/--no-occlusion",
            help="Mark frames where something covers the dubbed mouth (occluder kept, or passed through).",
        ),
    ] = True,
) -> None:
    """Write a review video: original | dub on top, both mouths enlarged beneath, timecode and
    status (DUBBED / PASS-THROUGH / NO FACE / ORIGINAL ENDED) burned in, with the dub's audio."""
    from latentdub.compare import compare_videos
    from latentdub.errors import InputError
    from latentdub.progress import ProgressEvent

    if not 0 <= crf <= 51:
        raise InputError(f"--crf must be between 0 and 51, got {crf:g}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with frame_bars(8, json_out=json_out, eta=True) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(event: ProgressEvent) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total)
            bar.update(tasks[event.stage], completed=event.done, total=event.total)

        result = compare_videos(
            original, dubbed, output, face=face, max_height=height, crf=crf, progress=on_progress,
            occlusion=occlusion,
        )  # fmt: skip

    summary = result.to_dict()
    if json_out:
        print(json.dumps(summary))
        return
    _print(summary)


def _print(s: dict[str, Any]) -> None:
    head = Table(show_header=False, box=None)
    head.add_row("review video", f"{s['output']} ({s['width']}x{s['height']})")
    head.add_row("frames", f"{s['frames']} ({s['duration_s']:.2f} s), audio {'yes' if s['has_audio'] else 'none'}")
    counts = s["frames_by_status"]
    head.add_row("status", ", ".join(f"{name} {n}" for name, n in counts.items() if n) or "none")
    if s.get("frames_replayed"):
        head.add_row("replayed", f"{s['frames_replayed']} frames show an original frame again (length policy)")
    for t in s.get("dubbed_tracks") or []:  # which face was dubbed, found from the pixels
        if t["frames_dubbed"]:
            spans = ", ".join(f"{r['start_s']:.2f}–{r['end_s']:.2f} s" for r in t["ranges"][:6])
            more = f" (+{len(t['ranges']) - 6} more)" if len(t["ranges"]) > 6 else ""
            head.add_row(f"face #{t['track_id']}", f"dubbed on {t['frames_dubbed']} frames: {spans}{more}")
    occ = s.get("occlusion")
    if occ is not None:
        def frames_of(spans: list[dict[str, Any]]) -> str:
            listed = ", ".join(f"{r['start_frame']}–{r['end_frame'] - 1}" for r in spans[:6])
            return f" ({listed}{f', +{len(spans) - 6} more' if len(spans) > 6 else ''})" if spans else ""

        head.add_row(
            "occluders",
            f"in front of the mouth on {occ['frames_occluded']} frames{frames_of(occ['occluded_ranges'])}, "
            f"of which passed through (mouth covered) {occ['frames_passed_through']}"
            f"{frames_of(occ['passed_through_ranges'])}",
        )
    names = {
        "dubbed_median": "mouth, dubbed frames",
        "passthrough_median": "mouth, pass-through frames",
        "upper_face_median": "upper face",
        "outside_median": "rest of the frame",
    }
    parts = [f"{names.get(k, k)} {v:.1f}" for k, v in s["mouth_delta"].items() if v is not None]
    if parts:
        head.add_row("median |Δ|", ", ".join(parts) + " (grey levels)")
    console.print(head)
    if s["ranges"]:
        table = Table(title="not dubbed")
        for col in ("frames", "time s", "status", "reason"):
            table.add_column(col)
        for r in s["ranges"]:
            table.add_row(
                f"{r['start_frame']}–{r['end_frame'] - 1}",
                f"{r['start_s']:.2f}–{r['end_s']:.2f}",
                r["status"],
                r["reason"],
            )
        console.print(table)
    for warning in s["warnings"]:
        console_err.print(f"[yellow]warning:[/] {warning}", highlight=False)
