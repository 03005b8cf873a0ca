"""The watermark detector's geometry search: null calibration, robustness to edits, cost.

    python bench/bench_watermark_geometry.py --null     # searched score on unmarked content
    python bench/bench_watermark_geometry.py --robust   # crops, letterbox, flip, rotation, shift
    python bench/bench_watermark_geometry.py --cost     # ms per 1080p frame, detect_file of 10 s

--null: the accumulation does not depend on the key, so every clip (all of ../shared/media,
every frame up to --null-frames, and synthetic noise, flat, gradient, stripes, checkerboard and
drifting texture) is accumulated once and searched with --keys random keys. Prints the mean, sd
and max of the searched score (the best exact known-chip z over the whole search, both grids),
of the identity score, and the threshold reasoning: a union bound over the positions tried and
a Gumbel fit to the measured maxima, each at the single-position test's 3.7e-6.

--robust: each clip of ../shared/media with a short side ≥ 256 px, its first --seconds marked
by Watermarker and written by latentdub's VideoWriter (libx264 CRF 18), is decoded, edited with
OpenCV / numpy and re-encoded with libx264 CRF 18 (PyAV); detect_file must return the exact
payload. Prints clips survived / total and the z range per edit.

--cost: WatermarkDetector.add per 1080p frame (median of --runs), the report's search, and
detect_file of a 10 s 1080p clip (marked, and edited so that the search must run).
"""

from __future__ import annotations

import argparse
import math
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
from latentdub.provenance import watermark as wmk
from latentdub.provenance import watermark_search as wms
from latentdub.render import FrameInfo

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
JOB = "bench-geometry-job"
INFO = FrameInfo(index=0, pts=0, time_s=0.0, source_index=0, dubbed=True, box=None, matrix=None)
TARGET_FP = 3.7e-6  # what the single-position test at Z_MIN promises (Hoeffding)


def _videos() -> list[Path]:
    return sorted(p for p in MEDIA.rglob("*") if p.suffix in (".mp4", ".avi"))


# -- edits ----------------------------------------------------------------------------------------
def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


def _crop(c: float, resize_back: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    def f(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        y0, x0 = round(h * c), round(w * c)
        out = img[y0 : h - y0, x0 : w - x0]
        if resize_back:
            return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)
        return out

    return f


def _box(aspect: float) -> Callable[[np.ndarray], np.ndarray]:
    """Letterbox / pillarbox into a frame of ``aspect`` (w / h); the content keeps its size
    unless the frame would exceed 1920 on its long side."""

    def f(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        fw, fh = (w, w / aspect) if w / h > aspect else (h * aspect, h)
        k = min(1.0, 1920 / max(fw, fh))
        fw, fh = _even(fw * k), _even(fh * k)
        s = min(fw / w, fh / h)
        cw, ch = min(fw, round(w * s)), min(fh, round(h * s))
        out = np.zeros((fh, fw, 3), np.uint8)
        y0, x0 = (fh - ch) // 2, (fw - cw) // 2
        out[y0 : y0 + ch, x0 : x0 + cw] = cv2.resize(img, (cw, ch), interpolation=cv2.INTER_AREA)
        return out

    return f


def _rotate(deg: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC)

    return f


def _shift(px: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(img: np.ndarray) -> np.ndarray:
        out = np.zeros_like(img)
        out[px:, px:] = img[:-px, :-px]
        return out

    return f


def _scale(s: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        return cv2.resize(img, (_even(w * s), _even(h * s)), interpolation=cv2.INTER_AREA)

    return f


EDITS: dict[str, tuple[Callable[[np.ndarray], np.ndarray] | None, int]] = {  # edit, CRF
    "none": (None, 18),
    "crop_1pct": (_crop(0.01), 18),
    "crop_3pct": (_crop(0.03), 18),
    "crop_5pct": (_crop(0.05), 18),
    "crop_10pct": (_crop(0.10), 18),
    "crop_2pct_resize_back": (_crop(0.02, True), 18),
    "crop_5pct_resize_back": (_crop(0.05, True), 18),
    "crop_10pct_resize_back": (_crop(0.10, True), 18),
    "box_16x9": (_box(16 / 9), 18),
    "box_9x16": (_box(9 / 16), 18),
    "flip": (lambda img: img[:, ::-1], 18),
    "rotate_+3deg": (_rotate(3.0), 18),
    "rotate_-3deg": (_rotate(-3.0), 18),
    "rotate_+1.5deg": (_rotate(1.5), 18),
    "shift_2px": (_shift(2), 18),
    # what held before the search: must still hold
    "crf_28": (None, 28),
    "scale_50pct": (_scale(0.5), 18),
    "crf_35": (None, 35),
    "scale_25pct": (_scale(0.25), 18),
}


def _encode(frames: list[np.ndarray], fps: Fraction, dst: Path, crf: int) -> Path:
    h, w = frames[0].shape[:2]
    eh, ew = h - h % 2, w - w % 2
    with av.open(str(dst), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "medium"})
        vs.width, vs.height, vs.pix_fmt = ew, eh, "yuv420p"
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:eh, :ew]), format="rgb24")
            frame.pts = k
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
    return dst


