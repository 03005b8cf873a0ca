"""Paste a generated crop back into the ORIGINAL frame, touching only the lower face.

The official restore resizes the whole decoded crop back, inverse-warps it and blends the full
face rectangle into the frame, so the whole face is resampled four times and comes back blurrier
(``restore_video`` in ``latentsync/pipelines/lipsync_pipeline.py``, ``AlignRestore.restore_img`` in
``latentsync/utils/affine_transform.py``). Here the composite crop is inverse-warped once, and
only inside the feathered blend region (:func:`~latentdub.face.mask.blend_weights`, derived from the official
mouth mask); every other pixel of the returned frame is the decoded original, bit for bit. All
work happens inside the bounding box of the warped region, so the cost does not grow with the
frame size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from latentdub.face.alignment import (
    _PREFILTER_BELOW as PREFILTER_BELOW,
)
from latentdub.face.alignment import (
    apply_affine,
    compose,
    invert_affine,
    matrix_scale,
    resample,
)
from latentdub.face.mask import blend_weights

if TYPE_CHECKING:  # torch is imported where the device paste runs: pass 1 does not need it
    import torch


def _support_box(weights: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), exclusive end, of the non-zero weights in crop space."""
    rows = np.flatnonzero(weights.any(axis=1))
    cols = np.flatnonzero(weights.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def frame_region(
    matrix: np.ndarray, frame_shape: tuple[int, ...], weights: np.ndarray
) -> tuple[int, int, int, int] | None:
    """The frame rectangle (x0, y0, x1, y1) that pasting ``weights`` under ``matrix`` can change."""
    box = _support_box(weights)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    inv = invert_affine(matrix)
    # Pixel centres of the support span [x0, x1-1]; half a pixel plus the kernel reach around it.
    corners = apply_affine(
        inv, np.array([[x0 - 1, y0 - 1], [x1, y0 - 1], [x0 - 1, y1], [x1, y1]], dtype=np.float64)
    )
    h, w = frame_shape[:2]
    fx0 = int(np.clip(np.floor(corners[:, 0].min()) - 1, 0, w))
    fy0 = int(np.clip(np.floor(corners[:, 1].min()) - 1, 0, h))
    fx1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, 0, w))
    fy1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, 0, h))
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    return fx0, fy0, fx1, fy1


