"""Cost and invisibility of the watermark, and its detector's scores on real media.

    python bench/bench_watermark.py               # embed / detect ms per frame at 512², 720p, 1080p + PSNR
    python bench/bench_watermark.py --scan-media  # + scores on every video in ../shared/media,
                                                  #   unmarked and marked (VideoWriter, CRF 18)
    python bench/bench_watermark.py --json        # one JSON line at the end

Timings are single-process wall clock, median of --runs passes over the same frames, after one
warm-up frame per size (the per-size field is built once and cached). Note the core count and
load in the header: on a shared machine other work slows everything down.
  embed    Watermarker(frame, info): mask + field + saturating add (what the sink pays per frame)
  detect   WatermarkDetector.add: canonical resize + LoG + per-chip signs (decoding not included)
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

import av
import cv2
import numpy as np

from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance.watermark import (
    Z_MIN,
    WatermarkDetector,
    Watermarker,
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--frames", type=int, default=8, help="frames per size")
    ap.add_argument("--runs", type=int, default=5, help="timed passes (median)")
    ap.add_argument("--scan-media", action="store_true")
    ap.add_argument("--scan-frames", type=int, default=100)
    ap.add_argument("--scan-seconds", type=float, default=4.0)
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
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
