"""Report how well a dub is fitted to the picture, on real pairs from ../shared/media.

For each (video, speech) pair the video's own audio is the reference (the original
speaker) and the target length is that track's length. Printed per pair:

* stretch: a uniform WSOLA stretch to the target (achieved length, ratio, clamped?);
* align: pause alignment (achieved length, number of matched runs, stretch range);
* matched-boundary error (mean/max over every start/end of a matched run) for the speech as
  given, after the uniform stretch, and after alignment;
* an independent measure: the mean distance between the speech/pause boundaries detected
  again in the rendered output and those of the original (not using the aligner's matching).

Usage: ``python bench/report_fit.py [MEDIA_DIR]`` (default: ../shared/media).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from latentdub.audio.fit import (
    align_to_reference,
    detect_speech,
    mean_boundary_distance,
    stretch_to_duration,
)
from latentdub.media.audio_io import load_audio

PAIRS = [
    ("vexpress_aoc_29.97fps.mp4", "audio_vexpress_aoc_44k.mp3"),  # same speech (sanity)
    ("retalking_face2_man_25fps.mp4", "audio_echomimic_en_24k.wav"),
    ("retalking_face2_man_25fps.mp4", "audio_retalking_1_44k.wav"),
    ("liveportrait_d20_man_25fps.mp4", "audio_sadtalker_french_48k_24bit.wav"),
    ("latentsync_demo1_portrait_hevc_25fps.mp4", "audio_latentsync_demo1_16k.wav"),
    ("infinitetalk_hdtf_man_25fps.mp4", "audio_sadtalker_hdtf_radio31_16k.wav"),
    ("sadtalker_wda_katiehill_25fps_mpeg4.mp4", "audio_sadtalker_hdtf_radio31_16k.wav"),
    ("vexpress_aoc_29.97fps.mp4", "audio_vexpress_chattts_31s_24k.mp3"),  # far too long
]


def _ms(values: tuple[float, ...]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values) * 1000:.0f}/{np.max(values) * 1000:.0f}"


def main(media: Path) -> None:
    print(
        "| video (reference) | speech | new s | target s | stretch: s, ratio | align: s "
        "| runs (stretch range) | matched-boundary err ms mean/max: raw · uniform · aligned "
        "| re-detected boundary dist ms: uniform → aligned | align time s |"
    )
    print("|" + "---|" * 10)
    for video, speech in PAIRS:
        ref = load_audio(media / video)
        new = load_audio(media / speech)
        target = ref.duration_s
        uni = stretch_to_duration(new, target)
        start = time.perf_counter()
        res = align_to_reference(new, ref)
        took = time.perf_counter() - start
        ref_segs = detect_speech(ref)
        d_uni = mean_boundary_distance(detect_speech(uni.clip), ref_segs) * 1000
        d_ali = mean_boundary_distance(detect_speech(res.clip), ref_segs) * 1000
        ratios = [m.ratio for m in res.matches]
        runs = f"{len(res.matches)} ({min(ratios):.2f}–{max(ratios):.2f}x)" if ratios else "0"
        clamp = lambda r: " (clamped)" if r.clamped else ""  # noqa: E731
        print(
            f"| {video} | {speech} | {new.duration_s:.2f} | {target:.3f} "
            f"| {uni.achieved_s:.3f}, {uni.ratio:.3f}x{clamp(uni)} | {res.achieved_s:.3f}{clamp(res)} "
            f"| {runs} | {_ms(res.errors_raw_s)} · {_ms(res.errors_uniform_s)} · "
            f"{_ms(res.errors_aligned_s)} | {d_uni:.0f} → {d_ali:.0f} | {took:.2f} |"
        )


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1].parent / "shared" / "media"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
