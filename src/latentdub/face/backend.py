"""Face detection + landmark backends, reduced to what alignment needs: three anchor points.

LatentSync aligns every face with a 3-point similarity: left-eyebrow centre, right-eyebrow centre
and nose centre (``face_alignment_constants.json``). A backend finds faces in one RGB image and
returns, per face, a box, those three anchors (same anatomical points whatever the landmark
model), a confidence and a yaw estimate. Alignment, tracking and selection never see the
landmark model, so another backend (InsightFace's 106 points, the official landmarks) can be
plugged in without touching them.

The default :class:`MediaPipeBackend` runs offline from the models shipped in the
``mediapipe==0.10.21`` wheel (Apache-2.0): the full-range BlazeFace detector finds faces of any
size in the whole frame, then Face Mesh (468 points, 3-D) runs on a square crop around each face,
which is what makes several faces and small faces in large frames work (Face Mesh on a whole
1080x1920 frame only finds faces that fill a good part of it).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from latentdub.errors import InputError
from latentdub.face.lips import lip_aperture

# -- anchor definitions ------------------------------------------------------------------------
# MediaPipe Face Mesh indices for the three LatentSync anchors, and why.
#
# Official 1.6 anchors: means of InsightFace 2d106 points {43,48,49,51,50} (image-left brow),
# {101..105} (image-right brow) and {74,77,83,86} (nose). The official code's own 106 → 68-point
# table (LMK_ADAPT_ORIGIN_ORDER in face_alignment_constants.json) says what these are in the
# familiar 68-point scheme: {43,48,49,51,50} = points 17-21 and {102..105,101} = points 22-26
# (the two brows, traced along the upper brow edge), 74 = point 28 and 86 = point 29 (the upper
# and middle nasal bridge); 77/83 are a symmetric pair beside the bridge. So the nose anchor is a
# point on the middle of the nasal bridge, NOT the centre of the whole nose (the 1.0/1.5 FAN rule
# mean(27..35) sits much lower).
#
# Face Mesh points at the same places (standard mesh ↔ 68-point correspondence):
#   brow 17-21 → 70, 63, 105, 66, 107      brow 22-26 → 336, 296, 334, 293, 300
#   bridge 28 → 197, 29 → 5, and 195 between them (a symmetric side pair would only add noise).
# Image-left / image-right is what matters (the template's first point is the image-left brow);
# for an upright face 70..107 always lie on the image-left brow.
#
# Measured (bench/bench_face.py --residuals, 8 frontal clips, 463 frames): after the official
# similarity fit the anchors sit 4.0 px (mean; p95 8.9, max 15.7 px on a pitched head) from their
# template points in the 256 crop, and the nose lands 1.7 px above its template point on
# average. With the FAN-style nose, mean(27..35) ≈ mesh (168,197,5,4,75,97,2,326,305), the mean
# residual is 7.6 px and the nose lands ~7 px low. What remains is person-to-person face shape
# and head pitch (2.4 px mean on some clips, 7.1 px on others); the official landmarks leave such
# a residual too, since three anchors never fit a fixed template exactly.
MP_BROW_IMAGE_LEFT: tuple[int, ...] = (70, 63, 105, 66, 107)
MP_BROW_IMAGE_RIGHT: tuple[int, ...] = (336, 296, 334, 293, 300)
MP_NOSE: tuple[int, ...] = (197, 195, 5)
#: Cheek points at the widest part of the face oval (for the yaw estimate).
MP_CHEEK_IMAGE_LEFT = 234
MP_CHEEK_IMAGE_RIGHT = 454


def mesh_anchors(landmarks: np.ndarray) -> np.ndarray:
    """The three LatentSync anchors (3, 2) from Face Mesh landmarks (468 or 478, ≥2 columns)."""
    pts = np.asarray(landmarks, dtype=np.float64)[:, :2]
    return np.stack(
        [
            pts[list(MP_BROW_IMAGE_LEFT)].mean(axis=0),
            pts[list(MP_BROW_IMAGE_RIGHT)].mean(axis=0),
            pts[list(MP_NOSE)].mean(axis=0),
        ]
    )


def mesh_yaw_degrees(landmarks: np.ndarray) -> float:
    """Head yaw from the 3-D mesh: angle of the cheek-to-cheek vector out of the image plane.

    Face Mesh z is in the same units as x (pixels here), so for a head turned by θ the vector
    between the two widest oval points is (w·cosθ, ·, w·sinθ). 0 = frontal, ±90 = profile; the
    sign tells the direction (only |yaw| is used). Measured: 2-12° on the frontal clips, ~20° on
    the "turned face" clip, 45-55° on the 3/4 audience faces of the Hamilton clip.
    """
    a = landmarks[MP_CHEEK_IMAGE_LEFT]
    b = landmarks[MP_CHEEK_IMAGE_RIGHT]
    return float(math.degrees(math.atan2(-(b[2] - a[2]), b[0] - a[0])))


# -- the interface ----------------------------------------------------------------------------
@dataclass
class FaceObservation:
    """One face in one image. Coordinates are image pixels (x right, y down)."""

    bbox: np.ndarray  # (4,) x0, y0, x1, y1 of the face (landmark extent when landmarks exist)
    anchors: np.ndarray  # (3, 2): image-left brow centre, image-right brow centre, nose centre
    score: float  # detector confidence in [0, 1]
    yaw: float | None = None  # degrees, 0 = frontal, ±90 = profile (None if unknown)
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (K, 2|3) if kept
    # Lip aperture (face.lips.lip_aperture), recorded by pass 1 for the active-speaker detector;
    # None when the backend cannot measure it (then it is taken from ``landmarks`` if kept).
    lip: float | None = None

    @property
    def size(self) -> float:
        """Face size in pixels: the larger side of the box."""
        return float(max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


@runtime_checkable
class FaceBackend(Protocol):
    """Finds faces in one upright RGB uint8 image.

    ``rois`` are optional boxes (x0, y0, x1, y1) where faces were on the previous frame; a
    backend may look there first (tracking) and may skip its whole-image search when
    ``search`` is False. Backends that cannot use them ignore both.

    This is the extension point for other landmark models: pass an instance to
    :func:`~latentdub.face.analyze_video` (``backend=``). The official pipeline uses InsightFace
    ``buffalo_l`` (SCRFD + 2d106, non-commercial licence, not shipped); a backend for it would
    return as anchors the means of the 106-point indices {43,48,49,51,50}, {101..105} and
    {74,77,83,86}.
    """

    name: str

    def detect(
        self, image: np.ndarray, *, rois: Sequence[np.ndarray] = (), search: bool = True
    ) -> list[FaceObservation]: ...

    def close(self) -> None: ...


# -- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the C++ start-up chatter of MediaPipe/TFLite (it writes straight to fd 2).

    Only wrapped around graph creation and each graph's runs until it first finds a face (that
    is when the messages come); set LATENTDUB_DEBUG=1 to see them.
    """
    if os.environ.get("LATENTDUB_DEBUG"):
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        _flush_c_stdio()  # buffered native messages must drain into /dev/null, not later
        os.dup2(saved, 2)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX libc
        pass


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _square_roi(
    box: np.ndarray, scale: float, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """A square around ``box`` scaled by ``scale``, clipped to the image; None if degenerate."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(box[2] - box[0], box[3] - box[1]) * scale / 2
    x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
    x1, y1 = min(width, math.ceil(cx + half)), min(height, math.ceil(cy + half))
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None
    return x0, y0, x1, y1


class MediaPipeBackend:
    """Full-range BlazeFace on the frame + Face Mesh per face crop (offline, Apache-2.0)."""

    name = "mediapipe"

    def __init__(
        self,
        *,
        min_score: float = 0.5,
        max_faces: int = 6,
        roi_scale: float = 1.8,
        max_roi_side: int = 512,
        keep_landmarks: bool = False,
    ) -> None:
        try:
            import mediapipe as mp
        except ImportError as err:  # pragma: no cover - mediapipe is a hard dependency
            raise InputError(
                "the MediaPipe face backend needs the package mediapipe==0.10.21 "
                "(pip install mediapipe==0.10.21)"
            ) from err
        solutions = getattr(mp, "solutions", None)
        if solutions is None:  # pragma: no cover - guards against mediapipe >= 0.10.30
            raise InputError(
                f"mediapipe {getattr(mp, '__version__', '?')} has no bundled face models; "
                "install mediapipe==0.10.21 (the newest release that ships them)"
            )
        self.min_score = min_score
        self.max_faces = max_faces
        self.roi_scale = roi_scale
        self.max_roi_side = max_roi_side
        self.keep_landmarks = keep_landmarks
        self._warm: set[str] = set()
        with _quiet_native_stderr():
            self._build(solutions, min_score)
            # One tiny frame through every graph, so the worker threads finish their start-up
            # logging while it is still hidden.
            blank = np.zeros((64, 64, 3), np.uint8)
            for graph in ("_detector", "_crop_detector", "_mesh"):
                getattr(self, graph).process(blank)

    def _build(self, solutions: Any, min_score: float) -> None:
        # model_selection=1: the full-range (sparse) model finds faces down to ~20 px in a
        # 1080p frame; the short-range one misses the small faces of wide and portrait shots.
        self._detector = solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_score
        )
        # Scores a tracked crop that the full-frame search did not confirm on this frame.
        self._crop_detector = solutions.face_detection.FaceDetection(
            model_selection=0, min_detection_confidence=min_score
        )
        # static_image_mode: every crop is landmarked from scratch (no hidden state that could
        # drift across cuts or swap faces); temporal stability is our own smoothing's job.
        self._mesh = solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=1,
            refine_landmarks=False,
            min_detection_confidence=min_score,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        for attr in ("_detector", "_crop_detector", "_mesh"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
                setattr(self, attr, None)

    def __enter__(self) -> MediaPipeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- detection ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild an equivalent backend (in a worker process)."""
        return {
            "min_score": self.min_score,
            "max_faces": self.max_faces,
            "roi_scale": self.roi_scale,
            "max_roi_side": self.max_roi_side,
            "keep_landmarks": self.keep_landmarks,
        }

    def _process(self, graph: str, image: np.ndarray) -> Any:
        """Run one MediaPipe graph, hiding the warnings it logs on fd 2 until its first face."""
        solution = getattr(self, graph)
        if graph in self._warm:
            return _run_graph(solution, image)
        with _quiet_native_stderr():
            result = _run_graph(solution, image)
        if result:
            self._warm.add(graph)
        return result

    def _search(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        h, w = image.shape[:2]
        found: list[tuple[np.ndarray, float]] = []
        for det in self._process("_detector", image) or []:
            rel = det.location_data.relative_bounding_box
            box = np.array(
                [
                    rel.xmin * w,
                    rel.ymin * h,
                    (rel.xmin + rel.width) * w,
                    (rel.ymin + rel.height) * h,
                ],
                dtype=np.float64,
            )
            if box[2] - box[0] >= 8 and box[3] - box[1] >= 8:
                found.append((box, float(det.score[0])))
        found.sort(key=lambda item: -(item[0][2] - item[0][0]) * (item[0][3] - item[0][1]))
        return found[: self.max_faces]

    def _landmark(
        self, image: np.ndarray, roi: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Face Mesh on one crop → (landmarks (468, 3) in image pixels, crop used)."""
        x0, y0, x1, y1 = roi
        crop = image[y0:y1, x0:x1]
        side = max(x1 - x0, y1 - y0)
        scale = 1.0
        if side > self.max_roi_side:  # the mesh model sees 192x192 anyway; shrink big crops first
            scale = self.max_roi_side / side
            crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        crop = np.ascontiguousarray(crop)
        faces = self._process("_mesh", crop)
        if not faces:
            return None
        ch, cw = crop.shape[:2]
        lm = faces[0].landmark
        pts = np.array([(p.x, p.y, p.z) for p in lm], dtype=np.float64)
        pts[:, 0] = pts[:, 0] * cw / scale + x0
        pts[:, 1] = pts[:, 1] * ch / scale + y0
        pts[:, 2] = pts[:, 2] * cw / scale
        return pts, crop

    def _crop_score(self, crop: np.ndarray) -> float:
        return max(
            (float(d.score[0]) for d in self._process("_crop_detector", crop) or []), default=0.0
        )

    def ops(self, image: np.ndarray) -> FrameOps:
        """The three pure per-frame operations :meth:`detect` is built from, on ``image``."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}"
            )
        return LiveOps(self, image)

    def detect(
        self, image: np.ndarray, *, rois: Sequence[np.ndarray] = (), search: bool = True
    ) -> list[FaceObservation]:
        return self.assemble(self.ops(image), image.shape[0], image.shape[1], rois, search)

    def assemble(
        self,
        ops: FrameOps,
        height: int,
        width: int,
        rois: Sequence[np.ndarray] = (),
        search: bool = True,
    ) -> list[FaceObservation]:
        """The faces of one frame from its operations: :meth:`detect` without the image."""
        return assemble_faces(
            ops,
            height,
            width,
            rois,
            search,
            min_score=self.min_score,
            max_faces=self.max_faces,
            roi_scale=self.roi_scale,
        )


def assemble_faces(
    ops: FrameOps,
    height: int,
    width: int,
    rois: Sequence[np.ndarray],
    search: bool,
    *,
    min_score: float,
    max_faces: int,
    roi_scale: float,
) -> list[FaceObservation]:
    """Proposals → landmarked, de-duplicated, scored faces of one frame.

    Everything that depends on the tracking state (which ROIs, which proposals win) is decided
    here; the image is touched only through ``ops``, whose results depend on the frame and an
    integer crop alone. That split lets the parallel analysis compute ``ops`` ahead in worker
    processes and replay this part exactly, in frame order.
    """
    h, w = height, width
    detections = ops.search() if search else []
    # Proposals: detector boxes first, then tracked boxes that no detection already covers.
    proposals: list[tuple[np.ndarray, float | None]] = [(b, s) for b, s in detections]
    for roi in rois:
        roi = np.asarray(roi, dtype=np.float64)
        if all(box_iou(roi, b) < 0.3 for b, _ in proposals):
            proposals.append((roi, None))

    faces: list[FaceObservation] = []
    for box, score in proposals[:max_faces]:
        # A detector box is tight around eyes-to-mouth; the tracked box is the mesh extent.
        square = _square_roi(box, roi_scale if score is not None else roi_scale * 0.85, w, h)
        if square is None:
            continue
        mesh = ops.landmark(square)
        if mesh is None:
            continue
        if any(box_iou(mesh.bbox, f.bbox) > 0.5 for f in faces):
            continue  # the same face reached from two proposals
        if score is None:
            score = ops.crop_score(square)
            if score < min_score:
                continue
        faces.append(
            FaceObservation(
                bbox=mesh.bbox,
                anchors=mesh.anchors,
                score=score,
                yaw=mesh.yaw,
                landmarks=mesh.landmarks,
                lip=mesh.lip,
            )
        )
    return faces


# -- per-frame operations -----------------------------------------------------------------------
Square = tuple[int, int, int, int]


@dataclass(frozen=True)
class MeshResult:
    """What one Face Mesh run on one integer crop gives, already in frame pixels."""

    bbox: np.ndarray  # (4,) landmark extent
    anchors: np.ndarray  # (3, 2)
    yaw: float
    landmarks: np.ndarray | None = None  # (468, 3), only when the backend keeps landmarks
    lip: float = math.nan  # lip aperture, always measured (4 bytes a face, ~10 µs)

    @staticmethod
    def from_points(pts: np.ndarray, *, keep: bool = False) -> MeshResult:
        bbox = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
        # The aperture is computed here, from the points every path already has, so the serial
        # loop, the workers' records and their replay all carry it without keeping 468 points.
        return MeshResult(
            bbox, mesh_anchors(pts), mesh_yaw_degrees(pts), pts if keep else None, lip_aperture(pts)
        )


class FrameOps(Protocol):
    """The image-dependent operations of :meth:`MediaPipeBackend.assemble` on one frame.

    Each result depends only on the frame's pixels and the arguments (an integer crop), never
    on tracking state, so they can be computed anywhere and looked up later.
    """

    def search(self) -> list[tuple[np.ndarray, float]]: ...

    def landmark(self, square: Square) -> MeshResult | None: ...

    def crop_score(self, square: Square) -> float: ...


class LiveOps:
    """:class:`FrameOps` computed on the frame by a :class:`MediaPipeBackend`."""

    def __init__(self, backend: MediaPipeBackend, image: np.ndarray) -> None:
        self.backend = backend
        self.image = image
        self._crops: dict[Square, np.ndarray] = {}

    def search(self) -> list[tuple[np.ndarray, float]]:
        return self.backend._search(self.image)

    def landmark(self, square: Square) -> MeshResult | None:
        found = self.backend._landmark(self.image, square)
        if found is None:
            return None
        pts, crop = found
        self._crops[square] = crop
        return MeshResult.from_points(pts, keep=self.backend.keep_landmarks)

    def crop_score(self, square: Square) -> float:
        crop = self._crops.get(square)
        if crop is None:  # asked without a landmark run first (a replay): cut the same crop
            x0, y0, x1, y1 = square
            crop = self.image[y0:y1, x0:x1]
            side = max(x1 - x0, y1 - y0)
            if side > self.backend.max_roi_side:
                scale = self.backend.max_roi_side / side
                crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            crop = np.ascontiguousarray(crop)
        return self.backend._crop_score(crop)


def _run_graph(solution: Any, image: np.ndarray) -> Any:
    """``SolutionBase.process`` for a one-image-in, one-stream-out graph, returning that stream.

    The same packet, timestamp and graph calls as ``process`` (so the same results), without
    building a namedtuple class and converting every output stream on each call, which costs
    more than a small graph run. Falls back to ``process`` if mediapipe's internals differ.
    """
    try:
        inputs = solution._input_stream_type_info
        outputs = solution._output_stream_type_info
        graph = solution._graph
        ((in_name, in_type),) = inputs.items()
        ((out_name, out_type),) = outputs.items()
    except (AttributeError, ValueError):  # pragma: no cover - another mediapipe layout
        result = solution.process(image)
        return getattr(result, "detections", None) or getattr(result, "multi_face_landmarks", None)
    solution._graph_outputs.clear()
    solution._simulated_timestamp += 33333
    if image.flags.c_contiguous and image.flags.writeable:
        # MediaPipe copies a writable array into every packet (6 MB per 1080p frame, ~2 ms with
        # its page faults) but references a read-only one: same pixels, so the same results.
        # The view keeps the array alive; nothing writes to it while the graph runs (we wait).
        image = image.view()
        image.flags.writeable = False
    packet = solution._make_packet(in_type, image).at(solution._simulated_timestamp)
    graph.add_packet_to_input_stream(stream=in_name, packet=packet)
    graph.wait_until_idle()
    out = solution._graph_outputs.get(out_name)
    return None if out is None else solution._get_packet_content(out_type, out)


def default_backend() -> FaceBackend:
    return MediaPipeBackend()
