"""Synthetic occlusion clips with known truth, built from real media (the occlusion bench and tests).

A clean clip, its per-frame aligned matrices (``select_face(analyze_video(path), "largest",
resolution=256).matrices``) and an :class:`OccluderSpec` go in; the clip comes out with a real
occluder pasted over the mouth on the spec's frames, plus where it is:

* ``truth_grid``: (N, GRID, GRID) bool in the aligned crop's occluder lattice
  (:data:`~latentdub.occlusion.base.GRID`): a cell is covered when the occluder's alpha covers at
  least half of it (the part of the occluder outside the frame does not count: it is not there);
* ``truth_frame``: the same in frame pixels (alpha ≥ 0.5), kept as a box and a mask per occluded
  frame (a full-frame bool per frame would be 2 MB at 1080x1920).

Occluders (:data:`KINDS`):

* ``"bar"``: a microphone: a shaded cylinder (dark or metallic, a specular stripe) with a round,
  meshed head over the mouth, vertical or diagonal; the stick runs out of the frame;
* ``"hand"``: a real hand cut out of ``latentsync_demo3_portrait_hevc_30fps.mp4`` (MediaPipe
  Hands landmarks on fixed frames; the alpha is their convex hull grown by a finger's width,
  lightly feathered), scaled to the target face (its landmark extent 0.5-0.75 of the 256 crop);
* ``"face"``: another person's lower face or cheek, cut as a feathered ellipse from the aligned
  crop of a second clip.

Each occluder enters from outside the frame (fully out one frame before ``start``), moves over
the mouth, wobbles there (a slow sinusoid, a few crop px) and leaves the frame again by
``stop``. Everything is drawn in the sprite's own pixels at twice the crop's scale and put in
the frame with one affine warp per frame (sprite → crop → frame), so it follows the head.
All randomness comes from ``OccluderSpec.seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from latentdub.face.alignment import apply_affine, invert_affine
from latentdub.occlusion.base import GRID, mouth_zone

KINDS = ("bar", "hand", "face")

#: The real hands: (frame of latentsync_demo3, which hand by its left-to-right order).
HAND_SOURCE = "latentsync_demo3_portrait_hevc_30fps.mp4"
HAND_FRAMES: tuple[tuple[int, int], ...] = ((40, 0), (40, 1), (60, 1), (100, 0), (100, 1), (0, 0))
#: Clips another face is cut from (the first one that is not the target clip is used by default).
FACE_SOURCES = (
    "retalking_face2_man_25fps.mp4",
    "liveportrait_d20_man_25fps.mp4",
    "retalking_face3_woman_25fps.mp4",
)

SS = 2.0  # sprite px per crop px: drawn at twice the crop scale so a large face stays sharp
MOUTH = np.array([128.0, 178.0])  # the lips' centre in the 256 crop (base._LIPS_256)


@dataclass(frozen=True)
class OccluderSpec:
    """One occluder over one clip: what, when, and the seed for everything else."""

    kind: str  # one of KINDS
    start: int  # first frame the occluder is (partly) in the frame
    stop: int  # first frame after it has left
    seed: int = 0
    enter: int = 8  # frames spent travelling in from outside the frame (and out again)
    size: float = 1.0  # scale on the kind's seeded size
    source: str | None = None  # "face": the clip to cut the other face from (a name in media_dir)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.stop <= self.start:
            raise ValueError(f"empty occluder span {self.start}..{self.stop}")


@dataclass
class Sprite:
    """An occluder image: RGB, alpha, and where it sits over the mouth (all in sprite px)."""

    rgb: np.ndarray  # (h, w, 3) uint8
    alpha: np.ndarray  # (h, w) float32 in [0, 1]
    anchor: np.ndarray  # (2,) sprite px placed at the target point
    scale: float = 1.0 / SS  # crop px per sprite px

    @property
    def radius(self) -> float:
        """Largest distance (crop px) from the anchor to an opaque pixel."""
        ys, xs = np.nonzero(self.alpha > 0.01)
        if len(xs) == 0:
            return 0.0
        return float(np.hypot(xs - self.anchor[0], ys - self.anchor[1]).max()) * self.scale


@dataclass
class FrameMask:
    """A bool mask in frame px, kept as its bounding box."""

    x0: int
    y0: int
    mask: np.ndarray  # (h, w) bool

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(shape[:2], bool)
        h, w = self.mask.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.mask
        return out


@dataclass
class SyntheticClip:
    """Frames with an occluder pasted in, and where it is."""

    frames: list[np.ndarray]
    truth_grid: np.ndarray  # (N, GRID, GRID) bool, aligned crop space
    truth_frame: list[FrameMask | None]  # per frame, None where nothing was pasted
    spec: OccluderSpec
    matrices: np.ndarray  # (N, 2, 3) the matrices the truth is in
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # truth share of mouth_zone

    def __len__(self) -> int:
        return len(self.frames)


# -- sprites ------------------------------------------------------------------------------------
def bar_sprite(rng: np.random.Generator, size: float = 1.0) -> Sprite:
    """A microphone: a shaded stick with a round meshed head, head centre as the anchor, the
    stick pointing down (+y) in sprite px; long enough to leave any frame."""
    r = rng.uniform(17.0, 25.0) * size * SS  # head radius
    w = r * rng.uniform(0.38, 0.55)  # stick half-width
    length = 1800.0 * SS * size  # crop px: a small face in a tall portrait frame is ~1/8 of it
    base = rng.uniform(30.0, 95.0)  # dark to mid metal
    tint = np.array([1.0, 1.0, rng.uniform(1.0, 1.15)])  # a faint cold tint
    pad = 3
    width = int(np.ceil(2 * r)) + 2 * pad
    height = int(np.ceil(r + length)) + 2 * pad
    cx, cy = width / 2.0, r + pad
    xs = np.arange(width, dtype=np.float32) + 0.5 - cx
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy
    # Stick: a cylinder lit from the upper left: Lambert across its width plus a narrow highlight.
    t = np.clip(xs / w, -1.0, 1.0)
    across = 0.5 + 0.5 * np.sqrt(1.0 - t**2) + 0.9 * np.exp(-(((t + 0.35) / 0.12) ** 2))
    stick_a = np.clip(w + 0.5 - np.abs(xs), 0.0, 1.0)[None, :] * (ys >= 0)
    stick = np.broadcast_to(base * across[None, :], (height, width))
    # Head: a sphere with a mesh grille (darker lines every ~4 crop px).
    d = np.hypot(xs[None, :], ys)
    nz = np.sqrt(np.clip(1.0 - (d / r) ** 2, 0.0, 1.0))
    glint = np.exp(-((np.hypot(xs[None, :] + 0.35 * r, ys + 0.35 * r) / (0.25 * r)) ** 2))
    grille = 0.75 + 0.25 * ((((xs[None, :] + 1000) // (4 * SS)) + ((ys + 1000) // (4 * SS))) % 2)
    head = (base * 1.1) * (0.45 + 0.55 * nz) * grille + 120.0 * glint
    head_a = np.clip(r + 0.5 - d, 0.0, 1.0)
    alpha = np.maximum(stick_a, head_a).astype(np.float32)
    lum = np.where(head_a > 0, head, stick)
    rgb = np.clip(lum[..., None] * tint, 0, 255).astype(np.uint8)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.6)  # a real edge is never a hard step
    return Sprite(rgb, alpha, np.array([cx, cy]))


@lru_cache(maxsize=2)
def _hand_library(path: str) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Real hands of :data:`HAND_FRAMES`: (rgb patch, alpha, landmarks in patch px) each."""
    import mediapipe as mp

    from latentdub.face.backend import _quiet_native_stderr
    from latentdub.media.reader import iter_frames

    wanted = {f for f, _ in HAND_FRAMES}
    frames = {f.index: f.image for f in iter_frames(path, stop=max(wanted) + 1) if f.index in wanted}
    out = []
    with _quiet_native_stderr():
        model = mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2, model_complexity=1,
                                         min_detection_confidence=0.5)
    try:
        for index, which in HAND_FRAMES:
            img = frames[index]
            h, w = img.shape[:2]
            res = model.process(img)
            hands = [np.array([[p.x * w, p.y * h] for p in lm.landmark]) for lm in res.multi_hand_landmarks or []]
            hands.sort(key=lambda p: float(p[:, 0].mean()))
            if which >= len(hands):
                continue
            pts = hands[which]
            size = float(np.ptp(pts, axis=0).max())
            grow = max(2, round(0.12 * size))  # a finger's width: the hull's edge runs through the fingers' axes
            x0, y0 = np.floor(pts.min(0)).astype(int) - grow - 2
            x1, y1 = np.ceil(pts.max(0)).astype(int) + grow + 3
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            local = pts - (x0, y0)
            alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillConvexPoly(alpha, cv2.convexHull(np.round(local).astype(np.int32)), 255)
            alpha = cv2.dilate(alpha, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
            a = cv2.GaussianBlur(alpha.astype(np.float32) / 255.0, (0, 0), 1.5)
            out.append((img[y0:y1, x0:x1].copy(), a, local))
    finally:
        model.close()
    if not out:
        raise RuntimeError(f"no hand found in {path}")
    return tuple(out)


def hand_sprite(rng: np.random.Generator, media_dir: Path, size: float = 1.0) -> Sprite:
    """A real hand from :data:`HAND_SOURCE`, its landmark extent 0.5-0.75 of the 256 crop,
    maybe mirrored, anchored a little above its landmarks' centre (the fingers over the lips)."""
    library = _hand_library(str(media_dir / HAND_SOURCE))
    rgb, alpha, pts = library[int(rng.integers(len(library)))]
    extent = float(np.ptp(pts, axis=0).max())
    target = rng.uniform(0.5, 0.75) * 256.0 * size * SS
    f = target / extent
    rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                     interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    alpha = cv2.resize(alpha, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    pts = pts * f
    if rng.random() < 0.5:
        rgb, alpha = rgb[:, ::-1].copy(), alpha[:, ::-1].copy()
        pts = pts * (-1, 1) + (rgb.shape[1], 0)
    anchor = pts.mean(axis=0) + np.array([0.0, -0.1 * target])
    return Sprite(np.ascontiguousarray(rgb), np.ascontiguousarray(alpha, dtype=np.float32), anchor)


def face_sprite(rng: np.random.Generator, media_dir: Path, source: str, size: float = 1.0) -> Sprite:
    """Another person's lower face (mouth and chin) or one cheek, a feathered ellipse cut from
    the aligned crop of ``source`` on a seeded frame of its first 50."""
    from latentdub.face import Aligner, analyze_video, select_face
    from latentdub.media.reader import iter_frames

    path = media_dir / source
    frame_index = int(rng.integers(0, 50))
    sel = select_face(analyze_video(path, max_frames=frame_index + 1, workers=1), "largest", resolution=256)
    if not sel.valid[frame_index]:
        raise RuntimeError(f"no face on frame {frame_index} of {source}")
    image = next(iter(iter_frames(path, start=frame_index, stop=frame_index + 1))).image
    big = Aligner(512).warp(image, sel.matrices[frame_index] * 2.0)  # the 256 crop at SS=2
    if rng.random() < 0.5:  # lower face: lips and chin
        centre, axes = np.array([128.0, 190.0]), np.array([78.0, 52.0])
    else:  # a cheek, one side
        side = -1.0 if rng.random() < 0.5 else 1.0
        centre, axes = np.array([128.0 + side * 55.0, 165.0]), np.array([52.0, 62.0])
    axes = axes * rng.uniform(0.85, 1.1)
    c, ax = centre * SS, axes * SS
    x0, y0 = np.floor(c - ax - 4).astype(int).clip(0, 512)
    x1, y1 = np.ceil(c + ax + 4).astype(int).clip(0, 512)
    rgb = big[y0:y1, x0:x1]
    alpha = np.zeros(rgb.shape[:2], np.float32)
    cv2.ellipse(alpha, (round(c[0] - x0), round(c[1] - y0)), (round(ax[0]), round(ax[1])), 0, 0, 360, 1.0, -1,
                cv2.LINE_AA)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 2.0 * SS)  # a soft, out-of-focus edge
    if size != 1.0:
        rgb = cv2.resize(rgb, None, fx=size, fy=size, interpolation=cv2.INTER_LINEAR)
        alpha = cv2.resize(alpha, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    anchor = np.array([c[0] - x0, c[1] - y0]) * size
    return Sprite(np.ascontiguousarray(rgb), alpha, anchor)


def make_sprite(spec: OccluderSpec, media_dir: Path, target: str | None = None) -> tuple[Sprite, np.random.Generator]:
    """The spec's sprite and the generator the placement goes on with (seeded by the spec)."""
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "bar":
        return bar_sprite(rng, spec.size), rng
    if spec.kind == "hand":
        return hand_sprite(rng, media_dir, spec.size), rng
    source = spec.source or next(s for s in FACE_SOURCES if s != target)
    return face_sprite(rng, media_dir, source, spec.size), rng


# -- placement ----------------------------------------------------------------------------------
def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


@dataclass
class _Path:
    """The seeded motion: angle of the sprite, the direction it comes from and goes to, the wobble."""

    angle: float  # sprite rotation (deg) in the crop
    come: np.ndarray  # unit vector (crop axes): where it comes in from, seen from the mouth
    go: np.ndarray  # unit vector: where it leaves to
    offset: np.ndarray  # crop px: the resting point relative to the lips' centre
    wobble: np.ndarray  # crop px amplitude (x, y)
    period: float  # frames
    phase: float


def _plan(kind: str, rng: np.random.Generator) -> _Path:
    if kind == "bar":
        angle = 0.0 if rng.random() < 0.4 else rng.uniform(-35.0, 35.0)  # vertical, or held at a slant
        down = _rotation(angle) @ np.array([0.0, 1.0])  # the stick's direction: it enters and leaves along it
        return _Path(angle, down, down, np.array([rng.uniform(-14, 14), rng.uniform(-4, 6)]),
                     np.array([rng.uniform(3, 10), rng.uniform(2, 6)]), rng.uniform(18, 40), rng.uniform(0, 2 * np.pi))
    if kind == "hand":
        angle = rng.uniform(-30.0, 30.0)
        side = -1.0 if rng.random() < 0.5 else 1.0
        come = np.array([side * rng.uniform(0.2, 0.9), 1.0])
        go = np.array([-side * rng.uniform(0.0, 0.9), 1.0])
        return _Path(angle, come / np.linalg.norm(come), go / np.linalg.norm(go),
                     np.array([rng.uniform(-15, 15), rng.uniform(-5, 15)]),
                     np.array([rng.uniform(3, 9), rng.uniform(2, 6)]), rng.uniform(20, 45), rng.uniform(0, 2 * np.pi))
    side = -1.0 if rng.random() < 0.5 else 1.0  # another face leans in from one side and back out
    come = np.array([side, rng.uniform(-0.2, 0.3)])
    return _Path(rng.uniform(-12.0, 12.0), come / np.linalg.norm(come), come / np.linalg.norm(come),
                 np.array([side * rng.uniform(25, 55), rng.uniform(-5, 10)]),
                 np.array([rng.uniform(2, 6), rng.uniform(1, 4)]), rng.uniform(25, 50), rng.uniform(0, 2 * np.pi))


def _exit_distance(point: np.ndarray, direction: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far (frame px) from ``point`` along ``direction`` the frame's edge is."""
    h, w = shape[:2]
    best = np.inf
    for axis, size in ((0, w), (1, h)):
        d = direction[axis]
        if abs(d) > 1e-9:
            edge = size if d > 0 else 0.0
            best = min(best, (edge - point[axis]) / d)
    return float(max(best, 0.0))


def _smooth(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sprite_to_frame(sprite: Sprite, plan: _Path, inv: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(2, 3) sprite px → frame px with the anchor on ``point`` (frame px)."""
    lin = inv[:, :2] @ _rotation(plan.angle) * sprite.scale  # sprite → crop (rotation, scale) → frame
    return np.hstack([lin, (point - lin @ sprite.anchor)[:, None]])


def build_clip(
    frames: Sequence[np.ndarray],
    matrices: np.ndarray,
    spec: OccluderSpec,
    *,
    media_dir: str | Path,
    valid: np.ndarray | None = None,
    target: str | None = None,
    sprite: Sprite | None = None,
) -> SyntheticClip:
    """``frames`` with the spec's occluder pasted over the mouth on frames ``start..stop``.

    ``matrices``: (N, 2, 3) frame → 256 crop, per frame; ``valid``: frames with a usable face
    (elsewhere the last valid matrix is held, as :class:`~latentdub.face.FaceSelection` does);
    ``target``: the clip's file name (so "face" never cuts the same person); ``sprite``: paste
    this image instead (the motion is still the one the spec's seed draws). Frames are copied
    only where something is pasted; ``truth_grid`` stays empty on frames that are not valid
    (there is no aligned crop to speak of), ``truth_frame`` does not.
    """
    media_dir = Path(media_dir)
    matrices = np.asarray(matrices, np.float64)
    n = len(frames)
    if len(matrices) != n:
        raise ValueError(f"{n} frames but {len(matrices)} matrices")
    made, rng = make_sprite(spec, media_dir, target)
    sprite = sprite or made
    plan = _plan(spec.kind, rng)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    radius = sprite.radius
    zone = mouth_zone(GRID)
    out = list(frames)
    truth_grid = np.zeros((n, GRID, GRID), bool)
    truth_frame: list[FrameMask | None] = [None] * n
    coverage = np.zeros(n, np.float32)
    span = spec.stop - spec.start
    enter = max(1, min(spec.enter, span // 2))
    for k in range(max(0, spec.start), min(n, spec.stop)):
        u = k - spec.start
        inv = invert_affine(matrices[k])
        frame_scale = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))  # frame px per crop px
        wob = plan.wobble * np.sin(2 * np.pi * u / plan.period + plan.phase + np.array([0.0, 1.3]))
        rest = apply_affine(inv, (MOUTH + plan.offset + wob)[None])[0]
        if u < enter:  # comes in: from fully outside the frame (one frame before start) to rest
            start_pt = _outside(rest, inv, plan.come, radius * frame_scale, frames[k].shape)
            point = start_pt + (rest - start_pt) * _smooth((u + 1) / (enter + 1))
        elif u >= span - enter:  # goes out: fully outside one frame after the last
            end_pt = _outside(rest, inv, plan.go, radius * frame_scale, frames[k].shape)
            point = rest + (end_pt - rest) * _smooth((u - (span - enter) + 1) / (enter + 1))
        else:
            point = rest
        affine = _sprite_to_frame(sprite, plan, inv, point)
        pasted, fmask = _paste(frames[k], sprite, affine)
        if fmask is None:
            continue
        out[k] = pasted
        truth_frame[k] = fmask
        if valid[k]:
            truth_grid[k] = _grid_truth(sprite, affine, matrices[k], frames[k].shape)
            coverage[k] = float((truth_grid[k] & zone).sum()) / float(zone.sum())
    return SyntheticClip(out, truth_grid, truth_frame, spec, matrices, coverage)


def _outside(rest: np.ndarray, inv: np.ndarray, direction: np.ndarray, radius_px: float,
             shape: tuple[int, ...]) -> np.ndarray:
    """A point along ``direction`` (crop axes) from ``rest`` where the whole sprite is out of the frame."""
    d = inv[:, :2] @ direction
    d = d / max(np.linalg.norm(d), 1e-9)
    return rest + d * (_exit_distance(rest, d, shape) + radius_px + 2.0)


def _paste(frame: np.ndarray, sprite: Sprite, affine: np.ndarray) -> tuple[np.ndarray, FrameMask | None]:
    """Alpha-composite the sprite under ``affine`` (sprite → frame); only its box is warped."""
    h, w = frame.shape[:2]
    sh, sw = sprite.alpha.shape
    corners = apply_affine(affine, np.array([[0, 0], [sw, 0], [0, sh], [sw, sh]], np.float64))
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return frame, None
    local = affine.copy()
    local[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    # Shrinking a sprite by a lot: area-filter first so the mesh and the fingers do not alias.
    shrink = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    rgb, alpha, lin = sprite.rgb, sprite.alpha, local
    if shrink < 0.6:
        f = shrink / 0.8
        rgb = cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
        lin = np.hstack([local[:, :2] * (sw / rgb.shape[1]), local[:, 2:]])
    a = cv2.warpAffine(alpha, lin, size, flags=cv2.INTER_LINEAR, borderValue=0.0)
    if not (a >= 0.5).any():
        return frame, None
    c = cv2.warpAffine(rgb, lin, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = frame.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    a3 = a[..., None]
    out[y0:y1, x0:x1] = np.clip(region * (1.0 - a3) + c.astype(np.float32) * a3 + 0.5, 0, 255).astype(np.uint8)
    return out, FrameMask(x0, y0, a >= 0.5)


def _grid_truth(sprite: Sprite, affine: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The occluder's alpha in the 256 crop (zero where the crop lies outside the frame), cells ≥ half covered."""
    m = np.vstack([matrix, [0.0, 0.0, 1.0]])
    to_crop = (m @ np.vstack([affine, [0.0, 0.0, 1.0]]))[:2]
    a = cv2.warpAffine(sprite.alpha, to_crop, (256, 256), flags=cv2.INTER_LINEAR, borderValue=0.0)
    h, w = shape[:2]
    inside = cv2.warpAffine(np.ones((h, w), np.float32), matrix, (256, 256), flags=cv2.INTER_NEAREST,
                            borderValue=0.0)
    cells = cv2.resize(a * inside, (GRID, GRID), interpolation=cv2.INTER_AREA)
    return cells >= 0.5


# -- loading ------------------------------------------------------------------------------------
@dataclass
class CleanClip:
    """A clean clip's frames and its selected face (the input of :func:`build_clip`)."""

    name: str
    frames: list[np.ndarray]
    matrices: np.ndarray
    valid: np.ndarray
    tracks: np.ndarray


def load_clip(path: str | Path, *, max_frames: int | None = None, start: int = 0) -> CleanClip:
    """Frames ``start..start+max_frames`` of ``path`` and the largest face's 256 matrices."""
    from latentdub.face import analyze_video, select_face
    from latentdub.media.reader import iter_frames

    path = Path(path)
    stop = None if max_frames is None else start + max_frames
    sel = select_face(analyze_video(path, max_frames=stop), "largest", resolution=256)
    frames = [f.image for f in iter_frames(path, start=start, stop=stop)]
    n = len(frames)
    sl = slice(start, start + n)
    return CleanClip(path.name, frames, sel.matrices[sl].copy(), sel.valid[sl].copy(), sel.track_ids[sl].copy())
