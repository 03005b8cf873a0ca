"""``latentdub eval VIDEO``: lip-sync scores (LSE-C / LSE-D, AV offset) and fidelity to the original.

The work is :func:`latentdub.evaluation.evaluate`; this module picks the SyncNet (``--syncnet
FILE``, else ``DIR/auxiliary/syncnet_v2.model`` of ``--weights``, else the Hugging Face cache of
the ``--version``'s repo, downloaded on first use), prints the result and writes the report.

Without a SyncNet the fidelity metrics still run when ``--original`` is given (exit 0, with a
note on stderr, also with ``--json``, that the sync scores are skipped and how to get the model);
with neither it is an error (exit 2) that says how to get it. A random (``make-tiny``) SyncNet
gets a warning on stderr that its scores are meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentdub.cli._app import app, console, console_err, frame_bars, show_library_warnings
from latentdub.errors import InputError, WeightsError

_STAGES = {"faces": "faces (video)", "faces (original)": "faces (original)", "score": "scoring"}


def _note_missing(version: str) -> None:
    """One stderr line when there is no SyncNet (also with --json, whose object says why in full)."""
    from latentdub.weights.resolve import HUB_REPOS

    console_err.print(
        "[yellow]note:[/] no SyncNet weights, so LSE-C / LSE-D are skipped (fidelity only); get "
        f"auxiliary/syncnet_v2.model from the {HUB_REPOS[version]} hub repo (`latentdub weights "
        f"download --version {version} --syncnet`), or pass --weights DIR / --syncnet FILE.",
        highlight=False,
        soft_wrap=True,
    )


def _resolution(version: str, weights: Path | None) -> int:
    """The dub's face crop size: the weights folder's recorded one, else the version's."""
    from latentdub.weights.resolve import RESOLUTIONS, read_folder_config

    if weights is not None and weights.is_dir():
        res = read_folder_config(weights).get("resolution")
        if isinstance(res, int):
            return res
    return RESOLUTIONS[version]


def _load_syncnet(
    version: str, weights: Path | None, syncnet: Path | None, device: Any, have_original: bool
) -> tuple[Any, dict[str, Any] | None, str | None]:
    """(model or None, file info, why it is missing). A missing model is an error only when
    there is nothing else to do (no --original)."""
    from latentdub.weights.resolve import SyncNetFile, resolve_syncnet
    from latentdub.weights.syncnet import load_syncnet, read_syncnet_sidecar

    if syncnet is not None:
        if not syncnet.is_file():
            raise InputError(f"--syncnet {syncnet}: no such file (give the path of syncnet_v2.model)")
        found = SyncNetFile(
            syncnet.resolve(), "--syncnet", bool(read_syncnet_sidecar(syncnet).get("random_weights", False))
        )
    else:
        try:
            found = resolve_syncnet(version, weights)
        except WeightsError as err:
            if not have_original:
                raise WeightsError(
                    f"{err}\nWith --original ORIGINAL, eval still measures the fidelity to the "
                    "original without the SyncNet."
                ) from None
            return None, None, str(err)
    model = load_syncnet(found.path, device=device)  # a random one says so on stderr (the log)
    return model, found.to_dict(), None