def _mark(src: Path, dst: Path, seconds: float) -> tuple[Path, Fraction]:
    with av.open(str(src)) as c:
        vs = c.streams.video[0]
        time_base, fps = Fraction(vs.time_base), Fraction(vs.average_rate)
    frames = [f for f in iter_frames(src) if f.time_s < seconds]
    h, w = frames[0].image.shape[:2]
    wm = wmk.Watermarker(wmk.payload_for_job(JOB))
    with VideoWriter(dst, width=w, height=h, time_base=time_base, fps=fps) as writer:
        for f in frames:
            writer.write(wm(f.image, INFO), pts=f.pts)
    return dst, fps


def robust(seconds: float, edits: list[str], clips: list[str] | None) -> None:
    truth = wmk.payload_for_job(JOB)
    videos = [
        v
        for v in _videos()
        if (clips is None or v.name in clips) and min(next(iter_frames(v)).image.shape[:2]) >= 256
    ]
    results: dict[str, list[tuple[str, bool, float, float]]] = {e: [] for e in edits}
    with tempfile.TemporaryDirectory() as tmp:
        for v in videos:
            marked, fps = _mark(v, Path(tmp) / f"m_{v.stem}.mp4", seconds)
            frames = [f.image for f in iter_frames(marked)]
            for name in edits:
                edit, crf = EDITS[name]
                if edit is None and crf == 18:
                    path = marked
                else:
                    out = [edit(f) for f in frames] if edit else frames
                    path = _encode(out, fps, Path(tmp) / f"{name}_{v.stem}.mp4", crf)
                t0 = time.perf_counter()
                r = wmk.detect_file(path)
                dt = time.perf_counter() - t0
                ok = r.found and r.payload == truth
                results[name].append((v.name, ok, r.score, dt))
                geo = r.geometry or {}
                print(
                    f"  {v.name:48s} {name:24s} {'OK ' if ok else 'MISS'} z {r.score:6.2f} "
                    f"search {r.search_score if r.search_score is None else round(r.search_score, 2)}"
                    f" {dt:5.2f}s {geo}",
                    flush=True,
                )
    print(f"\nrobustness: {len(videos)} clips (short side ≥ 256), {seconds:g} s each, CRF 18")
    for name, rows in results.items():
        zs = [z for _, ok, z, _ in rows if ok]
        zr = f"z {min(zs):5.1f}-{max(zs):5.1f}" if zs else "z  -"
        missed = [n for n, ok, _, _ in rows if not ok]
        print(f"{name:24s} {sum(ok for _, ok, _, _ in rows):2d}/{len(rows)}  {zr}  missed {missed}")


