"""Where the watermark sits in a frame: the detector's geometry search.

A crop, a letterbox or pillarbox, a flip, a small rotation or a shift of a few pixels moves the
chip grid away from where the embedder put it. The detector therefore does not assume the grid,
it looks for it:

1. **Per frame** (:func:`frame_signs`): luma resized with ONE factor (the pixel aspect is kept)
   so that the short side has :data:`WORK_CELL` pixels per chip of the grid, Laplacian of
   Gaussian, then the sign of every pixel. The signs are summed over the frames (the geometry is
   the same all through a clip, so one search serves every frame). Signs: the heavy-tailed
   picture residue at edges cannot outvote the rest.
2. **Whitening** (:func:`whiten`): the sum is divided by its local RMS, so static busy texture
   (the same sign every frame) weighs no more than flat areas where the mark dominates.
3. **Search** (:func:`search`), at half that resolution (~2 pixels per chip): the image is
   FFT-correlated, over all offsets at once, with the template of the *known* chips (the 48 coded
   bits every mark shares; the other chips are 0) rendered at each candidate content size.
   Candidates (:func:`_candidates`, ~75 per grid): uniform scales 0.97-1.30 in 1 % steps
   (crops of up to ~12 % per side, with or without a resize back, zooms), the content
   rectangles of letterbox / pillarbox of the usual aspect ratios into this frame, mirrored at
   scales 0.98-1.06, rotated by ±1, ±2, ±3 degrees at scales 1.00-1.06. The correlation is
   circular over one frame-sized period (the template is folded onto it; what wraps round adds
   noise, not signal). Each map is divided by the expected spread at each offset (the
   template's overlap with the frame) and by its own robust spread over offsets; the best offset
   of each candidate is kept.
4. **Exact score** (:func:`read_chips`, :func:`refine`): the best :data:`TOP_K` of each grid go
   back to the full-resolution image; the chips are read at that geometry (and ±1 pixel around
   it) and scored exactly as at identity, ``Σ s·a / sqrt(Σ a²)`` over the known chips; around
   the best one, ±0.5° of rotation and ±0.5 % of scale are tried too. That z-score is what the
   decision uses.

The number of positions tried (offsets x candidates x two grids) is what the search threshold
(:data:`latentdub.provenance.watermark.Z_SEARCH`) pays for; ``bench/bench_watermark_geometry.py``
measures the null distribution of the searched score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import scipy.fft as sfft

WORK_CELL = 4  # work-image pixels per chip along the frame's short side (identity geometry)
SEARCH_DOWN = 2  # the correlation search runs at 1/2 of the work resolution
LOG_SIGMA = 1.25  # Gaussian before the Laplacian, work pixels
WHITEN_CHIPS = 4.0  # whitening: Gaussian sigma of the local RMS, in chips
UNIFORM_SCALES = tuple(round(1.01**k, 5) for k in range(-3, 27))  # 0.97 .. 1.30
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 5 / 4, 4 / 5, 1.85, 2.0, 0.5, 2.39)
ROTATIONS = (-3.0, -2.0, -1.0, 1.0, 2.0, 3.0)  # degrees
ROTATION_SCALES = (1.0, 1.02, 1.04, 1.06)
MIRROR_SCALES = tuple(round(1.01**k, 5) for k in range(-2, 7))  # 0.98 .. 1.06, flipped
MIN_OVERLAP = 0.5  # offsets where less of the template than this lies inside the frame: skipped
TOP_K = 4  # candidates scored exactly, per grid


@dataclass(frozen=True)
class Geometry:
    """Where the embedded chip grid lies in the observed frame.

    The content (the frame as it was marked) is a rectangle ``scale_x`` x ``scale_y`` times the
    frame's size whose top-left corner is at ``offset_x``, ``offset_y`` (fractions of the frame;
    negative where a crop removed part of it), after undoing ``mirrored`` (a horizontal flip)
    and ``rotation_deg`` (about the frame's centre). Identity: 1, 1, 0, 0, no flip, 0°.
    """

    grid: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    mirrored: bool = False
    rotation_deg: float = 0.0

    @property
    def identity(self) -> bool:
        return (
            not self.mirrored
            and self.rotation_deg == 0.0
            and abs(self.scale_x - 1) < 1e-9
            and abs(self.scale_y - 1) < 1e-9
            and self.offset_x == 0.0
            and self.offset_y == 0.0
        )

    def to_dict(self) -> dict[str, float | int | bool]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def work_size(width: int, height: int, grid: int) -> tuple[int, int]:
    """(w, h) of the work image: one factor, short side = grid x WORK_CELL."""
    f = grid * WORK_CELL / min(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def frame_signs(gray: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(the frame at ``size``, sign of its negative LoG there as float32 -1/0/+1)."""
    h, w = gray.shape
    if (w, h) != size:
        interp = cv2.INTER_AREA if size[0] <= w and size[1] <= h else cv2.INTER_LINEAR
        gray = cv2.resize(gray, size, interpolation=interp)
    log = cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), LOG_SIGMA), cv2.CV_32F, ksize=3)
    # The embedded field's chips are positive bumps: the negative Laplacian peaks on them.
    return gray, np.sign(-log)


