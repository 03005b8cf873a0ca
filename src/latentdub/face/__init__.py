"""The face layer: detection backend, tracking, speaker choice, LatentSync alignment, mask, paste-back.

Two passes keep memory bounded: :func:`analyze_video` decodes once and keeps only per-frame
numbers; :func:`select_face` picks the face and computes the smoothed crop matrices; the
pipeline then decodes again, cuts crops with :class:`Aligner` and pastes results back with
:func:`paste_back`.
"""

from latentdub.face.aligner import Aligner
from latentdub.face.alignment import (
    AlignGeometry,
    align_matrices,
    anchor_residuals,
    geometry,
    similarity_transform,
    warp_face,
)
from latentdub.face.analysis import FaceAnalysis, TrackData, TrackInfo, analyze_video
from latentdub.face.backend import (
    FaceBackend,
    FaceObservation,
    MediaPipeBackend,
)
from latentdub.face.mask import blend_weights, mouth_masks
from latentdub.face.paste import blend_region_mask, paste_back
from latentdub.face.selection import FaceSelection, PassthroughRange, parse_policy, select_face

__all__ = [
    "AlignGeometry",
    "Aligner",
    "FaceAnalysis",
    "FaceBackend",
    "FaceObservation",
    "FaceSelection",
    "MediaPipeBackend",
    "PassthroughRange",
    "TrackData",
    "TrackInfo",
    "align_matrices",
    "analyze_video",
    "anchor_residuals",
    "blend_region_mask",
    "blend_weights",
    "geometry",
    "mouth_masks",
    "parse_policy",
    "paste_back",
    "select_face",
    "similarity_transform",
    "warp_face",
]