# -- null calibration -----------------------------------------------------------------------------
def _synthetic(n: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(11)
    out: dict[str, list[np.ndarray]] = {}
    for h, w in ((512, 512), (720, 1280), (360, 640)):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tag = f"{w}x{h}"

        def rgb(a: np.ndarray) -> np.ndarray:
            return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

        out[f"noise_{tag}"] = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
        out[f"flat_{tag}"] = [np.full((h, w, 3), 128, np.uint8)] * n
        out[f"gradient_{tag}"] = [rgb(30 + 200 * (xx + yy) / (w + h))] * n
        for period in (3.0, 4.0, 8.0, 8.0 * w / 640):
            out[f"stripes_{period:.1f}px_{tag}"] = [
                rgb(128 + 60 * np.sin(2 * np.pi * (xx + 0.3 * yy + k) / period)) for k in range(n)
            ]
        out[f"checker_{tag}"] = [rgb(128 + 60 * (((xx // 4) + (yy // 4)) % 2 * 2 - 1))] * n
        base = cv2.GaussianBlur(rng.normal(0, 1, (h + 64, w + 64)).astype(np.float32), (0, 0), 3)
        base = (base - base.min()) / (base.max() - base.min()) * 200 + 28
        out[f"texture_{tag}"] = [rgb(base[k : k + h, 2 * k : 2 * k + w]) for k in range(n)]
    return out


def null(keys: int, max_frames: int, synth_frames: int) -> None:
    sources: dict[str, tuple[str, Callable[[], object]]] = {}
    for v in _videos():
        sources[v.name] = ("media", lambda v=v: (f.image for f in iter_frames(v, stop=max_frames)))
    for name, frames in _synthetic(synth_frames).items():
        sources[name] = ("synthetic", lambda frames=frames: frames)
    rng = np.random.default_rng(5)
    key_list = [wmk.DEFAULT_KEY] + [rng.bytes(16) for _ in range(keys - 1)]
    searched: dict[str, list[float]] = {"media": [], "synthetic": []}
    ident, found, positions = [], 0, []
    for name, (kind, frames) in sources.items():
        det = wmk.WatermarkDetector()
        for f in frames():  # type: ignore[attr-defined]
            det.add(f)
        imgs = {g: wms.whiten(det._acc[g], g) for g in wmk.GRIDS}
        row = []
        for key in key_list:
            det._key = wmk._key_bytes(key)
            z, _ = det._search(imgs)
            ident.append(det.score())
            row.append(z)
            if z >= wmk.Z_SEARCH or ident[-1] >= wmk.Z_MIN:  # else report() cannot find it
                found += det.report().found
        searched[kind] += [z for z in row if math.isfinite(z)]  # -inf: nothing to correlate
        positions.append(_positions(det))
        print(f"  {name:56s} frames {det.frames:4d}  searched, max over keys {max(row):5.2f}")
    n_pos = float(np.median(positions))
    print(f"\nnull: {len(sources)} clips x {len(key_list)} keys; found {found}")
    print(f"identity score: mean {np.mean(ident):+.2f} sd {np.std(ident):.2f} max {max(ident):.2f}")
    for kind, values in searched.items():
        s = np.array(values)
        print(
            f"searched score, {kind:9s} (N {len(s):3d}): mean {s.mean():.2f} sd {s.std():.2f} "
            f"max {s.max():.2f}"
        )
    # Union bound: Hoeffding per position, positions = offsets x candidates x grids (pixels of
    # the search image; neighbouring offsets are correlated, so this over-counts).
    z_union = math.sqrt(2 * math.log(n_pos / TARGET_FP))
    # Gumbel fit (method of moments) to the real clips' maxima: the synthetic patterns differ
    # from each other too much (flat, stripes) for one fit.
    s = np.array(searched["media"])
    beta = s.std() * math.sqrt(6) / math.pi
    mu = s.mean() - 0.5772 * beta
    z_gumbel = mu - beta * math.log(-math.log(1 - TARGET_FP))
    print(f"positions per search (median): {n_pos:.3g}")
    print(f"union bound (Hoeffding) for {TARGET_FP:g} per clip: z >= {z_union:.2f}")
    print(f"Gumbel fit to the real clips' maxima, {TARGET_FP:g} per clip: z >= {z_gumbel:.2f}")
    print(f"Z_SEARCH = {wmk.Z_SEARCH} (above the union bound and the Gumbel fits)")


def _positions(det: wmk.WatermarkDetector) -> float:
    total = 0.0
    for g in wmk.GRIDS:
        w, h = det._size[g]
        ws, hs = round(w / wms.SEARCH_DOWN), round(h / wms.SEARCH_DOWN)
        total += len(wms._candidates(w, h)) * ws * hs
    return total


# -- cost -----------------------------------------------------------------------------------------
def cost(runs: int) -> None:
    src = MEDIA / "latentsync_demo1_portrait_hevc_25fps.mp4"
    frames = [np.ascontiguousarray(np.rot90(f.image)) for f in iter_frames(src, stop=250)]
    print(f"1080p frames: {frames[0].shape}, cores {len(__import__('os').sched_getaffinity(0))}")
    wm = wmk.Watermarker(wmk.payload_for_job(JOB))
    marked = [wm(f, INFO) for f in frames]
    det = wmk.WatermarkDetector()
    det.add(marked[0])
    add_ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for f in marked[1:11]:
            det.add(f)
        add_ms.append((time.perf_counter() - t0) / 10 * 1e3)
    search_s = []
    imgs = {g: wms.whiten(det._acc[g], g) for g in wmk.GRIDS}
    for _ in range(max(1, runs // 2)):
        t0 = time.perf_counter()
        det._search(imgs)
        search_s.append(time.perf_counter() - t0)
    add, srch = statistics.median(add_ms), statistics.median(search_s)
    print(f"add: {add:.1f} ms per 1080p frame (median of {runs}); search {srch:.2f} s per report")
    for n in (30, 150):
        print(f"  per frame over {n} frames: {add + srch * 1e3 / n:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        fps = Fraction(25)
        for tag, edit in (("marked", None), ("marked+crop5pct", _crop(0.05))):
            out = [edit(f) for f in marked] if edit else marked
            path = _encode(out, fps, Path(tmp) / f"{tag}.mp4", 18)
            t0 = time.perf_counter()
            r = wmk.detect_file(path)
            print(
                f"detect_file 10 s 1080p {tag}: {time.perf_counter() - t0:.2f} s, "
                f"found {r.found}, z {r.score:.1f}, frames {r.frames_checked}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--null", action="store_true")
    ap.add_argument("--keys", type=int, default=8)
    ap.add_argument("--null-frames", type=int, default=150)
    ap.add_argument("--synth-frames", type=int, default=8)
    ap.add_argument("--robust", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--edits", nargs="*", default=list(EDITS))
    ap.add_argument("--clips", nargs="*", default=None)
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not MEDIA.exists():
        sys.exit(f"no media at {MEDIA}")
    if args.null:
        null(args.keys, args.null_frames, args.synth_frames)
    if args.robust:
        robust(args.seconds, args.edits, args.clips)
    if args.cost:
        cost(args.runs)


if __name__ == "__main__":
    main()