def whiten(acc: np.ndarray, grid: int) -> np.ndarray:
    """The accumulated signs over their local RMS (exact zeros, e.g. black bars, stay 0)."""
    sigma = WHITEN_CHIPS * min(acc.shape) / grid
    energy = cv2.GaussianBlur(acc * acc, (0, 0), sigma)
    return (acc / np.sqrt(np.maximum(energy, 1e-6))).astype(np.float32)


# -- geometry as affine maps (continuous coordinates: pixel i covers [i, i + 1)) -----------------
_TO_CONT = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])  # index -> continuous
_TO_INDEX = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])


def _inv(m: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 affine map (closed form: np.linalg.inv costs ~10 ms a call on a busy
    machine, through the BLAS threads)."""
    a, b, c, d = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
    det = a * d - b * c
    r = np.array([[d, -b], [-c, a]]) / det
    out = np.eye(3)
    out[:2, :2] = r
    out[:2, 2] = -r @ m[:2, 2]
    return out


def _undo(width: float, height: float, mirrored: bool, rotation_deg: float) -> np.ndarray:
    """3x3 map from observed-frame coordinates to coordinates where the edit is undone."""
    m = np.eye(3)
    if mirrored:
        m = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    if rotation_deg:
        t = math.radians(rotation_deg)
        c, s = math.cos(t), math.sin(t)
        cx, cy = width / 2, height / 2
        rot = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1.0]])
        m = rot @ m
    return m


def chip_to_frame(geom: Geometry, width: int, height: int) -> np.ndarray:
    """3x3 map from chip coordinates (u, v in [0, grid)) to continuous frame coordinates."""
    g = geom.grid
    content = np.array(
        [
            [geom.scale_x * width / g, 0.0, geom.offset_x * width],
            [0.0, geom.scale_y * height / g, geom.offset_y * height],
            [0.0, 0.0, 1.0],
        ]
    )
    return _inv(_undo(width, height, geom.mirrored, geom.rotation_deg)) @ content


def read_chips(img: np.ndarray, geom: Geometry) -> np.ndarray:
    """(grid²,) mean of ``img`` over each chip at geometry ``geom`` (0 outside the frame)."""
    h, w = img.shape
    g = geom.grid
    rx = min(4, max(1, round(geom.scale_x * w / g)))
    ry = min(4, max(1, round(geom.scale_y * h / g)))
    dst_to_chip = np.array([[1 / rx, 0.0, 0.5 / rx], [0.0, 1 / ry, 0.5 / ry], [0.0, 0.0, 1.0]])
    m = _TO_INDEX @ chip_to_frame(geom, w, h) @ dst_to_chip
    warped = cv2.warpAffine(
        img,
        m[:2].astype(np.float64),
        (g * rx, g * ry),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return cv2.resize(warped, (g, g), interpolation=cv2.INTER_AREA).ravel()


def known_z(chips: np.ndarray, known_chips: np.ndarray, known_sign: np.ndarray) -> float:
    """``Σ s·a / sqrt(Σ a²)`` over the known chips: ≈ N(0, 1) where this key left no mark."""
    a = chips[known_chips].astype(np.float64)
    norm = math.sqrt(float(np.dot(a, a)))
    return float(np.dot(a, known_sign) / norm) if norm > 0 else 0.0


# -- the search -----------------------------------------------------------------------------------
def _candidates(width: int, height: int) -> list[tuple[float, float, bool, float]]:
    """(scale_x, scale_y, mirrored, rotation_deg) to try (every offset of each is tried)."""
    sizes = {(s, s) for s in UNIFORM_SCALES} | {(1.0, 1.0)}
    r = width / height
    for a in ASPECTS:  # the content, of aspect a, fitted into this frame
        sx, sy = (1.0, r / a) if a >= r else (a / r, 1.0)
        if min(sx, sy) < 0.97:
            sizes.add((round(sx, 5), round(sy, 5)))
    out = [(sx, sy, False, 0.0) for sx, sy in sorted(sizes)]
    out += [(s, s, True, 0.0) for s in MIRROR_SCALES]
    out += [(s, s, False, rot) for rot in ROTATIONS for s in ROTATION_SCALES]
    return out


def _overlap(n: int, size: int, tlen: int) -> np.ndarray:
    """For every circular offset o in [0, n): how many of the template's tlen samples that
    start at o (mod n) land on the image's [0, size)."""
    inside = np.zeros(n)
    inside[:size] = 1.0
    cs = np.concatenate([[0.0], np.cumsum(np.tile(inside, 2 + tlen // n))])
    o = np.arange(n)
    return cs[o + tlen] - cs[o]


def _unwrap(o: int, n: int, size: int, tlen: int) -> int:
    """The circular offset ``o`` (period ``n``) as the signed offset, o or o - n, whose
    template [o, o + tlen) overlaps the image [0, size) most."""

    def inside(a: int) -> int:
        return max(0, min(size, a + tlen) - max(0, a))

    return o if inside(o) >= inside(o - n) else o - n


def search(
    img: np.ndarray, known: np.ndarray, *, top_k: int = TOP_K
) -> list[tuple[float, Geometry]]:
    """The ``top_k`` best geometries by approximate z (best first) for the whitened work image
    ``img`` and the grid x grid template ``known`` (expected sign on known chips, else 0)."""
    g = known.shape[0]
    h, w = img.shape
    ws, hs = max(8, round(w / SEARCH_DOWN)), max(8, round(h / SEARCH_DOWN))
    small = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
    # Circular correlation over a frame-sized period: template parts beyond it wrap round and
    # add noise, not signal (the exact score in stage 2 does not wrap).
    px = sfft.next_fast_len(ws + 2, real=True)
    py = sfft.next_fast_len(hs + 2, real=True)
    cands = _candidates(w, h)
    spectra: dict[tuple[bool, float], np.ndarray] = {}
    for _, _, mirrored, rot in cands:
        if (mirrored, rot) in spectra:
            continue
        m = _TO_INDEX @ _undo(ws, hs, mirrored, rot) @ _TO_CONT
        var = cv2.warpAffine(small, m[:2], (ws, hs), flags=cv2.INTER_LINEAR, borderValue=0.0)
        pad = np.zeros((py, px), np.float32)
        pad[:hs, :ws] = var
        spectra[(mirrored, rot)] = sfft.rfft2(pad)
    results: list[tuple[float, Geometry]] = []
    by_size: dict[tuple[float, float], list[tuple[bool, float]]] = {}
    for sx, sy, mirrored, rot in cands:
        by_size.setdefault((sx, sy), []).append((mirrored, rot))
    for (sx, sy), variants in by_size.items():
        tw, th = max(1, round(sx * ws)), max(1, round(sy * hs))
        tmpl = cv2.resize(known, (tw, th), interpolation=cv2.INTER_NEAREST)
        ky, kx = -(-th // py), -(-tw // px)
        pad = np.zeros((ky * py, kx * px), np.float32)
        pad[:th, :tw] = tmpl
        pad = pad.reshape(ky, py, kx, px).sum(axis=(0, 2))  # folded onto one period
        ft = np.conj(sfft.rfft2(pad))
        density = float(np.mean(tmpl != 0))
        ov = _overlap(py, hs, th)[:, None] * _overlap(px, ws, tw)[None, :]
        valid = ov >= MIN_OVERLAP * tw * th
        inv_norm = np.where(valid, 1.0 / np.sqrt(np.maximum(density * ov, 1e-9)), 0.0)
        inv_norm = inv_norm.astype(np.float32)
        sub = valid[::3, ::3]
        for mirrored, rot in variants:
            z = sfft.irfft2(spectra[(mirrored, rot)] * ft, s=(py, px))
            z *= inv_norm
            spread = 1.4826 * float(np.median(np.abs(z[::3, ::3][sub])))
            if spread <= 0:
                continue
            k = int(np.argmax(z))
            oy, ox = divmod(k, px)
            ox, oy = _unwrap(ox, px, ws, tw), _unwrap(oy, py, hs, th)
            geom = Geometry(
                grid=g,
                scale_x=tw / ws,
                scale_y=th / hs,
                offset_x=ox / ws,
                offset_y=oy / hs,
                mirrored=mirrored,
                rotation_deg=rot,
            )
            results.append((float(z.flat[k]) / spread, geom))
    results.sort(key=lambda r: -r[0])
    return results[:top_k]


def _moved(
    geom: Geometry, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, rot: float = 0.0
) -> Geometry:
    """``geom`` shifted by (dx, dy) (fractions of the frame), scaled about the content's centre
    and rotated by ``rot`` more degrees."""
    sx, sy = geom.scale_x * scale, geom.scale_y * scale
    return Geometry(
        geom.grid,
        sx,
        sy,
        geom.offset_x + dx + (geom.scale_x - sx) / 2,
        geom.offset_y + dy + (geom.scale_y - sy) / 2,
        geom.mirrored,
        geom.rotation_deg + rot,
    )


def refine(
    img: np.ndarray, geom: Geometry, score: Callable[[np.ndarray], float], *, wide: bool = False
) -> tuple[float, Geometry]:
    """The best exact score at ``geom`` and at ±1 work pixel around it; ``wide``: also ±0.5°
    of rotation and ±0.5 % of scale (each with its own ±1 pixel)."""
    h, w = img.shape

    def around(g: Geometry) -> tuple[float, Geometry]:
        best = (score(read_chips(img, g)), g)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dx or dy:
                    cand = _moved(g, dx / w, dy / h)
                    z = score(read_chips(img, cand))
                    if z > best[0]:
                        best = (z, cand)
        return best

    best = around(geom)
    if wide:
        for kw in ({"rot": -0.5}, {"rot": 0.5}, {"scale": 0.995}, {"scale": 1.005}):
            z, g = around(_moved(best[1], **kw))  # type: ignore[arg-type]
            if z > best[0]:
                best = (z, g)
    return best
