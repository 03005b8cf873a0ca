"""The ``latentdub eval --report`` page: one self-contained HTML file, no JavaScript.

Everything is inside the file: the plots are matplotlib PNGs (Agg, no pyplot state, so it is
safe in threads and servers) and the mouth crops are PNGs, all embedded as ``data:`` URIs; the
style sheet is inline. It opens from a mail attachment or a shared folder the same as locally.

Sections: the files and the model (a red banner when the SyncNet weights are random); the
lip-sync scores with the per-frame distance over time and the distance-per-offset curve (its
minimum is the AV offset, median − minimum the confidence LSE-C); the fidelity numbers; the
strip of mouth crops (original | dubbed) every second; notes.

:func:`write_report` writes atomically (:func:`latentdub.files.atomic_write`): a temporary file
in the same folder, renamed into place only when complete, so a failure never leaves a
half-written report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentdub.evaluation import EvalResult, SyncResult

__all__ = ["offset_plot", "per_frame_plot", "render_report", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1d1d1f;background:#fff;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;text-align:left;vertical-align:middle}
table.kv td:first-child{color:#555}table.num td:nth-child(n+2){text-align:right;font-variant-numeric:tabular-nums}
table.strip td{padding:3px;text-align:center}table.strip img{display:block;height:112px}
.banner{background:#b00020;color:#fff;padding:12px 16px;font-weight:bold;font-size:1.1em;border-radius:4px}
.missing{background:#fff4e5;border:1px solid #f0a020;padding:10px 14px;border-radius:4px}
.muted{color:#666;font-size:.9em}img.plot{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _png_figure(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def per_frame_plot(sync: SyncResult, fps: int = 25) -> bytes:
    """PNG: the SyncNet distance of each window (at the best offset) over time."""
    import numpy as np
    from matplotlib.figure import Figure

    values = np.array([np.nan if v is None else v for v in sync.per_frame_distance], dtype=float)
    t = np.arange(len(values)) / fps
    fig = Figure(figsize=(10, 3.2))
    ax = fig.add_subplot()
    ax.plot(t, values, lw=1.2, color="#1f5fbf", label="distance at the clip's best offset")
    ax.axhline(sync.lse_d, color="#b00020", lw=1, ls="--", label=f"LSE-D {sync.lse_d:.3f}")
    for seg in sync.segments:
        ax.axvspan(seg.start_s, seg.end_s, color="#1f5fbf", alpha=0.06)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("audio-visual distance")
    ax.set_xlim(0, max(t[-1] if len(t) else 1.0, 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Per-frame sync distance (lower is better; shaded: scored face stretches)", fontsize=10)
    return _png_figure(fig)


def offset_plot(sync: SyncResult) -> bytes:
    """PNG: mean distance per AV offset; the minimum is the offset, median − minimum is LSE-C."""
    import numpy as np
    from matplotlib.figure import Figure

    offsets = np.array(sync.offsets)
    dist = np.array(sync.offset_distances)
    median = float(np.median(dist))
    fig = Figure(figsize=(10, 3.2))
    ax = fig.add_subplot()
    ax.plot(offsets, dist, marker="o", ms=3, lw=1.2, color="#1f5fbf")
    ax.axhline(median, color="#888", lw=1, ls=":", label=f"median {median:.3f}")
    best = int(np.argmin(dist))
    ax.plot([offsets[best]], [dist[best]], "o", color="#b00020", ms=8,
            label=f"offset {sync.offset:+d} frames, LSE-D {sync.lse_d:.3f}, LSE-C {sync.lse_c:.3f}")
    ax.axvline(0, color="#2a8a2a", lw=1, alpha=0.6)
    ax.set_xlabel("AV offset (frames at 25 fps; positive: the video lags the audio)")
    ax.set_ylabel("mean distance")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Distance per offset (a correct dub has its minimum at 0)", fontsize=10)
    return _png_figure(fig)


def _img(data: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _fmt(value: Any, digits: int = 3, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _kv(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def render_report(result: EvalResult) -> str:
    """The report as one HTML string (see the module docstring)."""
    d = result.to_dict()
    parts = _head(result, d)
    parts += _sync_section(result)
    parts += _fidelity_section(d["fidelity"])
    parts += _strip_section(result)
    if result.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _head(result: EvalResult, d: dict[str, Any]) -> list[str]:
    """Title, the random-weights banner and the files."""
    from latentdub import __version__

    e = html.escape
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>latentdub eval: {e(Path(result.video).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Dub evaluation: {e(Path(result.video).name)}</h1>",
        f'<p class="muted">latentdub {e(__version__)}, '
        f"{e(_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'))}</p>",
    ]
    if result.random_weights:
        parts.append(f'<p class="banner" id="random-weights">{e(d.get("warning", ""))}</p>')

    files = [
        ("video", f"<code>{e(result.video)}</code> — {result.width}x{result.height}, "
                  f"{result.frames} frames, {result.fps:.3f} fps, {result.duration_s:.2f} s"),
        ("audio", e(d["audio"]) if d["audio"] else "—"),
        ("original", f"<code>{e(result.original)}</code>" if result.original else "— (no fidelity metrics)"),
    ]
    if result.syncnet:
        sn = result.syncnet
        label = " <b>(RANDOM weights)</b>" if sn.get("random_weights") else ""
        files.append(("SyncNet", f"<code>{e(str(sn.get('path')))}</code> — {e(str(sn.get('source')))}{label}"))
    return [*parts, "<h2>Files</h2>", _kv(files)]


def _sync_section(result: EvalResult) -> list[str]:
    e = html.escape
    parts = ['<h2 id="sync">Lip sync (SyncNet LSE-C / LSE-D)</h2>']
    sync = result.sync
    if sync is None:
        parts.append(f'<p class="missing" id="sync-missing">No lip-sync scores: {e(result.sync_missing or "not computed")}</p>')
        return parts
    rows = [
        ("LSE-C (confidence, higher is better)", _fmt(sync.lse_c)),
        ("LSE-D (distance, lower is better)", _fmt(sync.lse_d)),
        ("AV offset", f"{sync.offset:+d} frames ({sync.offset * 40:+d} ms)"),
        ("scored", f"{sync.windows} windows of 0.2 s in {len(sync.segments)} face stretch(es), "
                   f"{result.frames_25fps} frames at 25 fps"),
    ]
    parts.append(_kv(rows, "kv num"))
    if len(sync.segments) > 1:
        seg_rows = "".join(
            f"<tr><td>{s.start_s:.2f}–{s.end_s:.2f} s</td><td>{s.frames}</td><td>{_fmt(s.lse_c)}</td>"
            f"<td>{_fmt(s.lse_d)}</td><td>{s.offset:+d}</td></tr>"
            for s in sync.segments
        )
        parts.append(
            '<table class="num"><tr><th>stretch</th><th>frames</th><th>LSE-C</th><th>LSE-D</th>'
            f"<th>offset</th></tr>{seg_rows}</table>"
        )
    parts.append(_img(per_frame_plot(sync), "per-frame sync distance", "plot"))
    parts.append(_img(offset_plot(sync), "distance per AV offset", "plot"))
    if sync.skipped:
        parts.append("<p class=\"muted\">Not scored: " + e("; ".join(sync.skipped)) + "</p>")
    return parts


def _fidelity_section(fid: dict[str, Any] | None) -> list[str]:
    parts = ['<h2 id="fidelity">Fidelity to the original</h2>']
    if fid is None:
        parts.append('<p class="muted">No <code>--original</code> given.</p>')
        return parts
    margin = fid.get("region_margin_px", 0)
    ratio = fid.get("flicker_ratio")
    rows = [
        (f"PSNR outside the blend region (+{margin} px)", _fmt(fid["psnr_outside"], 2, " dB")),
        ("SSIM outside the blend region", _fmt(fid["ssim_outside"], 4)),
        ("PSNR inside the face box", _fmt(fid["psnr_face"], 2, " dB")),
        ("SSIM inside the face box", _fmt(fid["ssim_face"], 4)),
        ("mouth flicker, dub (mean |Δ| per frame)", _fmt(fid["flicker_dub"], 3)),
        ("mouth flicker, original", _fmt(fid["flicker_original"], 3)),
        ("flicker ratio (dub / original; ≈ 1 is as steady as the real mouth)", _fmt(ratio, 3)),
        ("frames compared", str(fid["frames"])),
        ("lowest PSNR outside (frame: dB)",
         ", ".join(f"{k}: {_fmt(p, 2)}" for k, p in fid.get("worst_outside", [])) or "—"),
    ]
    parts.append(_kv(rows, "kv num"))
    parts.append(
        '<p class="muted">Outside the blend region only the watermark and the video encoder '
        "should change pixels: expect 40 dB or more there.</p>"
    )
    return parts


def _strip_section(result: EvalResult) -> list[str]:
    parts = [f'<h2 id="strip">Mouth every {result.strip_interval_s:g} s</h2>']
    if not result.strip:
        parts.append('<p class="muted">No frame with a face to show.</p>')
        return parts
    head = "<tr><th>time</th>" + ("<th>original</th>" if result.original else "") + "<th>dubbed</th></tr>"
    rows_html = []
    for item in result.strip:
        cells = f"<td>{item.time_s:.2f} s<br><span class=\"muted\">frame {item.frame}</span></td>"
        if result.original:
            cells += "<td>" + (_img(item.original_png, f"original at {item.time_s:.2f} s")
                               if item.original_png else "—") + "</td>"
        cells += "<td>" + _img(item.dubbed_png, f"dubbed at {item.time_s:.2f} s") + "</td>"
        rows_html.append(f"<tr>{cells}</tr>")
    parts.append(f'<table class="strip">{head}{"".join(rows_html)}</table>')
    return parts


def write_report(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """Render and write the report to ``path`` atomically; returns the path.

    The mode is ``0o666`` less the umask, as for any document a program saves."""
    from latentdub.files import atomic_write

    return atomic_write(path, render_report(result))
