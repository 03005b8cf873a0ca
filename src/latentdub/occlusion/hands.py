"""Hands in front of the face: MediaPipe Hands (the model ships in the mediapipe wheel).

Hands run on a square of the frame around the aligned crop (1.6x its size, so a hand reaching
in is seen before it covers the mouth), scaled to at most :data:`MAX_SIDE` px. In tracking mode
(``static_image_mode=False``) the palm detector only runs while fewer hands than
``max_num_hands`` are tracked, so a hand that stays costs one landmark pass per frame. The 21
landmarks of each hand are mapped into the crop, their convex hull is grown by a finger's
width (a hull spans the gaps between spread fingers: the safe side) and filled on the grid.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from latentdub.face.alignment import apply_affine, invert_affine
from latentdub.occlusion.base import GRID, FaceView

MAX_SIDE = 256
CONTEXT = 1.6  # the square around the crop that hands are searched in, in crop sizes
FINGER = 0.12  # hull growth, as a share of the hand's size (a finger's width)
# Palm detection and landmark presence, and the model size. The light model at 0.5 or 0.7 sees
# "hands" in talking faces (infinitetalk_hdtf_man frames 53-63, sadtalker_wda_katiehill frames
# 133-140, tracked on for up to 10 frames: 94.5 % clean frames there); the full model at 0.5
# in retalking_face2 (93.6 %) and costs ~3 ms/frame more. The light model at 0.8 finds none on
# the clean clips of shared/media and still most of the pasted real hands (bench/bench_occlusion.py),
# though it loses some hands that 0.7 keeps.
MIN_CONFIDENCE = 0.8
COMPLEXITY = 0


class HandDetector:
    """:class:`~latentdub.occlusion.base.OccluderDetector` for hands (MediaPipe Hands, offline)."""

    name = "hands"
    keep_as_found = True  # landmarks are evidence enough: a hand is never voted away

    def __init__(self, *, min_confidence: float = MIN_CONFIDENCE, complexity: int = COMPLEXITY) -> None:
        self.min_confidence = min_confidence
        self.complexity = complexity
        self._hands: Any = None
        self.found = 0  # frames on which a hand was found (for reports)

    def _model(self) -> Any:
        if self._hands is None:
            import mediapipe as mp

            from latentdub.face.backend import _quiet_native_stderr

            with _quiet_native_stderr():
                self._hands = mp.solutions.hands.Hands(
                    static_image_mode=False,
                    max_num_hands=2,
                    model_complexity=self.complexity,
                    min_detection_confidence=self.min_confidence,
                    min_tracking_confidence=self.min_confidence,
                )
        return self._hands

    def start_track(self, track: int, references: np.ndarray) -> None:
        self.close()  # tracking state must not carry over to another face or shot

    def detect(self, view: FaceView) -> np.ndarray:
        out = np.zeros((GRID, GRID), np.float32)
        hands = self.landmarks(view)
        if not hands:
            return out
        self.found += 1
        scale = GRID / view.resolution
        for pts in hands:
            crop_pts = apply_affine(view.matrix, pts) * scale
            hull = cv2.convexHull(np.round(crop_pts * 16).astype(np.int32))
            size = float(np.ptp(crop_pts, axis=0).max())
            mask = np.zeros((GRID, GRID), np.uint8)
            cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
            r = max(1, round(FINGER * size))
            mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
            out = np.maximum(out, mask.astype(np.float32))
        return out

    def landmarks(self, view: FaceView) -> list[np.ndarray]:
        """Each hand's 21 landmarks (21, 2) in frame pixels, for hands near this face."""
        h, w = view.frame.shape[:2]
        res = view.resolution
        inv = invert_affine(view.matrix)
        corners = apply_affine(inv, np.array([[0, 0], [res, 0], [0, res], [res, res]], np.float64))
        cx, cy = corners.mean(axis=0)
        side = CONTEXT * float(np.ptp(corners, axis=0).max())
        x0, y0 = int(max(0, np.floor(cx - side / 2))), int(max(0, np.floor(cy - side / 2)))
        x1, y1 = int(min(w, np.ceil(cx + side / 2))), int(min(h, np.ceil(cy + side / 2)))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return []
        region = view.frame[y0:y1, x0:x1]
        f = min(1.0, MAX_SIDE / max(region.shape[:2]))
        if f < 1.0:
            region = cv2.resize(region, (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f))),
                                interpolation=cv2.INTER_AREA)
        result = self._model().process(np.ascontiguousarray(region))
        found = getattr(result, "multi_hand_landmarks", None) or []
        rh, rw = region.shape[:2]
        hands = []
        for lm in found:
            pts = np.array([[p.x * rw, p.y * rh] for p in lm.landmark], np.float64)
            hands.append(pts / f + (x0, y0))
        return hands

    def close(self) -> None:
        if self._hands is not None:
            self._hands.close()
            self._hands = None
