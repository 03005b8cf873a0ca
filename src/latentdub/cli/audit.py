"""``latentdub audit …``: check and read the hash-chained log of dubs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from latentdub.cli._app import app, console, console_err

if TYPE_CHECKING:
    from latentdub.provenance.audit import AuditLog

audit_app = typer.Typer(help="The audit log of dubs (hash-chained, append-only).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

LogOpt = Annotated[
    Path | None, typer.Option("--log", help="Audit log file (default: audit.jsonl in the latentdub data folder).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _log(path: Path | None) -> AuditLog:
    from latentdub.errors import InputError
    from latentdub.provenance.audit import AuditLog

    if path is not None and path.is_dir():
        raise InputError(f"--log {path} is a folder; give the log file (audit.jsonl).")
    if path is not None and not path.exists():
        raise InputError(f"the audit log {path} does not exist.")
    return AuditLog(path)


@audit_app.command("verify")
def verify_cmd(log: LogOpt = None, json_out: JsonOpt = False) -> None:
    """Check the chain; exit 0 if intact, 1 if not (naming the first bad line)."""
    result = _log(log).verify()
    if json_out:
        print(json.dumps(result.to_dict()))
    else:
        for warning in result.warnings:
            console_err.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        if result.ok:
            console.print(f"ok: {result.entries} entries, chain intact ({result.path})", highlight=False)
        else:
            console.print(
                f"[bold red]BROKEN[/] at line {result.first_bad_line} of {result.path}: {result.reason}",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("show")
def show_cmd(
    log: LogOpt = None,
    json_out: JsonOpt = False,
    last: Annotated[int, typer.Option("--last", min=0, help="Show only the newest N entries (0: all).")] = 20,
) -> None:
    """List the logged dubs (newest last). Does not check the chain: use `audit verify`."""
    entries = list(_log(log).entries())
    if last:
        entries = entries[-last:]
    if json_out:
        print(json.dumps(entries))
        return
    table = Table(title=f"audit log ({len(entries)} shown)")
    for col in ("seq", "time", "event", "consent", "model", "output sha256"):
        table.add_column(col)
    for e in entries:
        model = e.get("model") if isinstance(e.get("model"), dict) else {}
        output = e.get("output") if isinstance(e.get("output"), dict) else {}
        table.add_row(
            str(e.get("seq")), str(e.get("time", ""))[:19], str(e.get("event", "")), str(e.get("consent_id") or "-"),
            str(model.get("name") or "-"), str(output.get("sha256") or "-")[:16],
        )  # fmt: skip
    console.print(table)
