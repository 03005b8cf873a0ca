"""``latentdub verify FILE``: is this video marked as AI-generated, and by whom?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="The video to check.")],
    max_frames: Annotated[int, typer.Option(help="Frames to sample for the watermark (spread over the file).")] = 150,
    trust: Annotated[
        Path | None, typer.Option(help="A CA certificate (PEM) to trust, e.g. the ca.pem of `keys init-signing`.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Look for latentdub's invisible watermark and for C2PA content credentials.

    Exit code 0 when either mark is found, 1 when none is.
    """
    from latentdub.errors import InputError
    from latentdub.files import check_input_file
    from latentdub.provenance.c2pa import read_credentials
    from latentdub.provenance.watermark import detect_file

    check_input_file(file, "video")
    if max_frames < 1:
        raise InputError(f"--max-frames must be at least 1, got {max_frames}")
    mark = detect_file(file, max_frames=max_frames)
    creds = read_credentials(file, trust_anchors=trust)
    report: dict[str, Any] = {"file": str(file), "watermark": mark.to_dict(), "c2pa": creds.to_dict()}
    found = bool(mark.found or creds.present)
    report["marked"] = found
    if json_out:
        print(json.dumps(report, default=str))
    else:
        _print(report)
    raise typer.Exit(0 if found else 1)


def _print(report: dict[str, Any]) -> None:
    wm, c2 = report["watermark"], report["c2pa"]
    table = Table(show_header=False, box=None)
    table.add_row("file", report["file"])
    if wm.get("found"):
        acc = wm.get("bit_accuracy")
        detail = f", bit accuracy {acc:.3f}" if acc is not None else ""
        table.add_row("watermark", f"[green]found[/]: AI-generated, job {wm.get('job_id_hex')}{detail}")
    else:
        table.add_row("watermark", "not found")
    table.add_row("", f"{wm.get('frames_checked')} frames checked, score {wm.get('score', 0):.2f}")
    if not c2.get("present"):
        table.add_row("credentials", "none")
    else:
        state = "[green]valid[/]" if c2.get("valid") else "[red]INVALID[/]"
        trust = "trusted signer" if c2.get("trusted") else "signer not in a trust list"
        table.add_row("credentials", f"{state} ({trust})")
        claims = c2.get("claims") or {}
        if claims.get("ai_edited"):
            table.add_row("", "says: altered by an AI model")
        dub = claims.get("latentdub") or {}
        if dub:
            model = dub.get("model") or {}
            table.add_row("", f"model {model.get('name') or model.get('version')}"
                          f"{' (RANDOM weights)' if model.get('random_weights') else ''}")
            table.add_row("", f"consent {dub.get('consent_id')}, watermark {'on' if dub.get('watermark') else 'OFF'}")
        for failure in c2.get("failures") or []:
            table.add_row("", failure)
    console.print(table)
