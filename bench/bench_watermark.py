"""Cost and invisibility of the watermark, and its detector's scores on real media.

    python bench/bench_watermark.py               # embed / detect ms per frame at 512², 720p, 1080p + PSNR
    python bench/bench_watermark.py --scan-media  # + scores on every video in ../shared/media,
                                                  #   unmarked and marked (VideoWriter, CRF 18)
    python bench/bench_watermark.py --delivered   # + quality and size as delivered (see below)
    python bench/bench_watermark.py --curve       # + the amplitude trade-off curve (4 clips)
    python bench/bench_watermark.py --json        # one JSON line at the end

Timings are single-process wall clock, median of --runs passes over the same frames, after one
warm-up frame per size (the per-size field is built once and cached). Note the core count and
load in the header: on a shared machine other work slows everything down.
  embed    Watermarker(frame, info): mask + field + saturating add (what the sink pays per frame)
  detect   WatermarkDetector.add: canonical resize + LoG + per-chip signs (decoding not included)
As delivered (--delivered): the first --delivered-seconds of every video in ../shared/media
is encoded twice with latentdub's VideoWriter (libx264 preset medium) at the same CRF (18, and
--crfs), once unmarked and once marked, and the two *encodes* are compared (what a viewer gets):
  psnr_y / psnr_rgb   PSNR of the marked encode against the unmarked encode (BT.709 luma, RGB)
  ssim_y / ssim_rgb   SSIM of the same (Gaussian window 1.5, mean over frames and channels)
  size%               file-size increase of the marked encode at the same CRF
  flicker             mean |Δt (Y_marked − Y_unmarked)|: the frame-to-frame change the mark adds
  codec               mean |Δt (Y_unmarked − Y_source)|: the codec's own frame-to-frame noise
  z18 / z28 / ...     detection score of the marked CRF 18 encode, then after an ffmpeg-like
                      re-encode at CRF 28 / 35 and a 50 % / 25 % bicubic downscale (CRF 23);
                      "ok" columns: found with the right payload. Threshold Z_MIN = 5.
Frames are real (512²: vexpress_aoc, 720p: liveportrait_s32, 1080p: latentsync_demo1 turned
landscape) when ../shared/media is present, else synthetic texture.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance import watermark as wmod
from latentdub.provenance.watermark import (
    Z_MIN,
    WatermarkDetector,
    Watermarker,
    detect_file,
    detect_frames,
    payload_for_job,
)
from latentdub.render import FrameInfo

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
SIZES = {  # name: (width, height, source clip, quarter turns)
    "512x512": (512, 512, "vexpress_aoc_29.97fps.mp4", 0),
    "1280x720": (1280, 720, "liveportrait_s32_turned_face_30fps.mp4", 0),
    "1920x1080": (1920, 1080, "latentsync_demo1_portrait_hevc_25fps.mp4", 1),
}
INFO = FrameInfo(index=0, pts=0, time_s=0.0, source_index=0, dubbed=True, box=None, matrix=None)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _frames(
    width: int, height: int, clip: str, turns: int, count: int
) -> tuple[list[np.ndarray], str]:
    path = MEDIA / clip
    if path.exists():
        images = []
        for k, f in enumerate(iter_frames(path, stop=count * 5)):
            if k % 5 == 0:  # spread over a few seconds: different content
                img = np.ascontiguousarray(np.rot90(f.image, k=turns)) if turns else f.image
                if img.shape[:2] != (height, width):
                    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
                images.append(img)
        return images, clip
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (height, width, 3)).astype(np.float32), (0, 0), 2.0)
    base = ((noise - noise.min()) / (np.ptp(noise) + 1e-9) * 220 + 18).astype(np.uint8)
    return [np.roll(base, 3 * k, axis=1) for k in range(count)], "synthetic"


def _median_ms(fn: Callable[[np.ndarray], object], frames: list[np.ndarray], runs: int) -> float:
    fn(frames[0])  # warm-up: builds the per-size cache
    per_run = []
    for _ in range(runs):
        t = time.perf_counter()
        for f in frames:
            fn(f)
        per_run.append((time.perf_counter() - t) / len(frames) * 1e3)
    return statistics.median(per_run)


def bench_costs(count: int, runs: int) -> dict[str, dict[str, float | str]]:
    wm = Watermarker(payload_for_job("bench"))
    results: dict[str, dict[str, float | str]] = {}
    for name, (w, h, clip, turns) in SIZES.items():
        frames, source = _frames(w, h, clip, turns, count)
        embed_ms = _median_ms(lambda f: wm(f, INFO), frames, runs)
        detector = WatermarkDetector()
        detect_ms = _median_ms(detector.add, frames, runs)
        marked = [wm(f, INFO) for f in frames]
        psnrs = [_psnr(a, b) for a, b in zip(frames, marked, strict=True)]
        raw = detect_frames(marked)
        results[name] = {
            "source": source,
            "embed_ms": round(embed_ms, 2),
            "detect_ms": round(detect_ms, 2),
            "psnr_mean_db": round(float(np.mean(psnrs)), 2),
            "psnr_min_db": round(float(np.min(psnrs)), 2),
            "raw_score": round(raw.score, 1),
        }
        r = results[name]
        print(
            f"{name:>10s}  embed {r['embed_ms']:6.2f} ms/frame   detect {r['detect_ms']:6.2f} ms/frame   "
            f"PSNR mean {r['psnr_mean_db']:.2f} dB (min {r['psnr_min_db']:.2f})   "
            f"score of {len(frames)} raw marked frames {r['raw_score']}   [{source}]",
            flush=True,
        )
    return results


def scan_media(max_frames: int, seconds: float) -> dict[str, dict[str, float | bool]]:
    """Detector scores on every video, as it is and after marking + VideoWriter (CRF 18)."""
    videos = sorted(p for p in MEDIA.rglob("*") if p.suffix in (".mp4", ".avi"))
    payload = payload_for_job("bench-scan")
    wm = Watermarker(payload)
    out: dict[str, dict[str, float | bool]] = {}
    print(f"\nscores (threshold {Z_MIN}); first {seconds:g} s / ≤ {max_frames} frames of each file")
    print(f"{'file':52s} {'frames':>6s} {'unmarked':>9s} {'marked':>8s}  found  payload ok")
    with tempfile.TemporaryDirectory() as tmp:
        for path in videos:
            frames = [f for f in iter_frames(path, stop=max_frames) if f.time_s < seconds]
            plain = detect_frames(f.image for f in frames)
            with av.open(str(path)) as c:
                vs = c.streams.video[0]
                tb = Fraction(vs.time_base) if vs.time_base else Fraction(1, 1000)
                fps = Fraction(vs.average_rate) if vs.average_rate else Fraction(25)
            h, w = frames[0].image.shape[:2]
            marked_path = Path(tmp) / f"{path.stem}.mp4"
            pts = [round(Fraction(f.time_s) / tb) for f in frames]
            with VideoWriter(marked_path, width=w, height=h, time_base=tb, fps=fps) as writer:
                for f, p in zip(frames, pts, strict=True):
                    writer.write(wm(f.image, INFO), pts=p)
            marked = detect_frames(f.image for f in iter_frames(marked_path))
            name = str(path.relative_to(MEDIA))
            out[name] = {
                "frames": len(frames),
                "unmarked_score": round(plain.score, 2),
                "unmarked_found": plain.found,
                "marked_score": round(marked.score, 2),
                "marked_found": marked.found and marked.payload == payload,
            }
            print(
                f"{name[:52]:52s} {len(frames):6d} {plain.score:9.2f} {marked.score:8.2f}  "
                f"{plain.found!s:>5s}  {out[name]['marked_found']!s:>5s}",
                flush=True,
            )
    un = np.array([v["unmarked_score"] for v in out.values()], dtype=float)
    mk = np.array([v["marked_score"] for v in out.values()], dtype=float)
    print(
        f"unmarked: max |score| {np.abs(un).max():.2f}, mean {un.mean():.2f}, sd {un.std():.2f}; "
        f"false positives {sum(bool(v['unmarked_found']) for v in out.values())}/{len(out)}"
    )
    print(
        f"marked:   min score {mk.min():.2f}, median {np.median(mk):.2f}; "
        f"found with the right payload {sum(bool(v['marked_found']) for v in out.values())}/{len(out)}"
    )
    return out


# -- as delivered: marked encode vs unmarked encode -------------------------------------------------
def _clip(path: Path, seconds: float, max_frames: int) -> tuple[list[Any], Fraction, Fraction]:
    """Decoded frames of the first ``seconds`` of a file, its time base and frame rate."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        tb = Fraction(vs.time_base) if vs.time_base else Fraction(1, 1000)
        fps = Fraction(vs.average_rate) if vs.average_rate else Fraction(25)
    frames = [f for f in iter_frames(path, stop=max_frames) if f.time_s < seconds]
    return frames, tb, fps