def _local_inverse(matrix: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """crop px → frame-region px (region origin at (x0, y0))."""
    inv = invert_affine(matrix)
    inv[:, 2] -= (x0, y0)
    return inv


def paste_back(
    frame: np.ndarray,
    generated_crop: np.ndarray,
    matrix: np.ndarray,
    *,
    blend_mask: np.ndarray | None = None,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Blend ``generated_crop`` (res, res, 3) uint8 into a copy of ``frame`` (H, W, 3) uint8.

    ``matrix`` (2, 3) maps frame pixels to crop pixels (as used to cut the crop).
    ``blend_mask`` (res, res) float weights in crop space; default: the feathered lower-face
    region of the official mouth mask at this resolution. Pixels where the warped weight is 0
    are returned unchanged, bit for bit. The crop is inverse-warped once (bilinear, area
    prefilter when it shrinks), the blend is 8-bit fixed point.
    """
    res = generated_crop.shape[0]
    if generated_crop.shape != (res, res, 3) or generated_crop.dtype != np.uint8:
        raise ValueError(
            f"generated_crop must be (res, res, 3) uint8, got {generated_crop.dtype} {generated_crop.shape}"
        )
    weights = blend_weights(res) if blend_mask is None else np.asarray(blend_mask, dtype=np.float32)
    if weights.shape != (res, res):
        raise ValueError(f"blend_mask must be ({res}, {res}), got {weights.shape}")
    out = frame.copy()
    region = frame_region(matrix, frame.shape, weights)
    if region is None:
        return out
    x0, y0, x1, y1 = region
    fwd = _local_inverse(matrix, x0, y0)
    size = (x1 - x0, y1 - y0)
    w = resample(
        weights,
        fwd,
        size,
        interpolation=cv2.INTER_LINEAR,
        border_mode=cv2.BORDER_CONSTANT,
        border_value=0,
    )
    # Weights in 1/256 steps; 0 → the original pixel exactly ((o·256 + 128) >> 8 == o).
    w16 = np.rint(np.clip(w, 0.0, 1.0) * 256.0).astype(np.uint16)
    if not w16.any():
        return out
    face = resample(
        generated_crop, fwd, size, interpolation=interpolation, border_mode=cv2.BORDER_REPLICATE
    )
    orig = out[y0:y1, x0:x1]
    wb = w16[..., None]
    blended = (orig.astype(np.uint16) * (256 - wb) + face.astype(np.uint16) * wb + 128) >> 8
    orig[...] = blended.astype(np.uint8)
    return out


def blend_region_mask(
    matrix: np.ndarray,
    frame_shape: tuple[int, ...],
    resolution: int,
    *,
    blend_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The frame-space blend weights (H, W) float32 that :func:`paste_back` applies (for previews/tests)."""
    weights = (
        blend_weights(resolution)
        if blend_mask is None
        else np.asarray(blend_mask, dtype=np.float32)
    )
    full = np.zeros(frame_shape[:2], dtype=np.float32)
    region = frame_region(matrix, frame_shape, weights)
    if region is None:
        return full
    x0, y0, x1, y1 = region
    fwd = _local_inverse(matrix, x0, y0)
    w = resample(weights, fwd, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR, border_value=0)
    full[y0:y1, x0:x1] = np.rint(np.clip(w, 0.0, 1.0) * 256.0) / 256.0
    return full


# -- the same paste on a torch device ------------------------------------------------------------
# :func:`paste_back` costs host CPU time per frame (two warps and a blend) and needs the generated
# crop on the host. :func:`paste_back_batch` does the same work for a whole window on the device
# that generated it — usually a GPU — and hands back only the blended boxes. It reproduces
# OpenCV's arithmetic instead of approximating it with ``grid_sample``: ``cv2.warpAffine``
# (OpenCV 4.x; 5.x no longer does) maps every output pixel to 1/32-pixel fixed point and blends 8-bit
# images with 15-bit integer weights, ``cv2.resize(INTER_AREA)`` (the anti-alias prefilter) sums
# in float32 in a set order. The same integer and float32 operations in torch give the same
# pixels (tests/test_acceleration.py measures it against this module's OpenCV path).

_AB_SCALE = 1 << 10  # OpenCV's AB_BITS: the affine map in 1/1024 px before the 1/32-px grid
_ROUND_DELTA = _AB_SCALE // 32 // 2  # INTER_BITS = 5 → rounds to the nearest 1/32 px


def cv2_inverse_affine(m: np.ndarray) -> np.ndarray:
    """The output → input map (6,) that ``cv2.warpAffine(src, m, …)`` derives from ``m``.

    The same double-precision steps as OpenCV (not :func:`invert_affine`), so the fixed-point
    grid built from it is OpenCV's to the last bit.
    """
    a = np.asarray(m, dtype=np.float64).ravel().copy()
    d = a[0] * a[4] - a[1] * a[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = a[4] * d, a[0] * d
    a[0], a[1], a[3], a[4] = a11, a[1] * -d, a[3] * -d, a22
    b1 = -a[0] * a[2] - a[1] * a[5]
    b2 = -a[3] * a[2] - a[4] * a[5]
    a[2], a[5] = b1, b2
    return a


def fixed_point_grid(m: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """OpenCV's 1/32-px source coordinates for an output of ``width`` x ``height``, separably.

    Returns (row_x, row_y) (height,) and (col_x, col_y) (width,) int64: the source position of
    output pixel (x, y) is ``((row_x[y] + col_x[x]) >> 5, (row_y[y] + col_y[x]) >> 5)`` in 1/32 px.
    """
    inv = cv2_inverse_affine(m)
    y = np.arange(height, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    row_x = np.rint((inv[1] * y + inv[2]) * _AB_SCALE).astype(np.int64) + _ROUND_DELTA
    row_y = np.rint((inv[4] * y + inv[5]) * _AB_SCALE).astype(np.int64) + _ROUND_DELTA
    col_x = np.rint(inv[0] * x * _AB_SCALE).astype(np.int64)
    col_y = np.rint(inv[3] * x * _AB_SCALE).astype(np.int64)
    return row_x, row_y, col_x, col_y


@lru_cache(maxsize=64)
def area_table(ssize: int, dsize: int) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.resize(INTER_AREA)``'s decimation weights along one axis, ``ssize`` → ``dsize``.

    (index, weight) (dsize, K) int64 / float32, each row in OpenCV's summation order and padded
    with weight 0 (adding 0.0 leaves a float sum unchanged, so the padding is exact).
    """
    scale = 1.0 / (dsize / ssize)
    rows: list[list[tuple[int, float]]] = []
    for dx in range(dsize):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, ssize - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, ssize - 1)
        sx1 = min(sx1, sx2)
        row: list[tuple[int, float]] = []
        if sx1 - fsx1 > 1e-3:
            row.append((sx1 - 1, (sx1 - fsx1) / cell))
        row.extend((sx, 1.0 / cell) for sx in range(sx1, sx2))
        if fsx2 - sx2 > 1e-3:
            row.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
        rows.append(row)
    k = max(len(r) for r in rows)
    index = np.zeros((dsize, k), dtype=np.int64)
    weight = np.zeros((dsize, k), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (s, a) in enumerate(row):
            index[i, j] = s
            weight[i, j] = np.float32(a)
    return index, weight


def _area_resize_torch(img: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``cv2.resize(img, (width, height), interpolation=INTER_AREA)`` for a shrink, in torch.

    ``img`` (H, W, C) uint8 or float32; same dtype out. OpenCV's integer-scale fast path is
    followed too (2x2 uint8: ``(sum + 2) >> 2``).
    """
    import torch

    h, w = img.shape[:2]
    device = img.device
    kx, ky = w / width, h / height
    if kx == int(kx) and ky == int(ky):  # OpenCV's resizeAreaFast_
        kx, ky = int(kx), int(ky)
        blocks = img[: height * ky, : width * kx].reshape(height, ky, width, kx, -1)
        if img.dtype == torch.uint8:
            total = blocks.to(torch.int32).sum(dim=(1, 3))
            if kx == ky == 2:
                return ((total + 2) >> 2).to(torch.uint8)
            scaled = total.to(torch.float32) * np.float32(1.0 / (kx * ky))
            return scaled.round().clamp(0, 255).to(torch.uint8)
        return blocks.sum(dim=(1, 3)) * np.float32(1.0 / (kx * ky))
    xi, xw = _device_table(w, width, device)
    yi, yw = _device_table(h, height, device)
    src = img.to(torch.float32)
    buf = torch.zeros((h, width, src.shape[2]), dtype=torch.float32, device=device)
    for k in range(xi.shape[1]):  # each column sum in OpenCV's order, one rounding per step
        buf = buf + src[:, xi[:, k], :] * xw[None, :, k, None]
    out = buf[yi[:, 0]] * yw[:, 0, None, None]
    for k in range(1, yi.shape[1]):
        out = out + buf[yi[:, k]] * yw[:, k, None, None]
    if img.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class _PastePlan:
    """Where one frame's paste lands and how its box samples the crop (host-side numbers)."""

    region: tuple[int, int, int, int]  # frame box (x0, y0, x1, y1)
    prefilter: tuple[int, int] | None  # (width, height) of the area-reduced crop, if it shrinks
    grid: tuple[np.ndarray, ...]  # fixed_point_grid of the box


def _plan_paste(matrix: np.ndarray, frame_shape: tuple[int, ...], weights: np.ndarray) -> _PastePlan | None:
    region = frame_region(matrix, frame_shape, weights)
    if region is None:
        return None
    x0, y0, x1, y1 = region
    m = _local_inverse(matrix, x0, y0)
    res = weights.shape[0]
    prefilter = None
    # resample()'s anti-alias rule, step for step: shrink first, then warp the smaller crop.
    shrink = float(matrix_scale(m))
    if shrink < PREFILTER_BELOW and res > 1:
        factor = shrink * 1.25
        rw, rh = max(1, round(res * factor)), max(1, round(res * factor))
        fx, fy = rw / res, rh / res
        m = compose(m, np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5]]))
        prefilter = (rw, rh)
    return _PastePlan(region, prefilter, fixed_point_grid(m, x1 - x0, y1 - y0))


class CropsToPaste:
    """One window's composited crops, pasted into each frame with OpenCV (:func:`paste_back`).

    ``crops`` is (F, res, res, 3) uint8 on the host: a NumPy array, or a torch buffer that a
    queued device → host copy may still be filling (``ready`` is its event; :meth:`apply`
    waits for it once). ``matrices`` (F, 2, 3) frame → crop.
    """

    def __init__(
        self, crops: Any, matrices: np.ndarray, ready: Any = None, *, weights: Sequence[np.ndarray | None] | None = None
    ) -> None:
        self._crops, self.matrices, self._ready = crops, matrices, ready
        self._host: np.ndarray | None = crops if isinstance(crops, np.ndarray) else None
        self.weights = weights  # per frame blend weights (None: the default), e.g. with an occluder cut out

    def __len__(self) -> int:
        return int(self._crops.shape[0])

    def __getitem__(self, j: int) -> np.ndarray:
        if self._host is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._host = self._crops.numpy()
        return self._host[j]

    def apply(self, j: int, frame: np.ndarray) -> np.ndarray:
        """``frame`` with crop ``j`` pasted back (a new array; the frame itself is never modified)."""
        weights = None if self.weights is None else self.weights[j]
        return paste_back(frame, self[j], self.matrices[j], blend_mask=weights)


class PastedWindow:
    """The blended boxes of one window's frames, made on the device by :func:`paste_back_batch`.

    :meth:`apply` writes box ``j`` into a copy of frame ``j``; it first waits (once) for the
    device → host copy, which may still be running when the object is handed over.
    """

    def __init__(
        self,
        regions: list[tuple[int, int, int, int] | None],
        boxes: torch.Tensor | None,
        ready: Any = None,
    ) -> None:
        self.regions = regions
        self._boxes = boxes  # (F, H, W, 3) uint8 on the host (pinned on CUDA), padded
        self._ready = ready  # a torch.cuda.Event, or None when the copy is already done
        self._host: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def wait(self) -> None:
        if self._host is None and self._boxes is not None:
            if self._ready is not None:
                self._ready.synchronize()
            self._host = self._boxes.numpy()

    def apply(self, j: int, frame: np.ndarray) -> np.ndarray:
        """Copy of ``frame`` with box ``j`` written in (the frame itself is never modified)."""
        out = frame.copy()
        region = self.regions[j]
        if region is None:
            return out
        self.wait()
        assert self._host is not None
        x0, y0, x1, y1 = region
        out[y0:y1, x0:x1] = self._host[j, : y1 - y0, : x1 - x0]
        return out


def paste_back_batch(
    frames: Sequence[np.ndarray],
    crops: torch.Tensor,
    matrices: np.ndarray,
    *,
    blend_mask: np.ndarray | None = None,
    pin_memory: bool = False,
    copy_stream: Any = None,
    frames_per_call: int = 4,
    frame_weights: Sequence[np.ndarray | None] | None = None,
) -> PastedWindow:
    """:func:`paste_back` of F frames at once on ``crops``' device (bilinear, as the default).

    ``crops`` (F, res, res, 3) uint8 on any torch device; ``frames`` the F original frames (host,
    uint8, any sizes); ``matrices`` (F, 2, 3) frame → crop. Only each frame's blend box travels:
    up (the original pixels under it) and back (the blended result). On CUDA with
    ``pin_memory`` the copies go through page-locked buffers, the download is queued on
    ``copy_stream`` (when given) and the returned object's :meth:`~PastedWindow.apply` waits for
    it, so the caller's thread is never blocked here. Pixel-equal to :func:`paste_back` with
    OpenCV 4.x (4.11 and 4.12 measured; OpenCV 5 changed warpAffine: tests/test_acceleration.py).
    ``frame_weights`` (per frame, None: ``blend_mask``) may only lower the weights (an occluder
    cut out, a fade): the boxes are planned on ``blend_mask``.
    """
    import torch

    n, res = crops.shape[0], crops.shape[1]
    if crops.dtype != torch.uint8 or tuple(crops.shape[1:]) != (res, res, 3):
        raise ValueError(f"crops must be (F, res, res, 3) uint8, got {crops.dtype} {tuple(crops.shape)}")
    if len(frames) != n or len(matrices) != n:
        raise ValueError(f"{n} crops but {len(frames)} frames and {len(matrices)} matrices")
    weights = blend_weights(res) if blend_mask is None else np.asarray(blend_mask, dtype=np.float32)
    if weights.shape != (res, res):
        raise ValueError(f"blend_mask must be ({res}, {res}), got {weights.shape}")
    plans = [_plan_paste(np.asarray(matrices[j], dtype=np.float64), frames[j].shape, weights) for j in range(n)]
    regions = [p.region if p is not None else None for p in plans]
    live = [j for j in range(n) if plans[j] is not None]
    if not live:
        return PastedWindow(regions, None)
    device = crops.device
    pin = pin_memory and device.type == "cuda"
    box_h = max(p.region[3] - p.region[1] for p in plans if p is not None)
    box_w = max(p.region[2] - p.region[0] for p in plans if p is not None)

    # Host side: the original pixels under each box and the sampling grids, padded to one shape.
    originals = torch.zeros((n, box_h, box_w, 3), dtype=torch.uint8, pin_memory=pin)
    # rows 0-3: fixed_point_grid per frame; row 4: (width, height) of the sampled crop
    grid = torch.zeros((5, n, max(box_h, box_w, 2)), dtype=torch.int32, pin_memory=pin)
    orig_np = originals.numpy()
    grid_np = grid.numpy()
    grid_np[4, :, :2] = res
    for j in live:
        plan = plans[j]
        assert plan is not None
        x0, y0, x1, y1 = plan.region
        orig_np[j, : y1 - y0, : x1 - x0] = frames[j][y0:y1, x0:x1]
        for k, values in enumerate(plan.grid):
            grid_np[k, j, : len(values)] = values
        if plan.prefilter is not None:
            grid_np[4, j, :2] = plan.prefilter
    originals_dev = originals.to(device, non_blocking=pin)
    grid_dev = grid.to(device, non_blocking=pin)

    # The frames whose face is small enough to need the anti-alias prefilter (rare).
    weights_dev = _device_weights(weights, device)
    sources = crops
    source_w = weights_dev.expand(n, res, res)
    own = [j for j in range(n) if frame_weights is not None and frame_weights[j] is not None]
    if own:
        source_w = source_w.clone()
        for j in own:
            source_w[j] = torch.from_numpy(np.asarray(frame_weights[j], dtype=np.float32)).to(device)  # type: ignore[index]
    shrunk = [j for j in live if plans[j].prefilter is not None]  # type: ignore[union-attr]
    if shrunk:
        sources = crops.clone()
        unshrunk_w = source_w
        source_w = source_w.clone()
        for j in shrunk:
            rw, rh = plans[j].prefilter  # type: ignore[union-attr, misc]
            sources[j, :rh, :rw] = _area_resize_torch(crops[j], rw, rh)
            source_w[j, :rh, :rw] = _area_resize_torch(unshrunk_w[j][..., None].contiguous(), rw, rh)[..., 0]

    out = torch.empty((n, box_h, box_w, 3), dtype=torch.uint8, device=device)
    for a in range(0, n, frames_per_call):  # bounds the int32 temporaries
        b = min(a + frames_per_call, n)
        out[a:b] = _paste_chunk(
            sources[a:b], source_w[a:b], grid_dev[4, a:b, :2].T, grid_dev[:4, a:b], originals_dev[a:b], box_h, box_w
        )
    if device.type != "cuda":
        return PastedWindow(regions, out.cpu())
    host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=pin)
    ready = torch.cuda.Event()
    if copy_stream is not None:
        copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(copy_stream):
            host.copy_(out, non_blocking=pin)
            out.record_stream(copy_stream)
            ready.record(copy_stream)
    else:
        host.copy_(out, non_blocking=pin)
        ready.record()
    return PastedWindow(regions, host, ready)


def paste_back_torch(
    frame: np.ndarray,
    generated_crop: np.ndarray | torch.Tensor,
    matrix: np.ndarray,
    *,
    blend_mask: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """:func:`paste_back` of one frame through :func:`paste_back_batch` (for tests and previews)."""
    import torch

    crop = torch.as_tensor(generated_crop)
    if device is not None:
        crop = crop.to(device)
    pasted = paste_back_batch([frame], crop[None], np.asarray(matrix)[None], blend_mask=blend_mask)
    return pasted.apply(0, frame)


_TABLE_CACHE: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _device_table(ssize: int, dsize: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`area_table` on ``device``, uploaded once."""
    import torch

    key = (ssize, dsize, str(device))
    found = _TABLE_CACHE.get(key)
    if found is None:
        index, weight = area_table(ssize, dsize)
        found = (torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device))
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = found
    return found


_WEIGHTS_CACHE: dict[tuple[str, int, int], torch.Tensor] = {}


def _device_weights(weights: np.ndarray, device: torch.device) -> torch.Tensor:
    """The blend weights on ``device``, uploaded once per (resolution, device, weights)."""
    import torch

    key = (str(device), weights.shape[0], hash(weights.tobytes()))
    found = _WEIGHTS_CACHE.get(key)
    if found is None:
        found = torch.tensor(np.asarray(weights, dtype=np.float32), device=device)
        if len(_WEIGHTS_CACHE) > 8:
            _WEIGHTS_CACHE.clear()
        _WEIGHTS_CACHE[key] = found
    return found


def _paste_chunk(
    sources: torch.Tensor,  # (f, S, S, 3) uint8: crops (or area-reduced crops at the top left)
    weights: torch.Tensor,  # (f, S, S) float32: blend weights likewise
    sizes: torch.Tensor,  # (2, f) int32: width and height of each source
    grid: torch.Tensor,  # (4, f, L) int32: row_x, row_y, col_x, col_y (fixed_point_grid)
    originals: torch.Tensor,  # (f, H, W, 3) uint8: the frame pixels under each box
    box_h: int,
    box_w: int,
) -> torch.Tensor:
    import torch

    f, s = sources.shape[0], sources.shape[1]
    row_x, row_y = grid[0, :, :box_h, None], grid[1, :, :box_h, None]
    col_x, col_y = grid[2, :, None, :box_w], grid[3, :, None, :box_w]
    gx = (row_x + col_x) >> 5  # (f, H, W) source position in 1/32 px, as OpenCV's warpAffine
    gy = (row_y + col_y) >> 5
    ix, iy = gx >> 5, gy >> 5
    ax, ay = gx & 31, gy & 31
    width = sizes[0].view(f, 1, 1)
    height = sizes[1].view(f, 1, 1)
    base = torch.arange(f, device=sources.device, dtype=torch.int64).view(f, 1, 1) * (s * s)
    flat = sources.reshape(f * s * s, 3)
    flat_w = weights.reshape(f * s * s)
    zero = torch.zeros((), dtype=torch.int32, device=sources.device)

    face = torch.zeros((f, box_h, box_w, 3), dtype=torch.int32, device=sources.device)
    fx, fy = ax.to(torch.float32) / 32, ay.to(torch.float32) / 32  # exact: multiples of 1/32
    blend = None
    for dy, dx, wx_i, wy_i, wx_f, wy_f in (
        (0, 0, 32 - ax, 32 - ay, 1 - fx, 1 - fy),
        (0, 1, ax, 32 - ay, fx, 1 - fy),
        (1, 0, 32 - ax, ay, 1 - fx, fy),
        (1, 1, ax, ay, fx, fy),
    ):
        xx, yy = ix + dx, iy + dy
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        xc = torch.minimum(torch.maximum(xx, zero), width - 1)  # BORDER_REPLICATE for the crop
        yc = torch.minimum(torch.maximum(yy, zero), height - 1)
        idx = base + (yc * s + xc).to(torch.int64)
        # 8-bit bilinear: 15-bit integer weights (exact products of the 1/32 fractions)
        face += flat[idx].to(torch.int32) * (wx_i * wy_i * 32)[..., None]
        # float32 bilinear for the weights, BORDER_CONSTANT 0, summed in OpenCV's order
        term = torch.where(inside, flat_w[idx], 0.0) * (wy_f * wx_f)
        blend = term if blend is None else blend + term
    assert blend is not None
    face = (face + (1 << 14)) >> 15
    w16 = (blend.clamp(0.0, 1.0) * 256.0).round().to(torch.int32)[..., None]
    mixed = (originals.to(torch.int32) * (256 - w16) + face * w16 + 128) >> 8
    return mixed.to(torch.uint8)
