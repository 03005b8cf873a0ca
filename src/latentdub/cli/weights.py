"""``latentdub weights …``: download, convert, make-tiny, list and info."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console, console_err
from latentdub.errors import InputError

weights_app = typer.Typer(
    help=(
        "Model weights: download LatentSync 1.5 / 1.6 (+ Whisper tiny and the SD VAE), convert "
        "them to fp16 safetensors, make a tiny random model for tests, show what is present."
    ),
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

VersionOpt = Annotated[str, typer.Option("--version", "-v", help="LatentSync version: 1.5 or 1.6.")]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _file_size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return None


def _files_table(files: Any) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("model", files.label)
    table.add_row("version", files.version)
    table.add_row("source", files.source)
    table.add_row("resolution", f"{files.resolution} px")
    rows = [
        ("unet", files.unet),
        ("unet fp16", files.unet_fp16 if files.unet_fp16 != files.unet else None),
        ("whisper", files.whisper),
        ("whisper fp16", files.whisper_fp16 if files.whisper_fp16 != files.whisper else None),
        ("vae", files.vae_dir),
    ]
    for label, path in rows:
        if path is not None:
            table.add_row(label, f"{path}  [dim]({_size(_file_size(path))})[/]")
    if files.random_weights:
        table.add_row("[bold yellow]note[/]", "RANDOM WEIGHTS (smoke-test model), not a real model")
    return table


@weights_app.command("download")
def download(
    version: VersionOpt = "1.6",
    dir: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Download into this folder in the official layout (use it with --weights "
            "DIR). Default: the Hugging Face cache.",
        ),
    ] = None,
    syncnet: Annotated[
        bool,
        typer.Option(
            "--syncnet", help="Also fetch the evaluation SyncNet (auxiliary/syncnet_v2.model, "
            "55 MB) that `latentdub eval` scores lip sync with."
        ),
    ] = False,
) -> None:
    """Download the UNet, Whisper tiny and the VAE (resumable; HF_TOKEN and HF_HOME honoured)."""
    from latentdub.weights import download_weights

    files = download_weights(version, dir, syncnet=syncnet)
    table = _files_table(files)
    if syncnet:
        from latentdub.weights import resolve_syncnet

        sync = resolve_syncnet(files.version, dir, download=False)
        table.add_row("syncnet", f"{sync.path}  [dim]({_size(_file_size(sync.path))})[/]")
    console.print(table)
    if dir is not None:
        console.print(f"Use it with: latentdub dub … --weights {dir} --version {files.version}")


@weights_app.command("convert")
def convert(
    dir: Annotated[Path, typer.Argument(help="A local weights folder in the official layout.")],
    force: Annotated[bool, typer.Option(help="Convert again even if up to date.")] = False,
) -> None:
    """Write fp16 safetensors next to the official files; loading then prefers them."""
    from latentdub.weights import convert_weights

    start = time.perf_counter()
    done = convert_weights(dir, force=force)
    table = Table("file", "from", "size", "status")
    for c in done:
        table.add_row(
            str(c.target),
            f"{c.source.name} ({_size(c.source_bytes)})",
            _size(c.target_bytes),
            "written" if c.written else "up to date",
        )
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f} s")


@weights_app.command("make-tiny")
def make_tiny_cmd(
    dir: Annotated[Path, typer.Argument(help="Folder to create (must be empty or absent).")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny RANDOM model in the official layout (for tests and smoke runs only)."""
    from latentdub.weights import make_tiny
    from latentdub.weights.resolve import read_folder_config

    if dir.exists() and not dir.is_dir():
        raise InputError(f"{dir} is a file; give a folder to create.")
    if dir.is_dir() and any(dir.iterdir()) and not read_folder_config(dir).get("random_weights"):
        raise InputError(
            f"{dir} is not empty; make-tiny only writes into an empty folder (or over an "
            "earlier tiny model)."
        )
    make_tiny(dir, seed=seed)
    console.print(
        f"Wrote a tiny RANDOM model to {dir} (seed {seed}). It is for tests and smoke runs "
        f"only; its output is not a dub. Use it with --weights {dir}."
    )


@weights_app.command("list")
def list_cmd(
    weights: Annotated[
        Path | None, typer.Option("--weights", "--dir", help="Also check this local folder.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show which weights are present (HF cache and an optional folder); downloads nothing."""
    from latentdub.weights import weights_status

    entries = weights_status(weights)
    if json_out:
        print(json.dumps(entries))
        return
    table = Table("version", "where", "unet", "whisper", "vae", "syncnet", "status")
    for e in entries:
        if e["complete"]:
            status = "[green]complete[/]"
            if e["converted"]:
                status += " (fp16 safetensors)"
            if e["random_weights"]:
                status += " [yellow]RANDOM[/]"
        else:
            status = "[red]incomplete[/]" if any(e[k] for k in ("unet", "whisper")) else "absent"
        table.add_row(
            str(e["version"] or "?"),
            f"{e['where']}: {e['location']}",
            *("yes" if e.get(k) else "-" for k in ("unet", "whisper", "vae", "syncnet")),
            status,
        )
    console.print(table)
    for e in entries:
        if e["error"] and e["where"] == "folder":
            console_err.print(f"[yellow]{e['location']}:[/] {e['error']}", highlight=False)


@weights_app.command("info")
def info(
    version: Annotated[
        str | None, typer.Option("--version", "-v", help="1.5 or 1.6 (default: 1.6).")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", "--dir", help="Local weights folder.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Resolve a version without downloading and describe its files and UNet checkpoint."""
    from latentdub.weights import resolve_weights
    from latentdub.weights.loading import inspect_unet_file

    files = resolve_weights(
        version if version or weights is not None else "1.6", weights, download=False
    )
    unet = inspect_unet_file(files.unet)  # the official file (or the converted one alone)
    if json_out:
        print(json.dumps({**files.to_dict(), "unet_checkpoint": unet}, default=str))
        return
    table = _files_table(files)
    table.add_row(
        "unet checkpoint",
        f"{unet['keys']} keys, {unet['parameters']:,} values, {'/'.join(unet['dtypes'])}, "
        f"layout {unet['layout']}"
        + (f", global_step {unet['global_step']}" if unet["global_step"] is not None else ""),
    )
    console.print(table)
    if unet["layout"] == "1.5/1.6":
        console.print(
            "[dim]1.5 and 1.6 checkpoints have the same layout; the version (and the face "
            "resolution) is taken from --version or the folder's latentdub.json.[/]"
        )
