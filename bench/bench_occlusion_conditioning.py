"""Does keeping the occluder in the U-Net's masked conditioning image change the generated mouth?

One 16-frame window of real aligned crops (a clean clip) gets a dark bar (a microphone seen
edge-on) over the left of the mouth in crop space. The window is generated twice with the same
seed: the occluder shown to the model in the masked image (latentdub's default) and not (the
official conditioning; the composite keeps the occluder either way). Printed: mean and max
|Δ| (8-bit levels) of the composited crops in the generated region outside the occluder, near
its edge (≤ 16 px) and further away, and inside it (0: the composite keeps the original there).

With random weights (``--weights`` absent: a tiny random model is made) this only shows that the
conditioning reaches the output; what real weights do with it is in the README.

    python bench/bench_occlusion_conditioning.py [--weights DIR] [--clip FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from latentdub import LipSyncPipeline
from latentdub.face import analyze_video, select_face
from latentdub.face.mask import generated_region
from latentdub.media.reader import iter_frames

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--clip", type=Path, default=MEDIA / "retalking_face3_woman_25fps.mp4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from latentdub.weights import make_tiny

            weights = make_tiny(Path(tmp) / "tiny")
        pipe = LipSyncPipeline.from_pretrained(weights, device="cpu")
        res = pipe.resolution
        sel = select_face(analyze_video(args.clip), "largest", resolution=res)
        frames = [f.image for _, f in zip(range(16), iter_frames(args.clip), strict=False)]
        crops = pipe.aligner.warp_batch(frames, sel.matrices[:16])
        s = res / 256
        occ = np.zeros((res, res), np.float32)
        occ[int(120 * s) :, int(92 * s) : int(122 * s)] = 1.0
        crops[:, occ > 0] = (38, 40, 46)
        occluders = np.repeat(occ[None], 16, axis=0)
        tokens = torch.zeros((16, 50, pipe.audio_encoder.dims.n_audio_state), dtype=pipe.dtype)
        out = {}
        for shown in (True, False):
            diffusion = pipe.window_diffusion(_options())
            diffusion.occluder_conditioning = shown
            out[shown] = diffusion.generate([crops], [tokens], [0], occluders=[occluders]).cpu().numpy()
        delta = np.abs(out[True].astype(int) - out[False].astype(int)).max(axis=-1)
        gen = generated_region(res)
        dist = cv2.distanceTransform((occ == 0).astype(np.uint8), cv2.DIST_L2, 5)
        zones = {
            "inside the occluder": occ > 0,
            "generated, <= 16 px from it": gen & (occ == 0) & (dist <= 16 * s),
            "generated, further away": gen & (occ == 0) & (dist > 16 * s),
        }
        print(f"model: {pipe.model_info.get('name')}  resolution {res}")
        print(f"{'zone':32s} {'mean |Δ|':>9s} {'max |Δ|':>8s}")
        for name, zone in zones.items():
            d = delta[:, zone]
            print(f"{name:32s} {d.mean():9.2f} {d.max():8d}")


def _options():
    from latentdub import DubOptions

    return DubOptions(steps=5, guidance=1.5)


if __name__ == "__main__":
    main()
