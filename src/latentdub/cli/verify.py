"""``latentdub verify FILE``: is this video marked as AI-generated, by whom, and can we say so?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from latentdub.cli._app import app, console

_COLOURS = {"marked": "green", "ai_marker": "yellow", "copied_mark": "red", "tampered": "red", "not_found": "default"}


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="The video to check.")],
    max_frames: Annotated[int, typer.Option(help="Frames to sample for the watermark (spread over the file).")] = 150,
    trust: Annotated[
        Path | None, typer.Option(help="A CA certificate (PEM) to trust, e.g. the ca.pem of `keys init-signing`.")
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="The secret watermark key file to read the mark with (default: this "
                     "deployment's, the data folder's watermark.key)."),
    ] = None,
    audit: Annotated[
        Path | None,
        typer.Option("--audit", help="The audit log (a .jsonl file, or a folder of per-machine chains) whose "
                     "fingerprints tell a copied mark from the job's output (default: the data folder's audit.jsonl)."),
    ] = None,
    segment_s: Annotated[float, typer.Option("--segment-s", help="Seconds per window of the per-segment scan.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Look for latentdub's invisible watermark (per time segment) and for C2PA content credentials.

    Exit code 0 when the file is marked as AI-generated (watermark or credentials), 1 when not
    (no mark, a copied mark, a tampered one).
    """
    from latentdub.errors import InputError
    from latentdub.files import check_input_file
    from latentdub.provenance.audit import chain_paths, default_log_path
    from latentdub.provenance.verify import verify_file
    from latentdub.provenance.watermark_key import existing_key, load_key

    check_input_file(file, "video")
    if max_frames < 1:
        raise InputError(f"--max-frames must be at least 1, got {max_frames}")
    if not 0.2 <= segment_s <= 3600:
        raise InputError(f"--segment-s must be from 0.2 to 3600 seconds, got {segment_s}")
    secret = load_key(key) if key is not None else existing_key()
    if audit is None:
        audits = [default_log_path()]
    else:
        audits = chain_paths(audit) if audit.is_dir() else [audit]
    report = verify_file(file, key=secret, key_source="file" if key is not None else "deployment", trust=trust,
                         audit_paths=audits, max_frames=max_frames, segment_s=segment_s).to_dict()
    if json_out:
        print(json.dumps(report, default=str))
    else:
        _print(report)
    raise typer.Exit(0 if report["marked"] else 1)


def _print(report: dict[str, Any]) -> None:
    wm, c2, key = report["watermark"], report.get("c2pa") or {}, report["key"]
    table = Table(show_header=False, box=None)
    table.add_row("file", escape(report["file"]))
    colour = _COLOURS.get(report["status"], "default")
    table.add_row("status", f"[{colour}]{report['status'].replace('_', ' ').upper()}[/]: {escape(report['status_text'])}")
    key_text = f"{key['source']} key {key['id']}"
    if key.get("public"):
        key_text += f" — [yellow]{escape(key['note'])}[/]"
    table.add_row("key", key_text)
    if wm.get("found"):
        acc = wm.get("bit_accuracy")
        detail = f", bit accuracy {acc:.3f}" if acc is not None else ""
        table.add_row("watermark", f"job {wm.get('job_id_hex')}{detail}")
    table.add_row("", f"{wm.get('frames_checked')} frames checked, score {wm.get('score', 0):.2f}")
    for seg in report["segments"]:
        what = seg["status"].replace("_", " ")
        if seg["job_id_hex"]:
            what += f" job {seg['job_id_hex']}"
        content = seg.get("content") or {}
        if content.get("match") is True:
            what += " (picture matches the job's output)"
        elif content.get("match") is False:
            what += " (picture is NOT the job's output)"
        table.add_row("", f"{seg['start_s']:7.2f}–{seg['end_s']:7.2f} s  {what}  (score {seg['score']:.1f})")
    for job, check in (report.get("copy_check") or {}).items():
        if check.get("match") is None:
            table.add_row("fingerprint", f"job {job}: not checked ({escape(str(check.get('reason')))})")
        else:
            word = "matches" if check["match"] else "[red]does NOT match[/]"
            table.add_row("fingerprint", f"job {job}: the picture {word} the job's output (score {check['score']:.2f})")
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
            table.add_row("", escape(f"model {model.get('name') or model.get('version')}"
                          f"{' (RANDOM weights)' if model.get('random_weights') else ''}"))
            table.add_row("", escape(f"consent {dub.get('consent_id')}, watermark {'on' if dub.get('watermark') else 'OFF'}"))
        agreement = report["credentials"]["agreement"]
        table.add_row("", f"mark and credentials: {agreement.replace('_', ' ')}"
                      + ("" if agreement == "agree" else " [red](!)[/]"))
        for failure in c2.get("failures") or []:
            table.add_row("", escape(failure))
    att = report["attribution"]
    if att["claimed"]:
        job = f" ({escape(str(att['job']))})" if att.get("job") else ""
        table.add_row("made by", f"job {att['job_id_hex']}{job}: {escape(att['basis'])}")
    else:
        table.add_row("made by", f"not claimed: {escape(str(att.get('reason')))}")
    for note in report.get("notes") or []:
        table.add_row("note", escape(note))
    console.print(table)
