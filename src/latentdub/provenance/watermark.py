"""Invisible watermark: every output frame says "AI-generated" and which job made it.

Scheme (key-seeded spread spectrum in luma, whole frames):

* **Payload**: 64 bits = 16-bit marker ``"AI"`` + 32-bit job id + CRC-16 over both.
* **Chips**: the frame is divided into a fixed :data:`GRID` x :data:`GRID` grid in *normalised*
  coordinates (so the grid scales with the frame: a 50 % downscale keeps it). Each of the
  16 384 chips carries one payload bit (256 chips per bit, scattered over the whole frame by a
  key-seeded permutation) times a key-seeded ±1 sign.
* **Embedding**: the ±1 chip values are upsampled with a cubic kernel into a smooth random field
  (no block edges, no regular lattice for the eye to lock on), multiplied by a perceptual
  amplitude mask (≈1 grey level on flat areas, up to :data:`AMP_MAX` on fine texture, capped so
  the frame's PSNR stays ≥ 40 dB) and added equally to R, G and B, i.e. to luma only. The same
  field is added to every frame, dubbed or not, so any excerpt of the output carries it.
* **Detection**: each frame is resized to a canonical square, high-passed (Laplacian of
  Gaussian: removes most of the picture, keeps the chip-scale field) and averaged per chip; the
  *sign* of each chip value is accumulated over frames. Sign counts make the detector immune to
  the heavy-tailed picture residue (edges) and to contrast changes.
* **Decision**: ``score`` is the z-score of the marker chips' agreement with the known marker
  pattern, ``Σ s_c·A_c / sqrt(Σ A_c²)`` (A = accumulated signs, s = expected signs). For a video
  not marked with this key the key's signs are independent of the picture, so by Hoeffding
  ``P(score ≥ z) ≤ exp(−z²/2)`` whatever the content. ``found`` needs ``score ≥`` :data:`Z_MIN`
  *and* a decoded word whose marker and CRC check (≤ 256 Chase candidates x 2⁻³² ≈ 6e-8 for
  random bits).

Robustness measured on real clips (see ``bench/bench_watermark.py`` and the tests): libx264
CRF 18/28, 50 % downscale, 2 s excerpts, 15 fps re-encodes. Weak spots: frames under ~360 px
after scaling, crops, rotations and mirroring (the grid must stay where it was).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # render.py imports torch; a frame filter must not need it
    from latentdub.render import FrameInfo

# -- payload layout -------------------------------------------------------------------------------
MARKER = 0x4149  # ASCII "AI": the fixed "AI-generated" marker
MARKER_BITS = 16
JOB_ID_BITS = 32
CRC_BITS = 16
PAYLOAD_BITS = MARKER_BITS + JOB_ID_BITS + CRC_BITS  # 64

DEFAULT_KEY = b"latentdub/watermark/v1"

# -- geometry and strength (changing any of these breaks detection of existing files) ------------
GRID = 128  # chips per side, in normalised frame coordinates
CANON_CELL = 4  # detection: canonical pixels per chip (canonical frame = 512 x 512)
LOG_SIGMA = 1.25  # detection: Gaussian before the Laplacian, canonical pixels
MASK_SIDE = 512  # embedding: the mask is computed with the long side at most this many pixels
AMP_MIN = 1.0  # grey levels on flat areas: about the rounding step, invisible
AMP_GAIN = 1.5  # extra amplitude per grey level of local fine-texture RMS
AMP_MAX = 6.0  # strongest mark, only in busy texture (hair, foliage, fabric)
MAX_RMS = 2.5  # per-frame RMS cap in grey levels: PSNR ≥ 20·log10(255/2.5) ≈ 40.2 dB
Z_MIN = 5.0  # score needed for "found" (Hoeffding: ≤ 3.7e-6 on unmarked content)
CHASE_BITS = 8  # least reliable bits tried flipped when the CRC fails (256 candidates)
_PLAN_CACHE = 4  # frame sizes whose fields are kept


def _crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _int_to_bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8)


def _bits_to_int(bits: np.ndarray) -> int:
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


MARKER_BIT_VALUES = _int_to_bits(MARKER, MARKER_BITS)


@dataclass(frozen=True)
class WatermarkPayload:
    """What the watermark carries besides the fixed marker: a 32-bit job id."""

    job_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, int) or not 0 <= self.job_id < 2**JOB_ID_BITS:
            raise ValueError(f"job_id must be an int in [0, 2**{JOB_ID_BITS}), got {self.job_id!r}")

    def _body(self) -> bytes:
        return MARKER.to_bytes(2, "big") + self.job_id.to_bytes(4, "big")

    def to_bits(self) -> np.ndarray:
        """The 64 embedded bits (uint8 0/1): marker, job id, CRC-16 of both, MSB first."""
        word = int.from_bytes(self._body(), "big") << CRC_BITS | _crc16(self._body())
        return _int_to_bits(word, PAYLOAD_BITS)

    @classmethod
    def from_bits(cls, bits: Iterable[int] | np.ndarray) -> WatermarkPayload:
        """Parse 64 bits; ``ValueError`` unless the marker is "AI" and the CRC checks."""
        arr = np.asarray(list(bits) if not isinstance(bits, np.ndarray) else bits).astype(np.uint8)
        if arr.shape != (PAYLOAD_BITS,) or np.any(arr > 1):
            raise ValueError(f"expected {PAYLOAD_BITS} bits of 0/1, got shape {arr.shape}")
        if _bits_to_int(arr[:MARKER_BITS]) != MARKER:
            raise ValueError("the marker bits are not the AI-generated marker")
        payload = cls(_bits_to_int(arr[MARKER_BITS : MARKER_BITS + JOB_ID_BITS]))
        if _bits_to_int(arr[MARKER_BITS + JOB_ID_BITS :]) != _crc16(payload._body()):
            raise ValueError("the CRC of the watermark payload does not match")
        return payload


def payload_for_job(job: str) -> WatermarkPayload:
    """The payload of a job or consent id: the first 32 bits of its SHA-256.

    32 bits identify a job among a registry of them (the registry resolves the id back to the
    job); collisions become likely only past ~65 000 jobs, where the registry holds the rest.
    """
    digest = hashlib.sha256(b"latentdub-job:" + job.encode("utf-8")).digest()
    return WatermarkPayload(int.from_bytes(digest[:4], "big"))


# -- key-derived chip layout ----------------------------------------------------------------------
def _key_bytes(key: bytes | str) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


@dataclass(frozen=True)
class _Layout:
    sign: np.ndarray  # (GRID², ) float32 ±1 per chip
    bit_of: np.ndarray  # (GRID², ) int64: which payload bit each chip carries
    marker_chips: np.ndarray  # indices of the chips that carry marker bits
    marker_sign: np.ndarray  # their expected sign (key sign x marker bit)


@lru_cache(maxsize=8)
def _layout(key: bytes) -> _Layout:
    seed = int.from_bytes(hashlib.sha256(b"latentdub-watermark-layout:" + key).digest()[:16], "big")
    rng = np.random.default_rng(seed)
    n = GRID * GRID
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n)
    # Equal chips per bit, scattered: a bit never depends on one region of the picture.
    bit_of = rng.permutation(np.arange(n) % PAYLOAD_BITS)
    marker_chips = np.flatnonzero(bit_of < MARKER_BITS)
    marker_sign = sign[marker_chips] * (2.0 * MARKER_BIT_VALUES[bit_of[marker_chips]] - 1.0)
    for a in (sign, bit_of, marker_chips, marker_sign):
        a.flags.writeable = False
    return _Layout(sign, bit_of, marker_chips, marker_sign.astype(np.float32))


def _gray(frame: np.ndarray) -> np.ndarray:
    # Any luma weights do: the mark is equal on R, G and B, so every weighting sees all of it.
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _check_frame(frame: Any) -> None:
    if (
        not isinstance(frame, np.ndarray)
        or frame.dtype != np.uint8
        or frame.ndim != 3
        or frame.shape[2] != 3
    ):
        got = (
            f"{frame.dtype} {frame.shape}"
            if isinstance(frame, np.ndarray)
            else type(frame).__name__
        )
        raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {got}")


# -- embedding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything about one frame size that does not depend on the picture."""

    small: tuple[int, int]  # (w, h) where the mask is computed
    cell: float  # chip size in small-image pixels
    field: np.ndarray  # (h, w) float32 ±~1 smooth chip field at frame size
    field_small: np.ndarray  # the same at the mask's size (for the RMS cap)


