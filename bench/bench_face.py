"""Speed and accuracy of the face layer on real clips.

    python bench/bench_face.py                 # speeds on 720p input (liveportrait_s32, 1280x720)
    python bench/bench_face.py --residuals     # + anchor-to-template residuals on frontal clips
    python bench/bench_face.py --json          # one JSON line at the end

Speeds are single-process wall-clock frames/s on this machine (note the core count and the load
in the header; other work on a shared machine slows everything down):
  decode        PyAV decode + RGB conversion only (the floor for any pass over the video)
  analysis      pass 1: decode + detection + landmarks + tracking + cut detection
  warp_256/512  Aligner.warp: frame → model crop, one bilinear resampling
  paste_256/512 Aligner.paste_back: crop → frame, lower face only, on a copy of the frame
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from latentdub.face import Aligner, MediaPipeBackend, analyze_video, select_face
from latentdub.face.alignment import align_matrices, anchor_residuals, apply_affine, geometry
from latentdub.media.reader import iter_frames

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIP_720P = "liveportrait_s32_turned_face_30fps.mp4"
FRONTAL = [
    "infinitetalk_hdtf_man_25fps.mp4",
    "retalking_face2_man_25fps.mp4",
    "retalking_face3_woman_25fps.mp4",
    "retalking_face5_woman_glasses_25fps.mp4",
    "sadtalker_wda_katiehill_25fps_mpeg4.mp4",
    "liveportrait_d20_man_25fps.mp4",
    "vexpress_aoc_29.97fps.mp4",
    "latentsync_demo1_portrait_hevc_25fps.mp4",
]


def _fps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_speed(clip: Path, frames: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    images = [f.image for f in iter_frames(clip, stop=frames)]
    out["decode_fps"] = _fps(len(images), time.perf_counter() - t)

    with MediaPipeBackend() as backend:
        t = time.perf_counter()
        analysis = analyze_video(clip, backend=backend, max_frames=frames)
        out["analysis_fps"] = _fps(analysis.num_frames, time.perf_counter() - t)
        t = time.perf_counter()
        analysis2 = analyze_video(clip, backend=backend, max_frames=frames, every_n=2)
        out["analysis_every2_fps"] = _fps(analysis2.num_frames, time.perf_counter() - t)

    for res in (256, 512):
        t = time.perf_counter()
        sel = select_face(analysis, resolution=res)
        out[f"select_ms_{res}"] = 1000 * (time.perf_counter() - t)
        idx = np.flatnonzero(sel.valid)
        aligner = Aligner(res)
        crops = []
        t = time.perf_counter()
        for i in idx:
            crops.append(aligner.warp(images[i], sel.matrices[i]))
        out[f"warp_{res}_fps"] = _fps(len(idx), time.perf_counter() - t)
        t = time.perf_counter()
        for i, crop in zip(idx, crops, strict=True):
            aligner.paste_back(images[i], crop, sel.matrices[i])
        out[f"paste_{res}_fps"] = _fps(len(idx), time.perf_counter() - t)
    out["frames"] = float(len(images))
    return out


def bench_residuals(frames: int) -> dict[str, dict[str, float]]:
    """Where the MediaPipe anchors land relative to the template in the 256 crop (px)."""
    table: dict[str, dict[str, float]] = {}
    square = geometry(256).template_square
    all_res = []
    with MediaPipeBackend() as backend:
        for name in FRONTAL:
            path = MEDIA / name
            if not path.exists():
                continue
            anchors = []
            for f in iter_frames(path, stop=frames):
                faces = backend.detect(f.image)
                if faces:
                    anchors.append(max(faces, key=lambda o: o.size).anchors)
            a = np.asarray(anchors)
            m = align_matrices(a, 256)
            r = anchor_residuals(a, m, 256)
            nose_dy = apply_affine(m, a)[:, 2, 1] - square[2, 1]
            all_res.append(r)
            table[name] = {
                "frames": float(len(a)),
                "mean_px": float(r.mean()),
                "p95_px": float(np.percentile(r, 95)),
                "max_px": float(r.max()),
                "nose_dy_px": float(nose_dy.mean()),
            }
    if all_res:
        r = np.concatenate(all_res)
        table["ALL"] = {
            "frames": float(len(r)),
            "mean_px": float(r.mean()),
            "p95_px": float(np.percentile(r, 95)),
            "max_px": float(r.max()),
            "nose_dy_px": float(np.mean([v["nose_dy_px"] for v in table.values()])),
        }
    return table


def bench_jitter(frames: int) -> dict[str, dict[str, float]]:
    """Crop stability: RMS second difference of the crop corners (crop px), raw vs smoothed."""
    out: dict[str, dict[str, float]] = {}
    corners = np.array([[0, 0], [256, 0], [0, 256], [256, 256], [128, 160]], float)
    from latentdub.face.alignment import invert_affine

    with MediaPipeBackend() as backend:
        for name in ("infinitetalk_hdtf_man_25fps.mp4", "retalking_face4_woman_30fps.mp4"):
            if not (MEDIA / name).exists():
                continue
            a = analyze_video(MEDIA / name, backend=backend, max_frames=frames)
            row = {}
            for label, s in (("raw", 0.0), ("smoothed", 0.06)):
                sel = select_face(a, smooth_s=s)
                m = sel.matrices[sel.valid]
                pts = apply_affine(invert_affine(m), corners)  # frame px
                scale = np.sqrt(np.abs(np.linalg.det(m[:, :, :2]))).mean()
                d2 = np.diff(pts, 2, axis=0)
                row[label] = float(np.sqrt((d2**2).sum(-1).mean()) * scale)
            out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--frames", type=int, default=120, help="frames per clip (default 120)")
    ap.add_argument(
        "--residuals", action="store_true", help="also measure anchor residuals and jitter"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    if not (MEDIA / CLIP_720P).exists():
        sys.exit(f"test media not found under {MEDIA}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"cores {os.cpu_count()}, load {load:.2f}, clip {CLIP_720P} (1280x720), {args.frames} frames"
    )
    report: dict[str, object] = {"speed_720p": bench_speed(MEDIA / CLIP_720P, args.frames)}
    for key, value in report["speed_720p"].items():  # type: ignore[union-attr]
        print(f"  {key:<22} {value:9.1f}")
    if args.residuals:
        res = bench_residuals(min(args.frames, 60))
        report["anchor_residuals_256"] = res
        print("anchor residuals in the 256 crop (px): clip, frames, mean, p95, max, nose dy")
        for name, r in res.items():
            print(
                f"  {name[:42]:<42} {r['frames']:4.0f} {r['mean_px']:6.2f} {r['p95_px']:6.2f} "
                f"{r['max_px']:6.2f} {r['nose_dy_px']:+6.2f}"
            )
        jit = bench_jitter(min(args.frames, 150))
        report["crop_jitter_256"] = jit
        print("crop jitter (RMS 2nd difference of crop corners, crop px at 256): raw → smoothed")
        for name, r in jit.items():
            print(f"  {name[:42]:<42} {r['raw']:6.2f} → {r['smoothed']:6.2f}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
