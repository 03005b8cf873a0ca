"""``latentdub doctor``: what this machine can do, and what a dub on it would cost."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console

# What latentdub needs from FFmpeg: libx264 + aac to write the output; decoders for the inputs
# people actually bring (phones: h264/hevc + aac; older files: mpeg4, mp3).
ENCODERS = ("libx264", "aac")
DECODERS = ("h264", "hevc", "mpeg4", "aac", "mp3")


def codec_usable(name: str, mode: str) -> bool:
    """Whether PyAV can really create a ``mode`` ("w" encode / "r" decode) context for ``name``.

    Listed in ``av.codecs_available`` is not enough: a codec can be listed but built without
    an encoder (e.g. an FFmpeg without libx264 still knows h264 as a decoder).
    """
    import av

    try:
        av.CodecContext.create(name, mode)
    except Exception:  # any failure means "not usable here", which is what we report
        return False
    return True


def accelerators() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps_available": mps,
    }


def _resolution(entry: dict[str, Any]) -> int | None:
    """Face resolution of a weights entry: the folder's latentdub.json, else the version's."""
    from latentdub.weights.resolve import RESOLUTIONS, read_folder_config

    if entry.get("where") == "folder":
        try:
            res = read_folder_config(Path(entry["location"])).get("resolution")
        except Exception:
            res = None
        if isinstance(res, int):
            return res
    return RESOLUTIONS.get(str(entry.get("version")))


def real_versions(weights: list[dict[str, Any]]) -> dict[str, int]:
    """Version → face resolution for every *real*, complete set of weights present.

    Random tiny models are left out: they are smoke models that run in seconds, and the
    measured costs in :mod:`latentdub.estimate` are those of the full-size network.
    """
    out: dict[str, int] = {}
    for entry in weights:
        if not entry.get("complete") or entry.get("random_weights") or not entry.get("version"):
            continue
        res = _resolution(entry)
        if res is not None:
            out[str(entry["version"])] = res
    return out


@app.command("doctor")
def doctor(
    weights: Annotated[Path | None, typer.Option(help="Also check this local weights folder.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Report Python, torch, GPUs, codecs, face models, which weights are present and CPU cost."""
    import av
    import torch

    from latentdub.estimate import cpu_seconds_per_video_second, cpu_warning

    accel = accelerators()
    threads = torch.get_num_threads()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **accel,
        "torch_threads": threads,
        "pyav": av.__version__,
        "codecs": {
            "encode": {name: codec_usable(name, "w") for name in ENCODERS},
            "decode": {name: codec_usable(name, "r") for name in DECODERS},
        },
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

    cpu_only = not (accel["cuda_available"] or accel["mps_available"])
    found = report["weights"] if isinstance(report["weights"], list) else []
    # Only on a CPU-only machine: with a GPU the user can pick it, and the numbers don't apply.
    versions = real_versions(found) if cpu_only else {}
    report["cpu_estimate_s_per_video_s"] = {
        version: round(cpu_seconds_per_video_second(res, threads=threads), 1)
        for version, res in versions.items()
    }
    warnings = [f"LatentSync {version}: {cpu_warning(res, threads=threads)}" for version, res in versions.items()]
    report["warnings"] = warnings

    if json_out:
        print(json.dumps(report, default=str))
        return
    table = Table(title="latentdub doctor", show_header=False)
    for key, value in report.items():
        if key not in ("weights", "warnings", "cpu_estimate_s_per_video_s"):
            table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict | list) else str(value))
    console.print(table)
    weights_rows = report["weights"]
    if not isinstance(weights_rows, list):
        console.print(f"weights: {weights_rows}")
    else:
        wt = Table(title="weights")
        for col in ("version", "where", "location", "complete", "converted", "random", "eval syncnet"):
            wt.add_column(col)
        for row in weights_rows:
            wt.add_row(str(row.get("version")), str(row.get("where")), str(row.get("location")),
                       "yes" if row.get("complete") else "no", "yes" if row.get("converted") else "no",
                       "[yellow]RANDOM[/]" if row.get("random_weights") else "",
                       "yes" if row.get("syncnet") else "no")
        console.print(wt)
    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    if cpu_only and not versions:
        # No real weights yet, but `dub` would fetch them: say what that would cost here.
        from latentdub.weights.resolve import DEFAULT_VERSION, RESOLUTIONS

        line = cpu_warning(RESOLUTIONS[DEFAULT_VERSION], threads=threads)
        console.print(f"note: no real weights found; once downloaded, LatentSync {DEFAULT_VERSION}: {line}",
                      highlight=False, soft_wrap=True)
