"""``latentdub faces VIDEO``: what the face layer sees in a video (tracks, choice, pass-through)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console, frame_bars
from latentdub.errors import InputError


@app.command("faces")
def faces(
    video: Annotated[Path, typer.Argument(help="The video to analyse.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (the last line of stdout).")
    ] = False,
    preview: Annotated[
        Path | None,
        typer.Option(help="Also write an annotated .mp4: boxes, anchors, mouth region."),
    ] = None,
    face: Annotated[
        str, typer.Option(help="Which face: largest, X,Y@T (pixel at T s), or track:N.")
    ] = "largest",
    version: Annotated[
        str, typer.Option(help="Model version the crops are for: 1.5 (256 px) or 1.6 (512 px), as for `dub`.")
    ] = "1.6",
    resolution: Annotated[
        int | None, typer.Option(help="Crop size override: 256 or 512 (default: the version's).")
    ] = None,
    every_n: Annotated[
        int, typer.Option(help="Detect on every N-th frame only (faster, interpolated).")
    ] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Analyse only the first N frames.")] = None,
) -> None:
    """Detect, track and choose faces; report tracks and the frames that would pass through."""
    from latentdub.face import analyze_video, select_face
    from latentdub.face.selection import parse_policy
    from latentdub.weights.resolve import RESOLUTIONS

    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    resolution = RESOLUTIONS[version] if resolution is None else resolution
    if resolution not in (256, 512):
        raise InputError(f"--resolution must be 256 or 512, got {resolution}")
    if every_n < 1:
        raise InputError(f"--every-n must be at least 1, got {every_n}")
    if max_frames is not None and max_frames < 2:
        raise InputError(f"--max-frames must be at least 2, got {max_frames}")
    parse_policy(face)  # fail before decoding anything
    if preview is not None and not preview.parent.exists():
        raise InputError(f"--preview {preview}: the folder {preview.parent} does not exist")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with frame_bars(10, json_out=json_out) as bar:
        task = bar.add_task("faces", total=None)

        def on_frame(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        analysis = analyze_video(video, every_n=every_n, max_frames=max_frames, progress=on_frame)
        selection = select_face(analysis, face, resolution=resolution)
        if preview is not None:
            from latentdub.face.preview import render_preview

            ptask = bar.add_task("preview", total=analysis.num_frames)
            render_preview(
                analysis,
                selection,
                preview,
                progress=lambda d, t: bar.update(ptask, completed=d, total=t),
            )

    summary: dict[str, Any] = analysis.to_dict()
    summary.update(selection.to_dict())
    if preview is not None:
        summary["preview"] = str(preview)
    if json_out:
        print(json.dumps(summary))
        return
    _print_summary(summary)


def _print_summary(s: dict[str, Any]) -> None:
    head = Table(show_header=False, box=None)
    head.add_row("video", s["path"])
    head.add_row(
        "frames",
        f"{s['frames']} at {s['fps']:.3f} fps ({s['duration_s']:.2f} s), {s['width']}x{s['height']}",
    )
    head.add_row(
        "with a face",
        f"{s['frames_with_face']} frames ({100 * s['frames_with_face'] / max(s['frames'], 1):.1f} %)",
    )
    head.add_row("scene cuts", ", ".join(str(c) for c in s["scene_cuts"]) or "none")
    sel = s["selected_track"]
    head.add_row(
        "selected",
        f"policy {s['policy']}: track {sel}"
        if sel is not None
        else f"policy {s['policy']}: no face",
    )
    head.add_row("dubbed", f"{s['frames_selected']} frames at {s['resolution']} px")
    if s.get("preview"):
        head.add_row("preview", s["preview"])
    console.print(head)
    if s["tracks"]:
        table = Table(title="tracks")
        for col in ("id", "frames", "first", "last", "coverage", "size px", "|yaw|°", "score"):
            table.add_column(col, justify="right")
        for t in s["tracks"]:
            table.add_row(
                str(t["id"]), str(t["frames"]), str(t["first_frame"]), str(t["last_frame"]),
                f"{100 * t['coverage']:.1f} %", f"{t['mean_size']:.0f}", f"{t['median_abs_yaw']:.0f}", f"{t['mean_score']:.2f}",
            )  # fmt: skip
        console.print(table)
    if s["passthrough_ranges"]:
        table = Table(title="pass-through (left untouched)")
        for col in ("frames", "time s", "reason"):
            table.add_column(col)
        for r in s["passthrough_ranges"]:
            table.add_row(
                f"{r['start_frame']}–{r['end_frame'] - 1}",
                f"{r['start_s']:.2f}–{r['end_s']:.2f}",
                r["reason"],
            )
        console.print(table)
