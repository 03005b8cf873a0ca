"""Occluder detection on real media: synthetic occluders with known truth, and clean clips.

    .venv/bin/python bench/bench_occlusion.py [--media ../shared/media] [--frames 120]
        [--clean-frames N] [--no-clean] [--no-synthetic] [--selfie | --selfie-only]

**Synthetic** (:mod:`latentdub.evaluation.occluders`): on the first ``--frames`` frames of a
few clean clips, a microphone bar, a real hand (cut out of latentsync_demo3) and another
person's lower face / cheek are pasted over the mouth on frames 40-80 (entering and leaving the
frame; a third of the clip, so 3 of the 9 reference crops hold it), two seeds each. Per clip and kind, against the pasted truth, in the GRID lattice of the
aligned crop and inside ``blend_zone`` (the only cells the paste-back changes):

* P / R / IoU: cells pooled over all frames (micro), and ``fIoU``: the mean per-frame IoU over
  the frames whose truth covers ≥ ``MIN_CELLS`` cells;
* det: share of those frames with some occluder mask; fa: frames with a mask but no truth;
* flips: state changes of "occluded" and of "passed through" (predicted / truth; the truth's
  pass-through applies the tracker's rule, coverage ≥ 0.6 in, < 0.5 out, to the truth mask);
* ms: the analyzer's cost per frame (all detectors + tracker; decoding and cropping excluded).

**Clean** (every single-face clip listed in :data:`CLEAN`, whole length by default): the share of
usable-face frames with no occluder mask and not passed through (target ≥ 98 %), and ms/frame.

``--selfie``: the same synthetic set again with MediaPipe selfie segmentation added as a detector
(evidence: "not a person" where the references say "person"), to see whether it helps. It did
not (measured on the set above): recall unchanged (bar 0.842, hand 0.943, face 0.302), precision
down (bar 0.90 → 0.57, face 0.99 → 0.71), frames masked with nothing there 2 → 470, +6 ms/frame;
the segmenter counts a microphone held to the mouth, and of course another face, as the person.
So it is not a detector in :mod:`latentdub.occlusion`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.face import Aligner, analyze_video, select_face
from latentdub.media.reader import iter_frames
from latentdub.occlusion.analyzer import FaceOcclusion, default_detectors, reference_indices
from latentdub.occlusion.base import GRID, FaceView, OccluderDetector, blend_zone, mouth_zone
from latentdub.occlusion.tracker import HYSTERESIS, MIN_CELLS, PASS_THROUGH, OccluderFrame

CLEAN = [
    "infinitetalk_hdtf_man_25fps.mp4",
    "retalking_face1_man_vfr.mp4",
    "retalking_face2_man_25fps.mp4",
    "retalking_face3_woman_25fps.mp4",
    "retalking_face4_woman_30fps.mp4",
    "retalking_face5_woman_glasses_25fps.mp4",
    "sadtalker_wda_katiehill_25fps_mpeg4.mp4",
    "liveportrait_d20_man_25fps.mp4",
    "liveportrait_d0_greenscreen_25fps_noaudio.mp4",
    "vexpress_aoc_29.97fps.mp4",
    "vexpress_hdtf_radio10_29.97fps_2s.mp4",
    "latentsync_demo1_portrait_hevc_25fps.mp4",
    "latentsync_demo3_portrait_hevc_30fps.mp4",
    "liveportrait_s32_turned_face_30fps.mp4",
]
SYNTHETIC = [
    "retalking_face3_woman_25fps.mp4",
    "infinitetalk_hdtf_man_25fps.mp4",
    "sadtalker_wda_katiehill_25fps_mpeg4.mp4",
    "liveportrait_d20_man_25fps.mp4",
    "retalking_face5_woman_glasses_25fps.mp4",
    "latentsync_demo1_portrait_hevc_25fps.mp4",
]
KINDS = ("bar", "hand", "face")
SEEDS = (0, 1)
SPAN = (40, 80)  # a minority of the clip: the references are spread over the whole track


# -- running the analyzer -----------------------------------------------------------------------
def analyze(
    frames: Sequence[np.ndarray],
    matrices: np.ndarray,
    valid: np.ndarray,
    tracks: np.ndarray,
    detectors: list[OccluderDetector],
    aligner: Aligner,
) -> tuple[list[OccluderFrame], float]:
    """Drive :class:`FaceOcclusion` over frames held in memory; (settled frames, ms per frame)."""

    def refs(track: int) -> np.ndarray:
        idx = reference_indices(np.flatnonzero(valid & (tracks == track)))
        return aligner.warp_batch([frames[i] for i in idx], matrices[idx])

    fo = FaceOcclusion(detectors, refs)
    out: list[OccluderFrame] = []
    spent = 0.0
    for k, frame in enumerate(frames):
        if not valid[k]:
            out += fo.end()
            continue
        view = FaceView(frame, aligner.warp(frame, matrices[k]), matrices[k], int(tracks[k]))
        t = time.perf_counter()
        out += fo.observe(k, view)
        spent += time.perf_counter() - t
    out += fo.end()
    fo.close()
    return out, 1000.0 * spent / max(1, int(valid.sum()))


def analyze_stream(path: Path, detectors: list[OccluderDetector], aligner: Aligner,
                   max_frames: int | None) -> tuple[list[OccluderFrame], float, int]:
    """A whole clean clip in bounded memory: one pass for the reference crops, one to analyze."""
    sel = select_face(analyze_video(path, max_frames=max_frames), "largest", resolution=aligner.resolution)
    valid, tracks, matrices = sel.valid, sel.track_ids, sel.matrices
    wanted: dict[int, list[int]] = {}
    for t in np.unique(tracks[valid]):
        for i in reference_indices(np.flatnonzero(valid & (tracks == t))):
            wanted.setdefault(int(i), []).append(int(t))
    crops: dict[int, list[np.ndarray]] = {}
    for f in iter_frames(path, stop=max(wanted) + 1 if wanted else 0):
        for t in wanted.get(f.index, []):
            crops.setdefault(t, []).append(aligner.warp(f.image, matrices[f.index]))
    empty = np.zeros((0, aligner.resolution, aligner.resolution, 3), np.uint8)
    fo = FaceOcclusion(detectors, lambda t: np.stack(crops[t]) if t in crops else empty)
    out: list[OccluderFrame] = []
    spent = 0.0
    for f in iter_frames(path, stop=sel.num_frames):
        k = f.index
        if not valid[k]:
            out += fo.end()
            continue
        view = FaceView(f.image, aligner.warp(f.image, matrices[k]), matrices[k], int(tracks[k]))
        t0 = time.perf_counter()
        out += fo.observe(k, view)
        spent += time.perf_counter() - t0
    out += fo.end()
    fo.close()
    return out, 1000.0 * spent / max(1, int(valid.sum())), int(valid.sum())


# -- scoring ------------------------------------------------------------------------------------
def flips(states: np.ndarray) -> int:
    s = np.asarray(states, bool)
    return int((s[1:] != s[:-1]).sum())


def truth_pass_through(coverage: np.ndarray) -> np.ndarray:
    """The tracker's rule (coverage ≥ 0.6 in, < 0.5 out) applied to the truth's coverage."""
    out = np.zeros(len(coverage), bool)
    passing = False
    for k, c in enumerate(coverage):
        passing = c >= (PASS_THROUGH - HYSTERESIS if passing else PASS_THROUGH)
        out[k] = passing
    return out


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    ious: list[float] | None = None
    truth_frames: int = 0
    detected: int = 0
    false_frames: int = 0
    flips_pred: int = 0
    flips_truth: int = 0
    pt_flips_pred: int = 0
    pt_flips_truth: int = 0
    ms: float = 0.0
    runs: int = 0

    def add(self, other: Score) -> None:
        for name in ("tp", "fp", "fn", "truth_frames", "detected", "false_frames", "flips_pred", "flips_truth",
                     "pt_flips_pred", "pt_flips_truth", "runs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ious = (self.ious or []) + (other.ious or [])
        self.ms += other.ms

    def row(self) -> str:
        p = self.tp / max(1, self.tp + self.fp)
        r = self.tp / max(1, self.tp + self.fn)
        iou = self.tp / max(1, self.tp + self.fp + self.fn)
        fiou = float(np.mean(self.ious)) if self.ious else float("nan")
        det = self.detected / max(1, self.truth_frames)
        return (f"P={p:5.3f} R={r:5.3f} IoU={iou:5.3f} fIoU={fiou:5.3f} det={det:5.3f} fa={self.false_frames:3d} "
                f"flips occ {self.flips_pred}/{self.flips_truth} pt {self.pt_flips_pred}/{self.pt_flips_truth} "
                f"{self.ms / max(1, self.runs):5.1f} ms/f")


def score(result: list[OccluderFrame], truth_grid: np.ndarray, valid: np.ndarray, ms: float) -> Score:
    zone = blend_zone(GRID)
    n = len(truth_grid)
    pred = np.zeros((n, GRID, GRID), bool)
    weight = np.ones(n)
    for r in result:
        pred[r.index] = r.mask & zone
        weight[r.index] = r.weight
    truth = truth_grid & zone
    pred, truth = pred[valid], truth[valid]
    s = Score(ms=ms, runs=1, ious=[])
    s.tp = int((pred & truth).sum())
    s.fp = int((pred & ~truth).sum())
    s.fn = int((~pred & truth).sum())
    t_on = truth.sum(axis=(1, 2)) >= MIN_CELLS
    p_on = pred.any(axis=(1, 2))
    for k in np.flatnonzero(t_on):
        s.ious.append(float((pred[k] & truth[k]).sum() / max(1, (pred[k] | truth[k]).sum())))
    s.truth_frames = int(t_on.sum())
    s.detected = int((p_on & t_on).sum())
    s.false_frames = int((p_on & ~truth.any(axis=(1, 2))).sum())
    s.flips_pred, s.flips_truth = flips(p_on), flips(t_on)
    zone_m = mouth_zone(GRID)
    cov = (truth & zone_m).sum(axis=(1, 2)) / zone_m.sum()
    s.pt_flips_pred = flips(weight[valid] <= 0.0)
    s.pt_flips_truth = flips(truth_pass_through(cov))
    return s


# -- the selfie-segmentation experiment ----------------------------------------------------------
class SelfieDetector:
    """Experimental: MediaPipe selfie segmentation on the aligned crop; evidence is "not a person"
    on cells the references call "person" (so the background beside the cheeks is not flagged)."""

    name = "selfie"

    def __init__(self) -> None:
        import mediapipe as mp

        self._seg: Any = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        self._person: dict[int, np.ndarray] = {}

    def _prob(self, crop: np.ndarray) -> np.ndarray:
        import cv2

        m = self._seg.process(np.ascontiguousarray(crop)).segmentation_mask
        return cv2.resize(m, (GRID, GRID), interpolation=cv2.INTER_AREA)

    def start_track(self, track: int, references: np.ndarray) -> None:
        if len(references):
            self._person[track] = np.median(np.stack([self._prob(c) for c in references]), axis=0) >= 0.5

    def detect(self, view: FaceView) -> np.ndarray:
        person = self._person.get(view.track)
        if person is None:
            return np.zeros((GRID, GRID), np.float32)
        ev = np.clip((0.5 - self._prob(view.crop)) * 4.0, 0.0, 1.0)  # p < 0.25 → 1
        ev[~person] = 0.0
        return ev.astype(np.float32)

    def close(self) -> None:
        self._seg.close()


# -- main ---------------------------------------------------------------------------------------
def synthetic(media: Path, frames: int, make: Callable[[], list[OccluderDetector]], label: str) -> None:
    from latentdub.evaluation.occluders import OccluderSpec, build_clip, load_clip

    aligner = Aligner(256)
    totals = {k: Score(ious=[]) for k in KINDS}
    print(f"\n== synthetic occluders ({label}), frames {SPAN[0]}-{SPAN[1]} of the first {frames} ==")
    for i, name in enumerate(SYNTHETIC):
        clip = load_clip(media / name, max_frames=frames)
        for kind in KINDS:
            per = Score(ious=[])
            for seed in SEEDS:
                spec = OccluderSpec(kind, SPAN[0], SPAN[1], seed=seed + 10 * i)
                syn = build_clip(clip.frames, clip.matrices, spec, media_dir=media, valid=clip.valid, target=name)
                res, ms = analyze(syn.frames, clip.matrices, clip.valid, clip.tracks, make(), aligner)
                per.add(score(res, syn.truth_grid, clip.valid, ms))
            totals[kind].add(per)
            print(f"{name[:38]:38s} {kind:4s} {per.row()}")
        del clip
    for kind in KINDS:
        print(f"{'ALL':38s} {kind:4s} {totals[kind].row()}")


def clean(media: Path, max_frames: int | None, make: Callable[[], list[OccluderDetector]]) -> None:
    aligner = Aligner(256)
    print("\n== clean clips: usable-face frames with no occluder mask and not passed through (target ≥ 98 %) ==")
    worst = 1.0
    for name in CLEAN:
        path = media / name
        if not path.exists():
            print(f"{name:46s} missing")
            continue
        res, ms, usable = analyze_stream(path, make(), aligner, max_frames)
        ok = np.array([not r.occluded and r.weight >= 1.0 for r in res], bool)
        share = float(ok.mean()) if len(ok) else 1.0
        worst = min(worst, share)
        bad = [r.index for r in res if r.occluded or r.weight < 1.0]
        cells = max((int(r.mask.sum()) for r in res), default=0)
        print(f"{name:46s} {usable:4d} frames  clean {100 * share:6.2f} %  max cells {cells:4d}  "
              f"{ms:5.1f} ms/f  flagged {bad[:8]}{' …' if len(bad) > 8 else ''}")
    print(f"worst clean share: {100 * worst:.2f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "media")
    ap.add_argument("--frames", type=int, default=120, help="frames per synthetic clip")
    ap.add_argument("--clean-frames", type=int, default=None, help="cap on frames per clean clip")
    ap.add_argument("--no-clean", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--selfie", action="store_true", help="also run with selfie segmentation added")
    ap.add_argument("--selfie-only", action="store_true", help="only the runs with selfie segmentation")
    args = ap.parse_args()
    args.selfie |= args.selfie_only
    if not args.no_synthetic:
        if not args.selfie_only:
            synthetic(args.media, args.frames, default_detectors, "default detectors")
        if args.selfie:
            synthetic(args.media, args.frames, lambda: [*default_detectors(), SelfieDetector()],
                      "default + selfie segmentation")
    if not args.no_clean:
        if not args.selfie_only:
            clean(args.media, args.clean_frames, default_detectors)
        if args.selfie:
            print("(with selfie segmentation)")
            clean(args.media, args.clean_frames, lambda: [*default_detectors(), SelfieDetector()])


if __name__ == "__main__":
    main()