class Watermarker:
    """A frame filter that adds the invisible watermark of ``payload`` to every frame.

    ``wm = Watermarker(payload_for_job(job_id))`` then pass ``frame_filters=[wm]`` to a dub.
    Thread-safe; per-frame-size fields are cached (a few MB per size, last 4 sizes).
    """

    def __init__(self, payload: WatermarkPayload, key: bytes | str = DEFAULT_KEY) -> None:
        self.payload = payload
        layout = _layout(_key_bytes(key))
        bits = payload.to_bits().astype(np.float32)
        self._chips = (layout.sign * (2.0 * bits[layout.bit_of] - 1.0)).reshape(GRID, GRID)
        self._plans: OrderedDict[tuple[int, int], _Plan] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, frame: np.ndarray, info: FrameInfo | None = None) -> np.ndarray:
        """The marked frame (a new uint8 array of the same shape); ``info`` is not needed:
        whole frames are marked, dubbed or not."""
        _check_frame(frame)
        frame = np.ascontiguousarray(frame)  # OpenCV needs it (np.rot90 views are not)
        return cv2.add(frame, cv2.merge([self.delta(frame)] * 3), dtype=cv2.CV_8U)

    def delta(self, frame: np.ndarray) -> np.ndarray:
        """The float32 (H, W) luma offset this frame gets (before rounding and clipping)."""
        h, w = frame.shape[:2]
        plan = self._plan(h, w)
        small = (
            frame
            if plan.small == (w, h)
            else cv2.resize(frame, plan.small, interpolation=cv2.INTER_AREA)
        )
        mask = _mask(_gray(small).astype(np.float32), plan.cell)
        rms = math.sqrt(float(np.mean(np.square(mask * plan.field_small))))
        if rms > MAX_RMS:  # a frame that is texture everywhere: keep PSNR ≥ 40 dB
            mask *= MAX_RMS / rms
        if plan.small != (w, h):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
        return cv2.multiply(mask, plan.field)

    def _plan(self, h: int, w: int) -> _Plan:
        with self._lock:
            plan = self._plans.get((h, w))
            if plan is not None:
                self._plans.move_to_end((h, w))
                return plan
        scale = min(1.0, MASK_SIDE / max(h, w))
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        plan = _Plan(
            small=small,
            cell=math.sqrt(small[0] * small[1]) / GRID,
            field=_render(self._chips, w, h),
            field_small=_render(self._chips, *small),
        )
        with self._lock:
            self._plans[(h, w)] = plan
            while len(self._plans) > _PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan


def _render(chips: np.ndarray, w: int, h: int) -> np.ndarray:
    """The chip values as a smooth field over a w x h frame (cubic interpolation between chip
    centres, which sit at the same normalised positions whatever the size)."""
    return cv2.resize(chips, (w, h), interpolation=cv2.INTER_CUBIC)


def _mask(gray: np.ndarray, cell: float) -> np.ndarray:
    """Per-pixel amplitude: AMP_MIN on flat areas, more where fine texture hides it.

    Texture = local RMS of the fine detail. It is eroded by half a chip so a smooth area next
    to an edge (cheek beside hair) stays at the flat-area amplitude, then smoothed so the
    amplitude itself draws no edges.
    """
    detail = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    texture = cv2.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 1.0))
    r = max(1, round(cell / 2))
    texture = cv2.erode(
        texture, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    )
    texture = cv2.GaussianBlur(texture, (0, 0), max(0.5, cell / 2))
    return np.clip(AMP_MIN + AMP_GAIN * texture, AMP_MIN, AMP_MAX)


# -- detection ------------------------------------------------------------------------------------
@dataclass
class WatermarkReport:
    """What a detection found.

    * ``found``: the score passed :data:`Z_MIN` and a payload with a valid marker and CRC was
      decoded.
    * ``score``: z-score of the marker chips (≈ N(0, 1) on unmarked video; ≥ 5 means marked).
    * ``bit_accuracy``: if found, the fraction of the 64 majority-decoded bits (before any
      Chase correction) equal to the payload's bits; if not, the fraction of the 16 marker bits
      that match the marker (≈ 0.5 on unmarked video). None without frames.
    * ``frame_bit_accuracy``: if found, the mean over frames of the single-frame agreement with
      the payload's bits (how much margin each frame has).
    """

    found: bool
    payload: WatermarkPayload | None
    bit_accuracy: float | None
    frames_checked: int
    score: float
    frame_bit_accuracy: float | None = None
    threshold: float = Z_MIN

    @property
    def ai_marker(self) -> bool:
        """The AI-generated marker is present (even where the job id could not be read)."""
        return self.score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "ai_marker": self.ai_marker,
            "job_id": None if self.payload is None else self.payload.job_id,
            "job_id_hex": None if self.payload is None else f"{self.payload.job_id:08x}",
            "bit_accuracy": self.bit_accuracy,
            "frame_bit_accuracy": self.frame_bit_accuracy,
            "frames_checked": self.frames_checked,
            "score": self.score,
            "threshold": self.threshold,
        }