@app.command("eval")
def eval_cmd(
    video: Annotated[Path, typer.Argument(help="The video to evaluate (a dub, or any video of a person speaking).")],
    audio: Annotated[
        Path | None,
        typer.Option(help="The speech to score the lips against (any audio or video file). Default: VIDEO's own audio track."),
    ] = None,
    original: Annotated[
        Path | None,
        typer.Option(help="The video VIDEO was dubbed from: PSNR/SSIM outside the blend region and in the face box, mouth flicker."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML report (plots, numbers, mouth strip) here.")
    ] = None,
    version: Annotated[
        str, typer.Option(help="1.5 or 1.6: the hub repo the SyncNet comes from and the dub's face crop size (256/512 px).")
    ] = "1.6",
    weights: Annotated[
        Path | None,
        typer.Option("--weights", "--weights-dir",
                     help="Local weights folder: its auxiliary/syncnet_v2.model (official layout; make-tiny writes a random one)."),
    ] = None,
    syncnet: Annotated[Path | None, typer.Option(help="A syncnet_v2.model file to use as is.")] = None,
    face: Annotated[str, typer.Option(help="Which face, as for dub: largest, X,Y@T (pixel at T s), or track:N.")] = "largest",
    min_track: Annotated[
        int, typer.Option(help="Shortest stretch of one face that is scored, in frames at 25 fps (official eval: 50).")
    ] = 50,
    device: Annotated[str, typer.Option(help="Where SyncNet runs: cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Score lip sync (LSE-C / LSE-D / AV offset, classic SyncNet) and fidelity to --original."""
    from latentdub.devices import parse_device
    from latentdub.evaluation import evaluate
    from latentdub.evaluation.report import write_report

    show_library_warnings()
    _check_args(video, audio, original, report, version, weights, face, min_track)
    torch_device = parse_device(device, flag="--device")
    resolution = _resolution(version, weights)

    model, info, missing = _load_syncnet(version, weights, syncnet, torch_device, original is not None)
    if missing:
        _note_missing(version)

    with frame_bars(17, json_out=json_out) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = evaluate(
            video,
            audio=audio,
            original=original,
            syncnet=model,
            syncnet_info=info,
            sync_missing=missing,
            resolution=resolution,
            face=face,
            min_track=min_track,
            progress=on_progress,
        )

    summary = result.to_dict()
    if report is not None:
        write_report(result, report)
        summary["report"] = str(report)
    if json_out:
        print(json.dumps(summary))
        return
    _print(summary)


def _check_args(
    video: Path, audio: Path | None, original: Path | None, report: Path | None,
    version: str, weights: Path | None, face: str, min_track: int,
) -> None:
    """Every input check, before any model loads or any download starts."""
    from latentdub.face.selection import parse_policy
    from latentdub.files import check_input_file, check_output
    from latentdub.media.reader import check_video, probe_video

    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    if min_track < 6:
        raise InputError(f"--min-track must be at least 6 frames (one 0.2 s window + 1), got {min_track}")
    parse_policy(face)
    if report is not None:
        check_output(report, extensions=(".html", ".htm"), what="--report")
    if weights is not None and not weights.is_dir():
        what = "does not exist" if not weights.exists() else "is not a folder"
        raise InputError(f"--weights {weights} {what}; give the weights folder (official layout)")
    check_video(probe_video(video), video)
    if original is not None:
        check_video(probe_video(original), original)
    if audio is not None:
        check_input_file(audio, "audio or video")


def _f(value: Any, digits: int = 3, unit: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def _print(s: dict[str, Any]) -> None:
    if s["random_weights"]:
        console.print(f"[bold white on red] {s['warning']} [/]", highlight=False, soft_wrap=True)
    table = Table(show_header=False, box=None)
    table.add_row("video", f"{s['video']}  [dim]({s['width']}x{s['height']}, {s['frames']} frames, "
                           f"{s['fps']:.3f} fps, {s['duration_s']:.2f} s)[/]")
    sync = s["sync"]
    if sync is None:
        table.add_row("lip sync", "[yellow]not scored[/] (see below)")
    else:
        random = " [bold red](RANDOM WEIGHTS: meaningless)[/]" if s["random_weights"] else ""
        table.add_row("audio", str(s["audio"]))
        table.add_row("LSE-C", f"{_f(s['lse_c'])}  [dim](confidence, higher is better)[/]{random}")
        table.add_row("LSE-D", f"{_f(s['lse_d'])}  [dim](distance, lower is better)[/]{random}")
        table.add_row("AV offset", f"{s['offset']:+d} frames ({s['offset'] * 40:+d} ms){random}")
        table.add_row("scored", f"{sync['windows']} windows in {len(sync['segments'])} face stretch(es) "
                                f"({s['frames_25fps']} frames at 25 fps)")
        if s["syncnet"]:
            table.add_row("SyncNet", f"{s['syncnet']['path']}  [dim]({s['syncnet']['source']})[/]")
    fid = s["fidelity"]
    if fid is not None:
        table.add_row("original", str(s["original"]))
        margin = fid.get("region_margin_px", 0)
        table.add_row("outside mouth", f"PSNR {_f(fid['psnr_outside'], 2, ' dB')}, SSIM {_f(fid['ssim_outside'], 4)}"
                                       f"  [dim](blend region + {margin} px excluded)[/]")
        table.add_row("face box", f"PSNR {_f(fid['psnr_face'], 2, ' dB')}, SSIM {_f(fid['ssim_face'], 4)}")
        table.add_row("mouth flicker", f"dub {_f(fid['flicker_dub'])}, original {_f(fid['flicker_original'])}, "
                                       f"ratio {_f(fid['flicker_ratio'])}")
        table.add_row("compared", f"{fid['frames']} frames")
    if s.get("report"):
        table.add_row("report", s["report"])
    console.print(table)
    if sync is None and s["sync_missing"]:
        console.print(f"[yellow]lip sync not scored:[/] {s['sync_missing']}", highlight=False, soft_wrap=True)
    for note in s["notes"]:
        if note == s.get("warning"):
            continue
        console.print(f"[dim]note:[/] {note}", highlight=False, soft_wrap=True)
