"""The lip aperture: how far the mouth is open, from Face Mesh landmarks (scale-free).

A leaf module: pass 1 (``framepass``) records it per face per frame, and the active-speaker
detector (``speakers``) reads it back.
"""

from __future__ import annotations

import math

import numpy as np

# MediaPipe Face Mesh (468 points) inner-lip contour, from FACEMESH_LIPS in mediapipe's
# python/solutions/face_mesh_connections.py: upper inner lip 78-191-80-81-82-13-312-311-310-415-308,
# lower inner lip 78-95-88-178-87-14-317-402-318-324-308. The three central vertical pairs
# (82/87, 13/14, 312/317) measure the opening; averaging them tolerates one noisy point.
MP_INNER_LIP_PAIRS: tuple[tuple[int, int], ...] = ((82, 87), (13, 14), (312, 317))
# Outer eye corners (33 image-left, 263 image-right; the points MediaPipe's own face geometry
# and the usual eye-aspect-ratio code use): the inter-ocular distance does not change while
# speaking, unlike the mouth width, so it is the face-size normaliser.
MP_EYE_OUTER: tuple[int, int] = (33, 263)


# The eight points lip_aperture reads, in one index array: one gather per call.
_POINTS = np.array([i for pair in MP_INNER_LIP_PAIRS for i in pair] + list(MP_EYE_OUTER))


def lip_aperture(landmarks: np.ndarray) -> float:
    """Inner-lip opening / inter-ocular distance from Face Mesh landmarks (≥468, ≥2 columns).

    About 0 with the lips closed, ~0.1-0.4 when speaking; scale-free, so faces of any size
    compare. NaN for a degenerate face. Pass 1 calls it on every face of every frame, so it
    gathers the eight points once and does scalar arithmetic (a few µs).
    """
    p = np.asarray(landmarks, dtype=np.float64)[_POINTS, :2].tolist()
    pairs = len(MP_INNER_LIP_PAIRS)
    opening = sum(
        math.hypot(p[2 * j + 1][0] - p[2 * j][0], p[2 * j + 1][1] - p[2 * j][1])
        for j in range(pairs)
    )
    (lx, ly), (rx, ry) = p[2 * pairs], p[2 * pairs + 1]
    eyes = math.hypot(rx - lx, ry - ly)
    return opening / pairs / eyes if eyes > 1e-6 else math.nan
