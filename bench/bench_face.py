"""Speed and accuracy of the face layer on real clips.

    python bench/bench_face.py                 # pass 1: serial vs fast on demo1 1080x1920, then 720p
    python bench/bench_face.py --workers 4     # the parallel path with 4 worker processes
    python bench/bench_face.py --clips demo1,hamilton --repeat 2
    python bench/bench_face.py --residuals     # + anchor-to-template residuals on frontal clips
    python bench/bench_face.py --json          # one JSON line at the end

Pass 1 comparison (the first table), per clip, all on the whole clip:
  reference     analyze_video_reference: today's serial loop, one thread (the equality reference)
  threads       analyze_video(workers=1): the same loop, decoding / cut features in two more threads
  procs cold    analyze_video(workers=N): N worker processes started for this run + ordered replay
  procs warm    the same again, reusing the warm worker processes (what a service or batch sees)
Columns: wall-clock frames/s, the ratio to the reference, CPU ms per frame summed over this
process and the workers (a load-independent cost), and whether the result is identical to the
reference (it must be). At the end, a projection for a many-core machine from these costs.

Speeds are wall-clock on this machine: note the core count and the load in the header; other
work on a shared machine slows everything down, so compare rows of one run, not runs.
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
from typing import Any

import numpy as np

from latentdub.face import (
    Aligner,
    FaceAnalysis,
    MediaPipeBackend,
    analyze_video,
    parallel,
    select_face,
)
from latentdub.face.alignment import align_matrices, anchor_residuals, apply_affine, geometry
from latentdub.face.analysis import analyze_video_reference
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


CLIPS = {
    "demo1": "latentsync_demo1_portrait_hevc_25fps.mp4",  # 1080x1920 HEVC, 250 frames
    "demo3": "latentsync_demo3_portrait_hevc_30fps.mp4",  # 1080x1920 HEVC, 600 frames
    "hamilton": "facerec_hamilton_29.97fps_multiface_cuts.mp4",  # 640x360, cuts, many faces
    "infinitetalk": "infinitetalk_hdtf_man_25fps.mp4",  # 458x458, 375 frames
}
_ARRAYS = ("pts", "sampled", "scene_cuts", "obs_frame", "obs_track", "obs_bbox", "obs_anchors")


def _fps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by running processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _same(a: FaceAnalysis, b: FaceAnalysis) -> bool:
    return all(
        np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)
        if getattr(a, k).dtype.kind == "f"
        else np.array_equal(getattr(a, k), getattr(b, k))
        for k in _ARRAYS
    ) and [t.to_dict() for t in a.tracks] == [t.to_dict() for t in b.tracks]


def _timed(fn: object) -> tuple[FaceAnalysis, float, float, list[int]]:
    """(result, wall s, CPU s of this process + its workers, worker pids) of one analysis."""
    parallel.last_stats = parallel.RunStats()
    before_pids = list(parallel._pool.pids) if parallel._pool is not None else []
    before = time.process_time() + _cpu_s(before_pids)
    t = time.perf_counter()
    result = fn()  # type: ignore[operator]
    wall = time.perf_counter() - t
    pids = parallel.last_stats.worker_pids
    # Workers that existed before the run were counted in ``before``; new ones from 0.
    cpu = (
        time.process_time()
        + _cpu_s(pids)
        - before
        + _cpu_s([p for p in before_pids if p not in pids])
    )
    return result, wall, cpu, pids


def bench_pass1(names: list[str], workers: int, repeat: int) -> dict[str, dict[str, Any]]:
    """Serial reference vs the fast paths of pass 1, on whole clips."""
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        clip = MEDIA / CLIPS.get(name, name)
        rows: dict[str, dict[str, Any]] = {}
        parallel.close_pool()
        ref, wall, cpu, _ = _timed(lambda clip=clip: analyze_video_reference(clip))
        n = ref.num_frames
        base = _fps(n, wall)
        rows["reference"] = {"fps": base, "cpu_ms": 1000 * cpu / n, "same": True}
        runs = [("threads", 1), ("procs cold", workers)]
        runs += [(f"procs warm {k + 1}", workers) for k in range(repeat)]
        for label, w in runs:
            a, wall, cpu, _ = _timed(lambda clip=clip, w=w: analyze_video(clip, workers=w))
            stats = parallel.last_stats
            row: dict[str, Any] = {"fps": _fps(n, wall), "cpu_ms": 1000 * cpu / n}
            row["same"] = _same(a, ref)
            if w > 1:
                row.update(segments=stats.segments, misses=stats.replay_misses)
                row["fallback"] = stats.fallback
            rows[label] = row
        parallel.close_pool()
        report[name] = {
            "frames": n,
            "size": f"{ref.width}x{ref.height}",
            "rows": rows,
            "path": clip,
        }
        print(f"  {name} ({ref.width}x{ref.height}, {n} frames):")
        print(f"    {'path':<14} {'fps':>7} {'ratio':>6} {'cpu ms/f':>9}  same  notes")
        for label, r in rows.items():
            notes = ""
            if "segments" in r:
                notes = f"{r['segments']} segments, {r['misses']} ops recomputed in the replay"
                if r["fallback"]:
                    notes += f", FELL BACK: {r['fallback']}"
            print(
                f"    {label:<14} {r['fps']:7.1f} {r['fps'] / base:5.2f}x {r['cpu_ms']:9.1f}  "
                f"{'yes' if r['same'] else 'NO':<4}  {notes}"
            )
    return report


def _decode_ms(clip: Path) -> float:
    """CPU ms per frame to decode the clip without converting frames (the run-up cost)."""
    import av

    c0 = time.process_time()
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
    return 1000 * (time.process_time() - c0) / max(n, 1)


def _estimate(
    n: int,
    keyframes: np.ndarray,
    cores: int,
    cpu_ms: float,
    worker_ms: float,
    decode_ms: float,
) -> tuple[float, str]:
    """Seconds for pass 1 on ``cores`` cores with warm workers, and how it was reached.

    Work: every frame of every segment plus its overlap costs ``cpu_ms`` of CPU, every run-up
    frame ``decode_ms``. Time is the larger of (all work / cores) and the critical path of the
    in-order job schedule, where one worker (~2 cores) takes ``worker_ms`` per frame and
    decodes a run-up at twice the single-thread rate (frame threads).
    """
    w = parallel.default_workers(cores)
    segments = max(1, min(max(w, -(-n // parallel.TARGET_SEGMENT)), n // parallel.MIN_SEGMENT))
    starts = parallel.segment_bounds(n, keyframes, segments)
    free = [0.0] * w
    work = 0.0
    run_up_total = 0
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else n
        frames = min(n, stop + parallel.OVERLAP) - start
        before = keyframes[keyframes <= start]
        run_up = start - int(before.max()) if before.size else start
        run_up_total += run_up
        work += frames * cpu_ms + run_up * decode_ms
        slot = int(np.argmin(free))
        free[slot] += run_up * decode_ms / 2 + frames * worker_ms
    seconds = max(work / cores, max(free)) / 1000
    how = (
        f"{w} workers, {len(starts)} segments, {run_up_total} run-up frames; "
        f"CPU-bound {n / (work / cores / 1000):.0f} fps, critical path {n / (max(free) / 1000):.0f} fps"
    )
    return seconds, how


def projection(report: dict[str, dict[str, Any]], cores: int = 16) -> str:
    """Frames/s on ``cores`` cores from costs measured here (see :func:`_estimate`).

    Basis: the workers share nothing but the input file, so their work divides over cores; the
    serial part (the replay in the parent, ~0.1 ms/frame) is inside the measured CPU cost; each
    segment boundary adds OVERLAP frames analysed twice, and a segment that does not start at a
    keyframe a decode-only run-up. Not modelled: memory bandwidth, SMT siblings, turbo clocks,
    hence a second figure at 70 % efficiency.
    """
    lines = []
    for name, entry in report.items():
        rows = entry["rows"]
        clip = entry["path"]
        scan = parallel.scan_stream(clip)
        if scan is None or "threads" not in rows:
            continue
        n = int(entry["frames"])
        cpu_ms = rows["threads"]["cpu_ms"]  # analysis work per frame (no run-up, no start-up)
        worker_ms = 1000 / rows["threads"]["fps"]  # one process on two cores
        decode_ms = _decode_ms(clip)
        keyframes = scan.keyframe_indices()
        seconds, how = _estimate(n, keyframes, cores, cpu_ms, worker_ms, decode_ms)
        lines.append(
            f"  {name}: {cpu_ms:.1f} CPU ms/frame, {worker_ms:.1f} ms/frame for one process, "
            f"decode-only {decode_ms:.1f} ms/frame (measured here)\n"
            f"    this clip ({n} frames, keyframes at {keyframes.tolist()[:8]}): {how}\n"
            f"    → {n / seconds:.0f} frames/s with warm workers ({0.7 * n / seconds:.0f} at 70 %); "
            "a cold start adds the workers' start-up once (~1-1.5 s, parallel)"
        )
        # A long video of the same kind: 10 minutes, a keyframe every 250 frames (as demo3).
        long_n = 15000
        long_kf = np.arange(0, long_n, 250)
        seconds, how = _estimate(long_n, long_kf, cores, cpu_ms, worker_ms, decode_ms)
        lines.append(
            f"    a 10-minute video of this kind (keyframe every 250 frames): {how}\n"
            f"    → {long_n / seconds:.0f} frames/s ({0.7 * long_n / seconds:.0f} at 70 %)"
        )
    return "\n".join(lines)


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
        "--workers",
        type=int,
        default=max(2, parallel.default_workers()),
        help="worker processes for the parallel path (default: max(2, auto))",
    )
    ap.add_argument(
        "--clips",
        default="demo1",
        help="comma-separated clips for the pass-1 comparison: demo1, demo3, hamilton, "
        "infinitetalk or a file name in ../shared/media (default demo1)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="warm runs of the parallel path")
    ap.add_argument("--no-compare", action="store_true", help="skip the pass-1 comparison")
    ap.add_argument("--no-speed", action="store_true", help="skip the 720p component speeds")
    ap.add_argument(
        "--residuals", action="store_true", help="also measure anchor residuals and jitter"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    if not (MEDIA / CLIP_720P).exists():
        sys.exit(f"test media not found under {MEDIA}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report: dict[str, object] = {}
    print(f"cores {parallel.available_cores()}, load {load:.2f}")
    if not args.no_compare:
        print(f"pass 1, serial reference vs fast paths ({args.workers} worker processes):")
        names = [c.strip() for c in args.clips.split(",") if c.strip()]
        report["pass1"] = bench_pass1(names, args.workers, max(0, args.repeat))
        print("projection for a 16-core machine (basis: costs per frame measured above):")
        print(projection(report["pass1"]))
        for entry in report["pass1"].values():  # type: ignore[union-attr]
            entry["path"] = str(entry["path"])  # for --json
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load after the comparison: {load_after:.2f}")
    if not args.no_speed:
        print(f"component speeds: clip {CLIP_720P} (1280x720), {args.frames} frames")
        report["speed_720p"] = bench_speed(MEDIA / CLIP_720P, args.frames)
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
