"""Invisible watermark: every output frame says "AI-generated" and which job made it.

Scheme (key-seeded spread spectrum in luma, whole frames):

* **Payload**: 64 bits = 16-bit marker ``"AI"`` + 32-bit job id + CRC-16 over both, encoded
  with a rate-1/3 convolutional code (K = 7) into 210 coded bits.
* **Chips**: the frame is divided into a fixed :data:`GRID` x :data:`GRID` grid in *normalised*
  coordinates (the grid scales with the frame, so a 50 % downscale keeps it). Each of the
  25 600 chips carries one coded bit (~122 chips per coded bit, scattered over the whole frame by
  a key-seeded permutation) times a key-seeded ±1 sign.
* **Embedding**: the ±1 chip values are upsampled with a cubic kernel into a smooth random field
  (no block edges, no regular lattice for the eye to lock on), multiplied by a perceptual
  amplitude mask (≈1 grey level on flat areas, up to :data:`AMP_MAX` on fine texture, lowered
  where needed so that the frame's PSNR stays ≥ 40 dB) and added equally to R, G and B, i.e. to
  luma only. The same field goes on every frame, dubbed or not, so any excerpt carries it, at
  any frame rate.
* **Detection**: each frame is resized to a canonical square, high-passed (Laplacian of
  Gaussian: removes most of the picture, keeps the chip-scale field) and averaged per chip; the
  *sign* of each chip is accumulated over frames (signs: the heavy-tailed picture residue at
  edges cannot outvote the rest, and contrast changes do not matter). The coded bits' sums go
  through a soft Viterbi decoder.
* **Decision**: ``score`` is the z-score of the chips of the 48 coded bits that every mark
  shares (the encoder starts from state 0 and sees only marker bits for 16 steps):
  ``Σ s_c·A_c / sqrt(Σ A_c²)`` (A = accumulated signs, s = expected signs). For a video not
  marked with this key the key's signs are independent of the picture, so by Hoeffding
  ``P(score ≥ z) ≤ exp(−z²/2)`` whatever the content. ``found`` needs ``score ≥`` :data:`Z_MIN`
  (≤ 3.7e-6) *and* a decoded word whose 16 marker bits and 16 CRC bits check (2⁻³² ≈ 2.3e-10
  for noise).

Measured on real talking-head clips (``bench/bench_watermark.py`` and the tests): the
payload survives libx264 CRF 18 and 28, a 50 % downscale, a 2 s excerpt and a 15 fps re-encode
of 3 s clips from 458² to 1080x1920. Not designed for: crops, rotations, mirroring (the grid
must stay where it was) and frames under ~200 px after scaling.
"""

from __future__ import annotations

import hashlib
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

if TYPE_CHECKING:
    from latentdub.hooks import FrameInfo

# -- payload layout -------------------------------------------------------------------------------
MARKER = 0x4149  # ASCII "AI": the fixed "AI-generated" marker
MARKER_BITS = 16
JOB_ID_BITS = 32
CRC_BITS = 16
PAYLOAD_BITS = MARKER_BITS + JOB_ID_BITS + CRC_BITS  # 64

DEFAULT_KEY = b"latentdub/watermark/v1"

# -- geometry and strength (changing any of these breaks detection of existing files) ------------
GRID = 160  # chips per side, in normalised frame coordinates
CANON_CELL = 4  # detection: canonical pixels per chip (canonical frame = 640 x 640)
LOG_SIGMA = 1.25  # detection: Gaussian before the Laplacian, canonical pixels
MASK_SIDE = 512  # embedding: the mask is computed with the long side at most this many pixels
AMP_MIN = 1.0  # grey levels on flat areas: about the rounding step, invisible
AMP_GAIN = 1.5  # extra amplitude per grey level of local fine-texture RMS
AMP_MAX = 6.0  # strongest mark, only in busy texture (hair, foliage, fabric)
MAX_RMS = 2.5  # per-frame RMS cap in grey levels: PSNR ≥ 20·log10(255/2.5) ≈ 40.2 dB
Z_MIN = 5.0  # score needed for "found" (Hoeffding: ≤ 3.7e-6 on unmarked content)
# Convolutional code: constraint length 7, rate 1/3, the generators of LTE (octal 133, 171,
# 165; free distance 15). With soft Viterbi decoding the payload comes through at coded-bit
# error rates of ~10 % (50 % downscales of 512² clips), where sending each payload bit on its
# own chips loses one or two of the 64 bits.
CODE_MEMORY = 6
CODE_GENERATORS = (0o133, 0o171, 0o165)
CODED_BITS = (PAYLOAD_BITS + CODE_MEMORY) * len(CODE_GENERATORS)  # 210, trellis ends in state 0
# The first 16 steps see only marker bits (the encoder starts at 0): these coded bits are the
# same in every watermark, so their chips are the known pattern the score is computed on.
KNOWN_CODED_BITS = MARKER_BITS * len(CODE_GENERATORS)
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

    @property
    def hex(self) -> str:
        """The job id as everything shows it (verify, credentials, audit log, API): 8 hex digits,
        leading zeros kept."""
        return f"{self.job_id:0{JOB_ID_BITS // 4}x}"

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
    bit_of: np.ndarray  # (GRID², ) int64: which coded bit each chip carries
    known_chips: np.ndarray  # indices of the chips whose coded bit is the same in every mark
    known_sign: np.ndarray  # their expected sign (key sign x known coded bit)