def _encode(
    frames: list[Any],
    dst: Path,
    tb: Fraction,
    fps: Fraction,
    crf: int,
    mark: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:
    """Encode with latentdub's own VideoWriter (libx264, preset medium); the file's size."""
    h, w = frames[0].image.shape[:2]
    pts = [round(Fraction(f.time_s) / tb) for f in frames]
    with VideoWriter(dst, width=w, height=h, time_base=tb, fps=fps, crf=crf) as writer:
        for f, p in zip(frames, pts, strict=True):
            writer.write(f.image if mark is None else mark(f.image), pts=p)
    return dst.stat().st_size


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.709 luma (the writer's matrix), float32, 0–255."""
    x = rgb.astype(np.float32)
    return 0.2126 * x[..., 0] + 0.7152 * x[..., 1] + 0.0722 * x[..., 2]


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two single-channel images (Wang et al. 2004: Gaussian window σ = 1.5,
    K1 = 0.01, K2 = 0.03, L = 255)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


def _transcode(src: Path, dst: Path, *, crf: int = 23, scale: float = 1.0) -> Path:
    """Decode → (rescale, bicubic) → libx264 preset medium: an ordinary ffmpeg re-encode."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        ivs = inp.streams.video[0]
        width = max(2, round(ivs.codec_context.width * scale / 2) * 2)
        height = max(2, round(ivs.codec_context.height * scale / 2) * 2)
        rate = Fraction(ivs.average_rate) if ivs.average_rate else Fraction(25)
        ovs = out.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
        ovs.width, ovs.height, ovs.pix_fmt = width, height, "yuv420p"
        for attr in ("colorspace", "color_range", "color_primaries", "color_trc"):
            setattr(ovs.codec_context, attr, getattr(ivs.codec_context, attr))
        for n, frame in enumerate(inp.decode(ivs)):
            if scale != 1.0:
                frame = frame.reformat(width=width, height=height, interpolation="BICUBIC")
            frame.pts, frame.time_base = n, Fraction(1) / rate
            for packet in ovs.encode(frame):
                out.mux(packet)
        for packet in ovs.encode(None):
            out.mux(packet)
    return dst


ATTACKS = {  # name: _transcode arguments, applied to the marked CRF 18 delivery
    "crf28": {"crf": 28},
    "crf35": {"crf": 35},
    "scale50": {"scale": 0.5},
    "scale25": {"scale": 0.25},
}


def delivered(
    path: Path,
    wm: Watermarker,
    tmp: Path,
    *,
    seconds: float,
    max_frames: int,
    crfs: tuple[int, ...] = (18,),
    attacks: bool = True,
) -> dict[str, Any]:
    """One clip as delivered: unmarked and marked encodes with the same settings, compared
    frame by frame (streamed: bounded memory even at 1080p)."""
    frames, tb, fps = _clip(path, seconds, max_frames)
    h, w = frames[0].image.shape[:2]
    r: dict[str, Any] = {"frames": len(frames), "size": f"{w}x{h}"}
    for crf in crfs:
        plain_p, marked_p = (
            tmp / f"{path.stem}.plain{crf}.mp4",
            tmp / f"{path.stem}.marked{crf}.mp4",
        )
        plain_size = _encode(frames, plain_p, tb, fps, crf)
        marked_size = _encode(frames, marked_p, tb, fps, crf, mark=lambda im: wm(im, INFO))
        sse_y = sse_rgb = 0.0
        n_px = 0
        ssim_y, ssim_rgb, flicker, codec = [], [], [], []
        prev_d = prev_e = None
        detector = WatermarkDetector()
        for src, p, m in zip(frames, iter_frames(plain_p), iter_frames(marked_p), strict=False):
            yp, ym = _luma(p.image), _luma(m.image)
            d, e = ym - yp, yp - _luma(src.image)
            sse_y += float(np.sum(np.square(d, dtype=np.float64)))
            sse_rgb += float(np.sum(np.square(m.image.astype(np.float64) - p.image)))
            n_px += d.size
            ssim_y.append(_ssim(ym, yp))
            ssim_rgb.extend(_ssim(m.image[..., c], p.image[..., c]) for c in range(3))
            if prev_d is not None and prev_e is not None:
                flicker.append(float(np.mean(np.abs(d - prev_d))))
                codec.append(float(np.mean(np.abs(e - prev_e))))
            prev_d, prev_e = d, e
            detector.add(m.image)
        stats = {
            "psnr_y": 10 * np.log10(255.0**2 * n_px / max(sse_y, 1e-9)),
            "psnr_rgb": 10 * np.log10(255.0**2 * 3 * n_px / max(sse_rgb, 1e-9)),
            "ssim_y": float(np.mean(ssim_y)),
            "ssim_rgb": float(np.mean(ssim_rgb)),
            "size_pct": 100.0 * (marked_size / plain_size - 1.0),
            "flicker": float(np.mean(flicker)) if flicker else 0.0,
            "codec_flicker": float(np.mean(codec)) if codec else 0.0,
            "z": detector.report().score,
        }
        r[f"crf{crf}"] = {
            k: round(float(v), 4 if k.startswith("ssim") else 2) for k, v in stats.items()
        }
        if crf == 18 and attacks:
            for name, kw in ATTACKS.items():
                rep = detect_file(_transcode(marked_p, tmp / f"{path.stem}.{name}.mp4", **kw))
                r[f"z_{name}"] = round(rep.score, 1)
                r[f"ok_{name}"] = bool(rep.found and rep.payload == wm.payload)
    return r


def _videos() -> list[Path]:
    """Every file in ../shared/media with a video stream."""
    out = []
    for path in sorted(p for p in MEDIA.rglob("*") if p.suffix in (".mp4", ".avi", ".mov", ".mkv")):
        try:
            with av.open(str(path)) as c:
                if c.streams.video:
                    out.append(path)
        except av.error.FFmpegError:
            continue
    return out


def _row(name: str, r: dict[str, Any], crf: int) -> str:
    c = r[f"crf{crf}"]
    line = (
        f"{name[:34]:34s} {r['size']:>9s} {c['psnr_y']:6.2f} {c['psnr_rgb']:6.2f} {c['ssim_y']:7.4f} "
        f"{c['ssim_rgb']:7.4f} {c['size_pct']:6.1f} {c['flicker']:5.2f} {c['codec_flicker']:5.2f} {c['z']:6.1f}"
    )
    if crf == 18 and "z_crf28" in r:
        line += "".join(f" {r['z_' + a]:5.1f}{'' if r['ok_' + a] else '!'}" for a in ATTACKS)
    return line


def _header(crf: int, attacks: bool) -> str:
    h = (
        f"{'file (CRF ' + str(crf) + ')':34s} {'size':>9s} {'psnrY':>6s} {'psnrRGB':>6s} {'ssimY':>7s} "
        f"{'ssimRGB':>7s} {'size%':>6s} {'flick':>5s} {'codec':>5s} {'z':>6s}"
    )
    if crf == 18 and attacks:
        h += "".join(f" {'z' + a:>6s}" for a in ATTACKS)
    return h


def _medians(results: dict[str, dict[str, Any]], crf: int) -> dict[str, float]:
    keys = ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb", "size_pct", "flicker", "codec_flicker", "z")
    med = {k: float(np.median([r[f"crf{crf}"][k] for r in results.values()])) for k in keys}
    med["psnr_y_min"] = float(min(r[f"crf{crf}"]["psnr_y"] for r in results.values()))
    med["size_pct_max"] = float(max(r[f"crf{crf}"]["size_pct"] for r in results.values()))
    if crf == 18:
        for a in ATTACKS:
            zs = [r[f"z_{a}"] for r in results.values() if f"z_{a}" in r]
            if zs:
                med[f"z_{a}"] = float(np.median(zs))
                med[f"found_{a}"] = float(sum(r[f"ok_{a}"] for r in results.values()))
    return {k: round(v, 4 if "ssim" in k else 2) for k, v in med.items()}


def bench_delivered(
    seconds: float, max_frames: int, crfs: tuple[int, ...], attacks: bool = True
) -> dict[str, Any]:
    """Every video as delivered (see the module doc); per clip and median."""
    wm = Watermarker(payload_for_job("bench-delivered"))
    results: dict[str, dict[str, Any]] = {}
    print(f"\nas delivered: first {seconds:g} s (≤ {max_frames} frames), marked vs unmarked encode")
    with tempfile.TemporaryDirectory() as tmp:
        for path in _videos():
            results[path.name] = delivered(
                path,
                wm,
                Path(tmp),
                seconds=seconds,
                max_frames=max_frames,
                crfs=crfs,
                attacks=attacks,
            )
    summary = {}
    for crf in crfs:
        print(_header(crf, attacks))
        for name, r in results.items():
            print(_row(name, r, crf))
        summary[crf] = _medians(results, crf)
        print(f"median CRF {crf}: {json.dumps(summary[crf])}", flush=True)
    return {"clips": results, "median": summary}


CURVE_CLIPS = (  # the two clips tests/test_watermark.py attacks, plus the two costliest in bits
    "vexpress_aoc_29.97fps.mp4",
    "liveportrait_s32_turned_face_30fps.mp4",
    "liveportrait_d20_man_25fps.mp4",
    "retalking_face2_man_25fps.mp4",
)
CURVE = (1.25, 1.0, 0.8, 0.6)  # factors on AMP_MIN, AMP_GAIN, AMP_MAX and MAX_RMS together


def bench_curve(seconds: float, max_frames: int) -> dict[str, Any]:
    """The amplitude trade-off: quality and size as delivered against robustness."""
    names = ("AMP_MIN", "AMP_GAIN", "AMP_MAX", "MAX_RMS")
    base = {n: getattr(wmod, n) for n in names}
    out: dict[str, Any] = {}
    print(f"\namplitude trade-off on {len(CURVE_CLIPS)} clips, first {seconds:g} s; medians")
    print(
        f"{'factor':>6s} {'psnrY':>6s} {'min':>6s} {'size%':>6s} {'max':>6s} {'flick':>5s} "
        + " ".join(f"{'z' + a:>7s}" for a in ("18", *ATTACKS))
        + "  (min z over clips in brackets)"
    )
    try:
        for k in CURVE:
            for n in names:
                setattr(wmod, n, base[n] * k)
            wm = Watermarker(payload_for_job("bench-curve"))
            res: dict[str, dict[str, Any]] = {}
            with tempfile.TemporaryDirectory() as tmp:
                for clip in CURVE_CLIPS:
                    if (MEDIA / clip).exists():
                        res[clip] = delivered(
                            MEDIA / clip, wm, Path(tmp), seconds=seconds, max_frames=max_frames
                        )
            med = _medians(res, 18)
            mins = {a: min(r[f"z_{a}"] for r in res.values()) for a in ATTACKS}
            out[str(k)] = {"median": med, "min_z": mins}
            print(
                f"{k:6.2f} {med['psnr_y']:6.2f} {med['psnr_y_min']:6.2f} {med['size_pct']:6.1f} "
                f"{med['size_pct_max']:6.1f} {med['flicker']:5.2f} {med['z']:7.1f} "
                + " ".join(f"{med['z_' + a]:4.1f}({mins[a]:.1f})" for a in ATTACKS),
                flush=True,
            )
    finally:
        for n in names:
            setattr(wmod, n, base[n])
    print(CHOICE)
    return out


CHOICE = """\
chosen point (factor 1.0 = the shipped AMP_MIN 1.1, AMP_GAIN 1.8, AMP_MAX 6, MAX_RMS 1.6): the
weakest robustness tests/test_watermark.py holds (512² clip, 3 s, 50 % scale: z ≥ 7.5) leaves
no room below it (z 9.4 there; 7.4 with AMP_MIN 1.0 / AMP_GAIN 1.5). Luma PSNR as delivered
stays ≥ 40 dB at every factor; the file-size target (median ≤ 10 %) is not met at any factor
that keeps that robustness: size falls only ~linearly with amplitude and so does z."""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--frames", type=int, default=8, help="frames per size")
    ap.add_argument("--runs", type=int, default=5, help="timed passes (median)")
    ap.add_argument("--scan-media", action="store_true")
    ap.add_argument("--scan-frames", type=int, default=100)
    ap.add_argument("--scan-seconds", type=float, default=4.0)
    ap.add_argument("--delivered", action="store_true", help="quality and size as delivered")
    ap.add_argument("--delivered-seconds", type=float, default=2.0)
    ap.add_argument("--delivered-frames", type=int, default=60)
    ap.add_argument("--crfs", default="18,23,28", help="CRFs for --delivered (18 always first)")
    ap.add_argument("--no-attacks", action="store_true", help="--delivered without re-encodes")
    ap.add_argument("--curve", action="store_true", help="amplitude trade-off curve")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"watermark bench: {os.cpu_count()} cores, load {load:.2f}, cv2 threads {cv2.getNumThreads()}, "
        f"python {sys.version.split()[0]}"
    )
    result: dict[str, object] = {"costs": bench_costs(args.frames, args.runs)}
    if args.scan_media:
        if MEDIA.exists():
            result["scan"] = scan_media(args.scan_frames, args.scan_seconds)
        else:
            print(f"--scan-media: {MEDIA} not found, skipped")
    if (args.delivered or args.curve) and not MEDIA.exists():
        print(f"--delivered / --curve: {MEDIA} not found, skipped")
    elif args.delivered:
        crfs = tuple(dict.fromkeys([18, *(int(c) for c in args.crfs.split(",") if c)]))
        result["delivered"] = bench_delivered(
            args.delivered_seconds, args.delivered_frames, crfs, attacks=not args.no_attacks
        )
    if args.curve and MEDIA.exists():
        result["curve"] = bench_curve(args.delivered_seconds, args.delivered_frames)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
