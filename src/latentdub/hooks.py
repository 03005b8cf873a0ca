"""The caller's hooks into a dub: what a frame filter is told, and the two hook signatures.

A bottom-floor module: the render engine, the pipeline and the provenance hooks (watermark,
signing, audit) all speak these types without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FrameInfo:
    """What a frame filter is told about the frame it gets."""

    index: int  # output frame number
    pts: int  # output timestamp in ``time_base`` ticks
    time_s: float
    source_index: int  # the input frame shown here
    dubbed: bool
    box: tuple[float, float, float, float] | None  # face box (x0, y0, x1, y1) in frame px, if dubbed
    matrix: np.ndarray | None  # (2, 3) frame px → crop px, if dubbed


#: ``filter(frame RGB uint8 HxWx3, info) -> frame`` for every output frame, just before encoding.
FrameFilter = Callable[[np.ndarray, FrameInfo], np.ndarray]
#: ``finalizer(tmp_path) -> mapping | None`` on the finished file, before the atomic rename.
Finalizer = Callable[[Path], Mapping[str, Any] | None]
