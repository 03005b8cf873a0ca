"""How freed frame buffers go back to the OS (glibc only; a no-op elsewhere).

Frames, crops and activations are allocated in one thread and freed in another. glibc's
adaptive mmap threshold soon serves frame-sized buffers from per-thread heaps, whose
fragmentation makes RSS creep up over a long video. Two cures:

* ``mmap``: a fixed 1 MiB mmap threshold: every large buffer is its own mapping, returned the
  moment it is freed. RSS equals what is live, but every large allocation is fresh,
  page-faulted memory, which slows CPU inference (many large activations per U-Net step).
* ``trim``: leave malloc alone and hand the free pages of every heap back with
  ``malloc_trim(0)`` once per written window.

``LATENTDUB_MALLOC`` chooses (``mmap``, ``trim`` or ``default`` for neither).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import cache

POLICIES = ("mmap", "trim", "default")
# Measured (bench/bench_memory.py, tiny model, 10 s vs 120 s input, 2-core CPU): trim keeps the
# long/short peak-RSS ratio at 1.05 (mmap: 1.16) and runs the long dub in 168 s (mmap: 209 s;
# its U-Net steps page-fault every activation).
DEFAULT_POLICY = "trim"


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def policy() -> str:
    value = os.environ.get("LATENTDUB_MALLOC", DEFAULT_POLICY).strip().lower()
    return value if value in POLICIES else DEFAULT_POLICY


def configure() -> None:
    """Apply the policy's allocator setting (once per dub; cheap)."""
    libc = _libc()
    if libc is None or policy() != "mmap":
        return
    m_mmap_threshold = -3
    with contextlib.suppress(AttributeError):
        libc.mallopt(m_mmap_threshold, 1 << 20)


def release() -> None:
    """After a window is written: give freed heap pages back (``trim`` policy only)."""
    libc = _libc()
    if libc is None or policy() != "trim":
        return
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
