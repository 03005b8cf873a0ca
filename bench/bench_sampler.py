"""Opt-in sampler profiles against the official DDIM-20: diffusion time and how far the output moves.

One real dub per profile (same clip, audio, seed, model) through the library; for each:

* ``diffusion s``: the pipeline's own diffusion-stage wall time;
* ``|Δ| mouth``: mean and max |Δ| (8-bit levels) of the generated crops against DDIM-20's,
  over the regenerated mouth region only (the rest of the crop is the original);
* ``|Δ| frame``: mean |Δ| of the decoded output frames against DDIM-20's output.

The default model is the random tiny one (``latentdub weights make-tiny``, CPU): the time ratio
is meaningful, the |Δ| only says that the output changes, not how good it looks. Pass
``--weights`` (an official-layout folder) and ``--device cuda`` for real numbers.

    .venv/bin/python bench/bench_sampler.py [--profiles ddim:20 ddim:10 dpm++:10 dpm++:20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from latentdub import LipSyncPipeline
from latentdub.diffusion import WindowDiffusion
from latentdub.media.reader import iter_frames

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
sys.path.insert(0, str(ROOT / "tests"))
from cli_helpers import TEST_CONSENT  # noqa: E402  (a bench consent record, like the tests')


def record_crops(store: dict[int, np.ndarray]) -> Callable[[], None]:
    """Keep every window's generated crops (by first output frame); returns the undo.

    Hooks :meth:`WindowDiffusion.generate`, the one loop every render path runs.
    """
    original = WindowDiffusion.generate

    def call(self: WindowDiffusion, crops: Any, tokens: Any, starts: Any, **kwargs: Any) -> Any:
        out = original(self, crops, tokens, starts, **kwargs)
        host = out.cpu().numpy()
        frames = len(host) // len(starts)
        for i, start in enumerate(starts):
            store[int(start)] = host[i * frames : (i + 1) * frames].copy()
        return out

    WindowDiffusion.generate = call  # type: ignore[method-assign]

    def undo() -> None:
        WindowDiffusion.generate = original  # type: ignore[method-assign]

    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["ddim:20", "ddim:10", "dpm++:10", "dpm++:20"],
                        help="sampler:steps; the first is the reference")  # fmt: skip
    parser.add_argument("--video", type=Path, default=MEDIA / "retalking_face3_woman_25fps.mp4")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of speech to dub")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: a tiny random model)")
    parser.add_argument("--version", default="1.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-deepcache", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per profile; the best time is kept")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared machine)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        weights = args.weights
        if weights is None:
            from latentdub.weights import make_tiny

            weights = make_tiny(tmp / "tiny")
        pipe = LipSyncPipeline.from_pretrained(weights, version=args.version, device=args.device)
        if hasattr(pipe, "acceleration"):
            pipe.acceleration = "reference"  # per-window calls, so the crops can be seen
        data, rate = sf.read(str(MEDIA / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
        sf.write(str(tmp / "speech.wav"), data[: int(args.seconds * rate)], rate)
        mouth = (pipe.pixel_mask[0, 0].numpy() < 0.5)  # the regenerated region of a crop

        print(f"{args.video.name}, {args.seconds:g} s of speech, model {pipe.model_info.get('name')}, "
              f"{args.device}, {os.cpu_count()} CPUs, {args.threads or 'default'} torch threads (load {os.getloadavg()[0]:.1f}), "
              f"deepcache {'off' if args.no_deepcache else 'on'}")  # fmt: skip
        print(f"{'profile':<10} {'diffusion s':>11} {'× ref':>6} {'|Δ| mouth mean':>15} {'max':>5} {'|Δ| frame mean':>15}")
        # Interleaved repeats, best time kept: the machine may be shared, and a slow spell
        # should not land on one profile only. The output is deterministic, so one copy is kept.
        best: dict[str, float] = {}
        outputs: dict[str, tuple[dict[int, np.ndarray], np.ndarray]] = {}
        for rep in range(args.repeats):
            for i, profile in enumerate(args.profiles):
                sampler, steps = profile.split(":")
                crops: dict[int, np.ndarray] = {}
                undo = record_crops(crops)
                out = tmp / f"{i}.mp4"
                try:
                    result = pipe(args.video, tmp / "speech.wav", out, sampler=sampler, steps=int(steps),
                                  deepcache=not args.no_deepcache, preset="ultrafast", consent=TEST_CONSENT)  # fmt: skip
                finally:
                    undo()
                seconds = result.timings.get("diffusion", float("nan"))
                best[profile] = min(best.get(profile, float("inf")), seconds)
                if rep == 0:
                    outputs[profile] = crops, np.stack([f.image for f in iter_frames(out)]).astype(np.int16)

        reference = args.profiles[0]
        ref_crops, ref_frames = outputs[reference]
        for profile in args.profiles:
            seconds = best[profile]
            ratio = seconds / best[reference]
            if profile == reference:
                print(f"{profile:<10} {seconds:>11.2f} {ratio:>6.2f} {'(reference)':>15}")
                continue
            crops, frames = outputs[profile]
            diffs = [np.abs(crops[k].astype(np.int16) - ref_crops[k].astype(np.int16))[:, mouth]
                     for k in sorted(crops) if k in ref_crops]  # fmt: skip
            region = np.concatenate([d.reshape(-1) for d in diffs]) if diffs else np.array([np.nan])
            frame_mean = float(np.abs(frames - ref_frames).mean())
            print(f"{profile:<10} {seconds:>11.2f} {ratio:>6.2f} "
                  f"{region.mean():>15.2f} {region.max():>5.0f} {frame_mean:>15.3f}")  # fmt: skip

if __name__ == "__main__":
    main()