class WatermarkDetector:
    """Accumulates frames one at a time (bounded memory), then :meth:`report`."""

    def __init__(self, key: bytes | str = DEFAULT_KEY) -> None:
        self._layout = _layout(_key_bytes(key))
        self._votes = np.zeros(GRID * GRID, dtype=np.float64)  # Σ over frames of sign(chip)
        self._frame_bits: list[np.ndarray] = []  # per-frame soft bits, 64 floats each
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        _check_frame(frame)
        signs = np.sign(chip_values(np.ascontiguousarray(frame)))
        self._votes += signs
        self._frame_bits.append(self._soft_bits(signs))
        self.frames += 1

    def _soft_bits(self, votes: np.ndarray) -> np.ndarray:
        lay = self._layout
        return np.bincount(lay.bit_of, weights=votes * lay.sign, minlength=PAYLOAD_BITS)

    def score(self) -> float:
        lay = self._layout
        a = self._votes[lay.marker_chips]
        norm = math.sqrt(float(np.dot(a, a)))
        return float(np.dot(a, lay.marker_sign) / norm) if norm > 0 else 0.0

    def report(self) -> WatermarkReport:
        if self.frames == 0:
            return WatermarkReport(False, None, None, 0, 0.0)
        lay = self._layout
        soft = self._soft_bits(self._votes)
        spread = np.sqrt(np.bincount(lay.bit_of, weights=self._votes**2, minlength=PAYLOAD_BITS))
        hard = (soft > 0).astype(np.uint8)
        score = self.score()
        payload = _chase(hard, np.abs(soft) / np.maximum(spread, 1e-9))
        if payload is None or score < Z_MIN:
            marker_acc = float(np.mean(hard[:MARKER_BITS] == MARKER_BIT_VALUES))
            return WatermarkReport(False, None, marker_acc, self.frames, score)
        truth = payload.to_bits()
        per_frame = [float(np.mean((fb > 0) == truth)) for fb in self._frame_bits]
        return WatermarkReport(
            found=True,
            payload=payload,
            bit_accuracy=float(np.mean(hard == truth)),
            frames_checked=self.frames,
            score=score,
            frame_bit_accuracy=float(np.mean(per_frame)),
        )


def chip_values(frame: np.ndarray) -> np.ndarray:
    """(GRID²,) high-passed mean luma per chip: the watermark's chips plus picture residue."""
    side = GRID * CANON_CELL
    gray = _gray(frame).astype(np.float32)
    h, w = gray.shape
    interp = cv2.INTER_AREA if h >= side and w >= side else cv2.INTER_LINEAR
    canon = cv2.resize(gray, (side, side), interpolation=interp)
    log = cv2.Laplacian(cv2.GaussianBlur(canon, (0, 0), LOG_SIGMA), cv2.CV_32F, ksize=3)
    # The embedded field's chips are positive bumps: the negative Laplacian peaks on them.
    return -cv2.resize(log, (GRID, GRID), interpolation=cv2.INTER_AREA).ravel()


def _chase(hard: np.ndarray, reliability: np.ndarray) -> WatermarkPayload | None:
    """The valid payload nearest to the hard decisions: flip subsets of the least reliable
    bits, cheapest first (Chase-2 decoding), until marker and CRC check."""
    weak = np.argsort(reliability)[:CHASE_BITS]
    subsets = sorted(
        (s for n in range(CHASE_BITS + 1) for s in itertools.combinations(range(CHASE_BITS), n)),
        key=lambda s: float(sum(reliability[weak[i]] for i in s)),
    )
    for subset in subsets:
        bits = hard.copy()
        bits[weak[list(subset)]] ^= 1
        try:
            return WatermarkPayload.from_bits(bits)
        except ValueError:
            continue
    return None


def detect_frames(
    frames: Iterable[np.ndarray], *, key: bytes | str = DEFAULT_KEY
) -> WatermarkReport:
    """Detect the watermark in upright RGB uint8 frames (any number, any order)."""
    detector = WatermarkDetector(key)
    for frame in frames:
        detector.add(frame)
    return detector.report()


def detect_file(
    path: str | Path, *, max_frames: int = 150, key: bytes | str = DEFAULT_KEY
) -> WatermarkReport:
    """Detect the watermark in a video file, checking at most ``max_frames`` frames spread
    evenly over the whole file (every decoded frame is still decoded; only some are checked)."""
    from latentdub.media.reader import iter_frames, probe_video

    if max_frames < 1:
        raise ValueError(f"max_frames must be ≥ 1, got {max_frames}")
    total = max(1, probe_video(path).num_frames)
    step = max(1, math.ceil(total / max_frames))
    detector = WatermarkDetector(key)
    for frame in iter_frames(path):
        if frame.index % step == 0:
            detector.add(frame.image)
            if detector.frames >= max_frames:
                break
    return detector.report()
