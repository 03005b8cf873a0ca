"""Occlusion-aware dubbing: never paint a mouth over a hand, a microphone or a glass.

* :mod:`.base`: :class:`FaceView` (what a detector sees), the :class:`OccluderDetector`
  protocol (the extension point: hands and appearance by default, a user's segmenter next to
  them), the occluder lattice over the aligned crop and its fixed zones;
* :mod:`.hands`: MediaPipe Hands (model in the mediapipe wheel);
* :mod:`.appearance`: does the lower face still look like this track's own face;
* :mod:`.tracker`: evidence → a per-frame mask over time (vote, coverage, pass-through, fades);
* :mod:`.analyzer`: :class:`FaceOcclusion`, one face slot driven frame by frame;
* :mod:`.stage`: pass 2's window hook and the result's report.
"""

from latentdub.occlusion.analyzer import FaceOcclusion, default_detectors, reference_indices
from latentdub.occlusion.base import GRID, FaceView, OccluderDetector, mouth_zone
from latentdub.occlusion.tracker import OccluderFrame, OcclusionTrack

__all__ = [
    "GRID",
    "FaceOcclusion",
    "FaceView",
    "OccluderDetector",
    "OccluderFrame",
    "OcclusionTrack",
    "default_detectors",
    "mouth_zone",
    "reference_indices",
]
