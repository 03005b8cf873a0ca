"""``latentdub audit …``: check and read the hash-chained log of dubs.

A local dub appends to ``audit.jsonl`` in the data folder; the service's workers each append to
their machine's own chain, ``<service folder>/audit/<host>.jsonl``: ``audit verify --dir`` (or
``--service-dir``) checks every chain of such a folder.
"""

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
        raise InputError(f"--log {path} is a folder; give the log file (audit.jsonl), or --dir for a folder of chains.")
    if path is not None and not path.exists():
        raise InputError(f"the audit log {path} does not exist.")
    return AuditLog(path)


DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="Check every chain (*.jsonl) of this folder, e.g. the service's audit/ (one per machine)."),
]
ServiceDirOpt = Annotated[
    Path | None,
    typer.Option("--service-dir", help="Check every chain of this service folder's audit/ (its workers' machines)."),
]


def _chains_folder(folder: Path | None, service_dir: Path | None, log: Path | None) -> Path | None:
    from latentdub.errors import InputError

    if sum(x is not None for x in (folder, service_dir, log)) > 1:
        raise InputError("give one of --log, --dir and --service-dir")
    if service_dir is not None:
        from latentdub.service.jobs import AUDIT_DIR

        if not service_dir.is_dir():
            raise InputError(f"the service folder {service_dir} does not exist.")
        folder = service_dir / AUDIT_DIR
        if not folder.is_dir():
            raise InputError(f"the service folder {service_dir} has no audit/ folder: no job was dubbed there yet.")
    elif folder is not None and not folder.is_dir():
        raise InputError(f"--dir {folder} is not a folder of audit chains.")
    return folder


@audit_app.command("verify")
def verify_cmd(
    log: LogOpt = None, folder: DirOpt = None, service_dir: ServiceDirOpt = None, json_out: JsonOpt = False
) -> None:
    """Check the chain (or every chain of a folder); exit 0 if intact, 1 if not (naming the first bad line)."""
    chains = _chains_folder(folder, service_dir, log)
    if chains is not None:
        _verify_folder(chains, json_out)
        return
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


def _verify_folder(folder: Path, json_out: bool) -> None:
    from latentdub.errors import InputError
    from latentdub.provenance.audit import verify_chains

    result = verify_chains(folder)
    if not result.chains:
        raise InputError(f"{folder} holds no audit chain (*.jsonl).")
    if json_out:
        print(json.dumps(result.to_dict()))
    else:
        for chain in result.chains:
            name = Path(chain.path).name
            for warning in chain.warnings:
                console_err.print(f"[bold yellow]warning:[/] {name}: {warning}", highlight=False, soft_wrap=True)
            if chain.ok:
                replaced = f", {chain.superseded} superseded" if chain.superseded else ""
                console.print(f"ok      {name}: {chain.entries} entries, {chain.jobs} jobs{replaced}",
                              highlight=False, markup=False, soft_wrap=True)  # fmt: skip
            else:
                console.print(f"[bold red]BROKEN[/]  {name} at line {chain.first_bad_line}: {chain.reason}",
                              highlight=False, soft_wrap=True)  # fmt: skip
        for problem in result.problems:
            console.print(f"[bold red]BROKEN[/]  {problem}", highlight=False, soft_wrap=True)
        verdict = "all intact" if result.ok else "NOT intact"
        console.print(
            f"{len(result.chains)} chains, {result.entries} entries, {result.jobs} jobs: {verdict} ({folder})",
            highlight=False, markup=False, soft_wrap=True,
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
