"""Which H.264 encoder the writer uses: libx264, or NVIDIA NVENC when asked for and usable.

``encoder="x264"`` is libx264 with the given CRF and preset. ``"nvenc"`` is FFmpeg's
``h264_nvenc`` through PyAV, and it is an error if it cannot be opened. ``"auto"`` uses NVENC
when it opens and otherwise libx264, logging one line that says why. Whether NVENC opens is
probed once per process by opening a tiny encoder (:func:`nvenc_status`). The x264 settings map
onto NVENC as follows (:func:`nvenc_options`):

- ``preset``: ultrafast→p1, superfast→p2, veryfast→p3, faster/fast→p4, medium→p5,
  slow→p6, slower/veryslow→p7, with ``tune=hq``;
- ``crf``: constant quality ``rc=vbr -cq CRF`` with no bitrate cap. NVENC's cq is a QP-like
  scale close to x264's CRF; at the same number NVENC is a little larger or softer;
- ``crf=0``: ``tune=lossless``, as x264's CRF 0 is lossless;
- spatial AQ is on, like x264's default adaptive quantisation.
"""

from __future__ import annotations

import logging
import threading
from fractions import Fraction

import av
import av.logging

from latentdub.errors import InputError

log = logging.getLogger(__name__)

#: libx264's presets, fastest first.
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
#: ``VideoWriter(encoder=…)`` choices and the FFmpeg encoder each one means.
VIDEO_ENCODERS = ("auto", "x264", "nvenc")
_X264, _NVENC = "libx264", "h264_nvenc"
#: x264 preset → NVENC preset (p1 fastest … p7 best quality per bit). NVENC has 7 levels for
#: x264's 10, so neighbours share one at the slow end (where NVENC gains little per level).
NVENC_PRESETS: dict[str, str] = {
    "ultrafast": "p1", "superfast": "p2", "veryfast": "p3", "faster": "p4", "fast": "p4",
    "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7", "placebo": "p7",
}  # fmt: skip

# The NVENC probe's answer, computed once per process.
_probe_lock = threading.Lock()
_nvenc_probe: tuple[bool, str] | None = None


def nvenc_status() -> tuple[bool, str]:
    """``(True, "")`` if ``h264_nvenc`` can be opened here, else ``(False, why)``. Cached per process.

    The probe opens a real 256x256 encoder: that is the only reliable test. The codec may be
    compiled into PyAV's FFmpeg without a usable NVIDIA driver or GPU, and some GPUs (H100/H200,
    A100) have no NVENC engine at all.
    """
    global _nvenc_probe
    with _probe_lock:
        if _nvenc_probe is None:
            _nvenc_probe = _probe_nvenc()
        return _nvenc_probe


def _probe_nvenc() -> tuple[bool, str]:
    if _NVENC not in av.codecs_available:
        return False, f"this PyAV build has no {_NVENC} encoder"
    return _try_encoder(_NVENC, {"preset": "p1"})


def _try_encoder(name: str, options: dict[str, str]) -> tuple[bool, str]:
    """Open encoder ``name`` at 256x256 4:2:0 and encode one frame: ``(True, "")`` or ``(False, why)``."""
    # FFmpeg's own log line ("Cannot load libcuda.so.1") is the useful part of the failure;
    # PyAV only keeps it while logging is switched on, so switch it on for this one call.
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(True) as logs:
            try:
                cc = av.CodecContext.create(name, "w")
                cc.width, cc.height, cc.pix_fmt = 256, 256, "yuv420p"
                cc.time_base = Fraction(1, 25)
                cc.framerate = Fraction(25)
                cc.options = dict(options)
                cc.open()
                frame = av.VideoFrame(256, 256, "yuv420p")
                frame.pts = 0
                cc.encode(frame)
                cc.encode(None)  # flush: the session really produced a packet
            except Exception as err:  # a probe must never take the writer down, whatever it hits
                said = "; ".join(dict.fromkeys(m.strip() for _, _, m in logs if m.strip()))
                return False, f"{name} could not be opened ({said or err})"
    finally:
        av.logging.set_level(previous)
    return True, ""


def _reset_nvenc_probe() -> None:
    """Forget the cached probe (for tests)."""
    global _nvenc_probe
    with _probe_lock:
        _nvenc_probe = None


def check_encoder(encoder: str) -> None:
    """Fail now, with a clear message, if ``encoder`` is unknown or is ``"nvenc"`` and NVENC cannot open.

    The pipeline calls this before any work, so an explicit NVENC request on a machine without
    one fails in seconds rather than after face analysis.
    """
    if encoder not in VIDEO_ENCODERS:
        raise InputError(
            f"Unknown video encoder {encoder!r}; use one of {', '.join(VIDEO_ENCODERS)}."
        )
    if encoder == "nvenc":
        ok, why = nvenc_status()
        if not ok:
            raise InputError(
                f"encoder nvenc was requested, but NVIDIA NVENC is not usable here: {why}. "
                "Use encoder auto (falls back to x264) or x264."
            )


def resolve_encoder(encoder: str) -> str:
    """The FFmpeg encoder name for an ``encoder`` choice (``libx264`` or ``h264_nvenc``)."""
    check_encoder(encoder)
    if encoder == "x264":
        return _X264
    if encoder == "nvenc":
        return _NVENC
    ok, why = nvenc_status()
    if ok:
        log.info("encoder auto: using h264_nvenc (NVIDIA NVENC)")
        return _NVENC
    log.info("encoder auto: using libx264 because %s", why)
    return _X264


def nvenc_options(crf: float, preset: str) -> dict[str, str]:
    """``h264_nvenc`` options equivalent to x264's ``crf`` and ``preset`` (see the module notes)."""
    options = {"preset": NVENC_PRESETS[preset], "spatial-aq": "1"}
    if crf <= 0:
        options["tune"] = "lossless"
    else:
        options.update({"tune": "hq", "rc": "vbr", "cq": str(max(1, min(51, round(crf))))})
    return options
