"""Encode speed per x264 preset (and NVENC where it opens) at 1080×1920, the dub's output size.

Real frames: the portrait HEVC demo clip from ../shared/media (1080×1920, 25 fps), decoded once
into memory, then encoded with crf 18 for each preset. Two figures per preset:

* ``writer fps``: :class:`~latentdub.media.writer.VideoWriter` end to end, as the pipeline uses
  it (RGB→YUV conversion, encode, mux, atomic rename);
* ``x264 fps``: the encoder alone on frames already in YUV 4:2:0.

plus the output bitrate and the PSNR against the source frames (what the preset buys).
The pipeline needs ≈ 21 fps to keep up with 1.6 @ 512 at 1.2 s per video-second and ≈ 63 fps
for 1.5 @ 256 at 0.4 s/s (issue 10); the preset that ``preset="auto"`` picks on CUDA (veryfast)
must stay above both on the GPU host. Figures taken on a shared machine are disturbed by its
load, which is printed with them.

    .venv/bin/python bench/bench_encode.py [--frames 50] [--presets medium fast veryfast ultrafast]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from latentdub.media.writer import VideoWriter, nvenc_options, nvenc_status

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIP = MEDIA / "latentsync_demo1_portrait_hevc_25fps.mp4"
NEEDED_FPS = {"1.6 @ 512 (1.2 s/s)": 25 / 1.2, "1.5 @ 256 (0.4 s/s)": 25 / 0.4}


def load_frames(path: Path, count: int) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        images = []
        for frame in container.decode(stream):
            images.append(frame.to_ndarray(format="rgb24"))
            if len(images) == count:
                break
        return images, Fraction(stream.average_rate or 25)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def writer_run(images: list[np.ndarray], fps: Fraction, preset: str, encoder: str, out: Path) -> float:
    h, w = images[0].shape[:2]
    start = time.perf_counter()
    with VideoWriter(out, width=w, height=h, time_base=1 / fps, fps=fps, crf=18, preset=preset,
                     encoder=encoder) as writer:  # fmt: skip
        for image in images:
            writer.write(image)
    return time.perf_counter() - start


def encoder_only(yuv: list[av.VideoFrame], fps: Fraction, codec: str, options: dict[str, str]) -> float:
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt = yuv[0].width, yuv[0].height, "yuv420p"
    cc.time_base, cc.framerate = 1 / fps, fps
    cc.options = options
    cc.open()
    start = time.perf_counter()
    for i, frame in enumerate(yuv):
        frame.pts = i
        cc.encode(frame)
    cc.encode(None)
    return time.perf_counter() - start


def quality(path: Path, images: list[np.ndarray]) -> float:
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return float(np.mean([psnr(a, b) for a, b in zip(decoded, images, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--presets", nargs="+", default=["medium", "fast", "veryfast", "ultrafast"])
    parser.add_argument("--clip", type=Path, default=CLIP)
    args = parser.parse_args()

    images, fps = load_frames(args.clip, args.frames)
    h, w = images[0].shape[:2]
    yuv = [av.VideoFrame.from_ndarray(im, format="rgb24").reformat(format="yuv420p") for im in images]
    ok, why = nvenc_status()
    print(f"{len(images)} frames {w}x{h} from {args.clip.name}, crf 18, {os.cpu_count()} CPUs "
          f"(load {os.getloadavg()[0]:.1f}); NVENC: {'available' if ok else why}")  # fmt: skip
    print("needed: " + ", ".join(f"{k} ≥ {v:.0f} fps" for k, v in NEEDED_FPS.items()))
    print(f"{'encoder':<10} {'preset':<10} {'writer fps':>10} {'x264 fps':>9} {'Mbit/s':>7} {'PSNR dB':>8}")
    runs = [("x264", p) for p in args.presets] + ([("nvenc", p) for p in args.presets] if ok else [])
    with tempfile.TemporaryDirectory() as tmp:
        for encoder, preset in runs:
            out = Path(tmp) / f"{encoder}-{preset}.mp4"
            wall = writer_run(images, fps, preset, encoder, out)
            if encoder == "x264":
                raw = encoder_only(yuv, fps, "libx264", {"crf": "18", "preset": preset, "x264-params": "mbtree=0"})
            else:
                raw = encoder_only(yuv, fps, "h264_nvenc", nvenc_options(18, preset))
            mbps = out.stat().st_size * 8 / (len(images) / float(fps)) / 1e6
            print(f"{encoder:<10} {preset:<10} {len(images) / wall:>10.1f} {len(images) / raw:>9.1f} "
                  f"{mbps:>7.1f} {quality(out, images):>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