@lru_cache(maxsize=8)
def _layout(key: bytes) -> _Layout:
    seed = int.from_bytes(hashlib.sha256(b"latentdub-watermark-layout:" + key).digest()[:16], "big")
    rng = np.random.default_rng(seed)
    n = GRID * GRID
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n)
    # Equal chips per coded bit, scattered: no bit depends on one region of the picture.
    bit_of = rng.permutation(np.arange(n) % CODED_BITS)
    known = _conv_encode(MARKER_BIT_VALUES)[:KNOWN_CODED_BITS]
    known_chips = np.flatnonzero(bit_of < KNOWN_CODED_BITS)
    known_sign = (sign[known_chips] * (2.0 * known[bit_of[known_chips]] - 1.0)).astype(np.float32)
    for a in (sign, bit_of, known_chips, known_sign):
        a.flags.writeable = False
    return _Layout(sign, bit_of, known_chips, known_sign)


# -- the convolutional code -----------------------------------------------------------------------
def _parity(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    for shift in (4, 2, 1):
        x ^= x >> shift
    return x & 1


_STATES = 1 << CODE_MEMORY
# Register = (input bit << CODE_MEMORY) | state; the next state drops the oldest bit.
_REG = (np.arange(2)[None, :] << CODE_MEMORY) | np.arange(_STATES)[:, None]  # (state, input)
_NEXT = _REG >> 1
_OUT = np.stack([_parity(_REG & g) for g in CODE_GENERATORS], axis=-1)  # (state, input, 3) 0/1


def _conv_encode(bits: np.ndarray) -> np.ndarray:
    """Coded bits (uint8 0/1) of ``bits`` followed by CODE_MEMORY zeros (back to state 0)."""
    state, out = 0, []
    for b in [*(int(x) for x in bits), *([0] * CODE_MEMORY)]:
        out.extend(_OUT[state, b])
        state = int(_NEXT[state, b])
    return np.array(out, dtype=np.uint8)


# Into each state lead exactly two transitions: both carry the input bit ns >> (memory - 1),
# from the two states that differ only in their oldest bit.
_IN_BIT = np.arange(_STATES) >> (CODE_MEMORY - 1)
_PRED = ((np.arange(_STATES) & (_STATES // 2 - 1)) << 1)[:, None] | np.arange(2)[None, :]


def _viterbi(soft: np.ndarray) -> np.ndarray:
    """Maximum-likelihood info bits for soft coded values (positive = 1), trellis from and to
    state 0. Path metric = correlation of the soft values with the path's ±1 coded bits."""
    n_gen = len(CODE_GENERATORS)
    steps = len(soft) // n_gen
    signs = 2.0 * _OUT - 1.0  # (state, input, n_gen)
    metric = np.full(_STATES, -np.inf)
    metric[0] = 0.0
    back = np.zeros((steps, _STATES), dtype=np.int64)  # which of the two predecessors won
    for t in range(steps):
        branch = signs @ soft[t * n_gen : (t + 1) * n_gen]  # (state, input)
        cand = metric[_PRED] + branch[_PRED, _IN_BIT[:, None]]  # (next state, 2)
        back[t] = np.argmax(cand, axis=1)
        metric = cand[np.arange(_STATES), back[t]]
    state, bits = 0, []
    for t in range(steps - 1, -1, -1):
        bits.append(int(_IN_BIT[state]))
        state = int(_PRED[state, back[t, state]])
    return np.array(bits[::-1][: steps - CODE_MEMORY], dtype=np.uint8)


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
        bits = _conv_encode(payload.to_bits()).astype(np.float32)
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
        mask = _cap_energy(_mask(_gray(small).astype(np.float32), plan.cell), plan.field_small)
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


def _cap_energy(mask: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Keep the frame's RMS change ≤ MAX_RMS (PSNR ≥ 40 dB) by lowering only the part above
    AMP_MIN: flat areas keep the amplitude that survives rounding, and the textured areas,
    where the picture drowns the chips anyway, give up what is too much.

    With mask = AMP_MIN + s·extra, the mean square of mask·field is a quadratic in s: solve it.
    """
    f2 = np.square(field)
    extra = mask - AMP_MIN
    a = AMP_MIN * AMP_MIN * float(np.mean(f2))
    b = 2.0 * AMP_MIN * float(np.mean(f2 * extra))
    c = float(np.mean(f2 * extra * extra))
    if a + b + c <= MAX_RMS * MAX_RMS or c <= 0.0:
        return mask
    s = (-b + math.sqrt(max(0.0, b * b - 4.0 * c * (a - MAX_RMS * MAX_RMS)))) / (2.0 * c)
    return AMP_MIN + max(0.0, min(1.0, s)) * extra


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

    * ``found``: the score passed :data:`Z_MIN` and the decoded payload has the "AI" marker
      and a valid CRC. The payload's 64 bits are then exactly the embedded ones.
    * ``score``: z-score of the chips whose coded bits every mark shares (≈ N(0, 1) on unmarked
      video, ≥ 5 means marked).
    * ``bit_accuracy``: agreement of the 64 decoded payload bits (majority over frames, then
      error correction) with the found payload: 1.0 whenever ``found`` (the CRC checks). If not
      found: agreement of the 16 decoded marker bits with the marker (≈ 0.5 on unmarked video).
    * ``coded_bit_accuracy``: the same before error correction: the fraction of the 210 coded
      bits whose majority vote over frames is right (the code corrects up to ~10 % wrong). If
      not found: over the 48 coded bits every mark shares.
    * ``frame_bit_accuracy``: if found, the mean over frames of the single-frame agreement of
      the coded bits (how much margin each frame has on its own).
    """

    found: bool
    payload: WatermarkPayload | None
    bit_accuracy: float | None
    frames_checked: int
    score: float
    coded_bit_accuracy: float | None = None
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
            "job_id_hex": None if self.payload is None else self.payload.hex,
            "bit_accuracy": self.bit_accuracy,
            "coded_bit_accuracy": self.coded_bit_accuracy,
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
        self._frame_bits: list[np.ndarray] = []  # per-frame hard coded bits, packed (27 bytes)
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        _check_frame(frame)
        signs = np.sign(chip_values(np.ascontiguousarray(frame)))
        self._votes += signs
        self._frame_bits.append(np.packbits(self._coded_sums(signs) > 0))
        self.frames += 1

    def _coded_sums(self, votes: np.ndarray) -> np.ndarray:
        lay = self._layout
        return np.bincount(lay.bit_of, weights=votes * lay.sign, minlength=CODED_BITS)

    def score(self) -> float:
        """z-score of the known chips: Σ s·A / sqrt(Σ A²) over them (see the module doc)."""
        lay = self._layout
        a = self._votes[lay.known_chips]
        norm = math.sqrt(float(np.dot(a, a)))
        return float(np.dot(a, lay.known_sign) / norm) if norm > 0 else 0.0

    def coded_soft(self) -> np.ndarray:
        """(210,) normalised soft coded bits: ≈ N(0, 1) each on unmarked video."""
        sums = self._coded_sums(self._votes)
        spread = np.bincount(self._layout.bit_of, weights=self._votes**2, minlength=CODED_BITS)
        return sums / np.sqrt(np.maximum(spread, 1e-12))

    def report(self) -> WatermarkReport:
        if self.frames == 0:
            return WatermarkReport(False, None, None, 0, 0.0)
        soft = self.coded_soft()
        hard = (soft > 0).astype(np.uint8)
        score = self.score()
        decoded = _viterbi(soft)
        try:
            payload: WatermarkPayload | None = WatermarkPayload.from_bits(decoded)
        except ValueError:  # marker or CRC wrong: noise, or a mark too damaged to read
            payload = None
        if payload is None or score < Z_MIN:
            known = _conv_encode(MARKER_BIT_VALUES)[:KNOWN_CODED_BITS]
            return WatermarkReport(
                found=False,
                payload=None,
                bit_accuracy=float(np.mean(decoded[:MARKER_BITS] == MARKER_BIT_VALUES)),
                frames_checked=self.frames,
                score=score,
                coded_bit_accuracy=float(np.mean(hard[:KNOWN_CODED_BITS] == known)),
            )
        coded = _conv_encode(payload.to_bits())
        per_frame = [
            float(np.mean(np.unpackbits(fb, count=CODED_BITS) == coded)) for fb in self._frame_bits
        ]
        return WatermarkReport(
            found=True,
            payload=payload,
            bit_accuracy=float(np.mean(decoded == payload.to_bits())),
            frames_checked=self.frames,
            score=score,
            coded_bit_accuracy=float(np.mean(hard == coded)),
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
