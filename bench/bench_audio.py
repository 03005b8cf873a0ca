"""Speed of Whisper-tiny feature extraction, and the size of the 30 s seam, on real speech.

Random-init tiny encoder (the structure, not the weights, sets both the cost and the seam),
the 60 s English recording from ../shared/media, optionally looped to ``--seconds``.

    python bench/bench_audio.py [--seconds 60] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from latentdub.audio.features import AudioFeatureExtractor, log_mel_spectrogram
from latentdub.models.whisper import TINY_DIMS, WhisperEncoder

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"


def _speech(seconds: float) -> np.ndarray:
    wave, rate = sf.read(MEDIA / "audio_musetalk_eng_60s_16k.wav", dtype="float32")
    assert rate == 16000
    reps = int(np.ceil(seconds * rate / wave.size))
    return np.tile(wave, reps)[: int(seconds * rate)]


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _seam_ratio(features: torch.Tensor, boundaries: list[int]) -> float:
    """Largest step at the given row boundaries / 99.9th percentile of all other steps."""
    jumps = (features[1:] - features[:-1]).float().flatten(1).norm(dim=1)
    mask = torch.ones_like(jumps, dtype=torch.bool)
    for b in boundaries:
        mask[max(0, b - 60) : b + 60] = False
    p999 = torch.quantile(jumps[mask], 0.999)
    return float(max(jumps[b - 1] for b in boundaries) / p999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = WhisperEncoder(TINY_DIMS)
    wave = _speech(args.seconds)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, audio {args.seconds:.0f} s")
    mel_s = _best(lambda: log_mel_spectrogram(torch.from_numpy(wave).to(args.device)), args.repeats)
    print(f"log-mel: {mel_s * 1000:.0f} ms")
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.device != "cpu" else [])
    results: dict[tuple[bool, torch.dtype], torch.Tensor] = {}
    for official in (True, False):
        for dtype in dtypes:
            extractor = AudioFeatureExtractor(encoder, args.device, dtype, official=official)
            extractor(wave[:16000])  # warm-up
            seconds = _best(lambda ex=extractor: ex(wave), args.repeats)
            results[(official, dtype)] = extractor(wave)
            mode = "official" if official else "seamless"
            print(f"{mode:9s} {dtype!s:15s} {seconds:6.2f} s  ({args.seconds / seconds:5.1f}x real time)")
    n = results[(True, torch.float32)].shape[0]
    seams = list(range(1500, n, 1500))
    if seams:
        print(f"official seam step / p99.9 elsewhere: {_seam_ratio(results[(True, torch.float32)], seams):.2f}")
        print(f"seamless same rows / p99.9 elsewhere: {_seam_ratio(results[(False, torch.float32)], seams):.2f}")


if __name__ == "__main__":
    main()
