"""Pass 2 on one device, reference path vs optimized path: one table, same inputs, same run.

    .venv/bin/python bench/gpu.py --smoke                  # CPU, tiny random model, < 1 min
    python bench/gpu.py --config full --device cuda        # full-size random models: 1.5 @ 256, 1.6 @ 512
    python bench/gpu.py --config full --versions 1.6 --accel window_batch=2 --accel compile=true
    python bench/gpu.py --config full --analysis demo1.pkl   # pass 1 from a file (made once where
                                                            # mediapipe is installed, same flag)

For every model the table gives, per path: stage seconds (the stages run in three threads, so
they overlap; with the device paste-back the sink's ``paste_back`` includes waiting for the
device, which runs ahead of the host), end-to-end seconds per video-second of the dub without face analysis, MFU, peak
VRAM, the one-time warm-up (cuDNN init, CUDA-graph capture, compilation), and for the optimized
path the max and mean |Δ| of its output frames against the reference path's (every output frame
as it goes to the encoder, before the watermark).

Method (as ``../shared/research/gpu-baseline.md``): full-size models are built from the official
configs with every ≥2-D parameter drawn from N(0, 1/fan_in) — speed does not depend on weight
values; the clip defaults to ``latentsync_demo1_portrait_hevc_25fps.mp4`` (1080x1920, 10 s)
with its 16 kHz speech; face analysis (pass 1) runs once per clip and is reused by both paths,
so the comparison is about pass 2. MFU counts the official modules' FLOPs per frame (U-Net eval
1.102 T at 512 / 0.253 T at 256, VAE encode 1.117 / 0.273 T, decode 2.515 / 0.622 T; a window
with DeepCache runs ceil(steps/3) full U-Net steps, x2 with CFG) against ``--peak-tflops``
(H200 measured: 724 fp16, 779 bf16). ``--smoke`` has no FLOP table (tiny model): MFU n/a.
Timings taken while other work runs on the machine are disturbed; the 2-core development
machine is such a machine (``--smoke`` therefore uses one torch thread).

On a lent GPU machine (``gpu-baseline.md``, "Bringing the project"): run from source with
``PYTHONPATH=src`` and the carried wheels (diffusers, av, soundfile, …); mediapipe is not there,
so make the pass-1 file where it is (``--analysis demo1.pkl``, same clip and ``--frames``) and
carry it with the clip. Compile caches go to ``TORCHINDUCTOR_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_VIDEO = SHARED / "media" / "latentsync_demo1_portrait_hevc_25fps.mp4"
DEFAULT_AUDIO = SHARED / "media" / "audio_latentsync_demo1_16k.wav"
CONSENT = {  # any valid record: a benchmark dubs its own test clip
    "subject": "the person in the benchmark clip",
    "granted_by": "latentdub bench/gpu.py",
    "method": "benchmark fixture",
    "evidence": "../shared/media/SOURCES.md",
}
# FLOPs per frame of the official modules (gpu-baseline.md), in TFLOP.
FLOPS_T = {512: {"unet": 1.102, "encode": 1.117, "decode": 2.515}, 256: {"unet": 0.253, "encode": 0.273, "decode": 0.622}}
PEAK_H200 = {"fp16": 724.0, "bf16": 779.0}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STAGES = ("decode", "diffusion", "paste_back", "frame_filters", "encode", "finalize", "audio_features")
DIFF_LABEL = "max abs diff vs reference (levels)"


def build_full(version: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A LipSyncPipeline of full-size random-weight models (gpu-baseline.md, Method)."""
    from latentdub.models.scheduler import build_scheduler
    from latentdub.models.unet import UNet3DConditionModel, unet_config
    from latentdub.models.vae import build_vae
    from latentdub.models.whisper import TINY_DIMS, WhisperEncoder
    from latentdub.pipeline import LipSyncPipeline

    g = torch.Generator().manual_seed(0)
    unet = UNet3DConditionModel.from_config(unet_config(version))
    vae = build_vae()
    whisper = WhisperEncoder(TINY_DIMS)
    with torch.no_grad():
        for module in (unet, vae, whisper):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    torch.nn.Module.to(unet, device=device, dtype=dtype)
    torch.nn.Module.to(vae, device=device, dtype=dtype)
    whisper = whisper.to(device)
    resolution = 512 if version == "1.6" else 256
    info = {"name": f"full-size random {version} ({resolution} px)", "version": version, "resolution": resolution,
            "random_weights": True, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    return LipSyncPipeline(unet=unet, vae=vae, audio_encoder=whisper, scheduler=build_scheduler(),
                           resolution=resolution, device=device, dtype=dtype, model_info=info)


def trim(video: Path, audio: Path, frames: int, folder: Path) -> tuple[Path, Path]:
    """The first ``frames`` frames of ``video`` (re-encoded) and as much of ``audio``."""
    import soundfile as sf

    from latentdub.media.reader import iter_frames, probe_video
    from latentdub.media.writer import VideoWriter

    info = probe_video(video)
    clip = folder / f"clip_{frames}.mp4"
    first = None
    with VideoWriter(clip, width=info.width, height=info.height, time_base=info.time_base,
                     fps=info.fps, crf=12) as w:  # upright frames, no rotation flag
        for f in iter_frames(video, stop=frames):
            first = f.pts if first is None else first
            w.write(f.image, pts=f.pts - first)
    data, rate = sf.read(str(audio), dtype="float32", always_2d=True)
    speech = folder / f"speech_{frames}.wav"
    sf.write(str(speech), data[: round(frames / info.fps * rate)], rate)
    return clip, speech


class FrameStore:
    """A frame filter that keeps every output frame (memory-mapped on disk), the same cost in
    both paths; :func:`frame_diff` compares two stores after the timed runs."""

    def __init__(self, path: Path, num_frames: int) -> None:
        self.path, self.num_frames = path, num_frames
        self.frames: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, info: Any) -> np.ndarray:
        if self.frames is None:
            self.frames = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8,
                                                    shape=(self.num_frames, *frame.shape))
        self.frames[info.index] = frame
        return frame


def frame_diff(a: FrameStore, b: FrameStore) -> tuple[int, float]:
    """(max, mean) |Δ| in levels over every frame of two runs."""
    assert a.frames is not None and b.frames is not None
    worst, total, count = 0, 0, 0
    for fa, fb in zip(a.frames, b.frames, strict=True):
        d = np.abs(fa.astype(np.int16) - fb)
        worst = max(worst, int(d.max()))
        total += int(d.sum(dtype=np.int64))
        count += d.size
    return worst, total / max(count, 1)


def flops_per_frame(resolution: int, steps: int, guidance: float, deepcache: bool) -> float | None:
    table = FLOPS_T.get(resolution)
    if table is None:
        return None
    full_steps = math.ceil(steps / 3) if deepcache else steps
    cfg = 2 if guidance > 1.0 else 1
    return (full_steps * cfg * table["unet"] + 2 * table["encode"] + table["decode"]) * 1e12


def warm_up(pipe: Any, opts: Any, accel: Any, tokens_width: int) -> float:
    """One-time costs before timing: kernel/library init, CUDA-graph capture for every group
    size this dub will use, compilation. Synthetic crops; no file I/O."""
    from latentdub.render import WINDOW

    start = time.perf_counter()
    res = pipe.resolution
    gen = pipe.window_diffusion(opts.model_copy(update={"steps": 2}), accel)  # a full and a shallow step
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (WINDOW, res, res, 3), dtype=np.uint8)
    tokens = torch.zeros(WINDOW, 50, tokens_width, device=pipe.device, dtype=pipe.dtype)
    from latentdub.acceleration import set_channels_last

    set_channels_last(pipe.vae, accel.channels_last)
    for b in range(1, accel.window_batch + 1):
        gen.generate([crops] * b, [tokens] * b, [16 * i for i in range(b)])
    gen.generate([crops[:8]], [tokens[:8]], [0])
    _sync(pipe.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(pipe: Any, path_accel: Any, video: Path, audio: Path, out: Path, opts: Any, analysis: Any,
             store: FrameStore, tokens_width: int) -> dict[str, Any]:
    pipe.acceleration = path_accel
    accel = pipe.acceleration
    setup = warm_up(pipe, opts, accel, tokens_width)
    pipe.analyze_faces = lambda inputs, run: analysis  # pass 1 once per clip, shared by both paths
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    _sync(pipe.device)
    start = time.perf_counter()
    result = pipe(video, audio, out, opts, consent=CONSENT, frame_filters=[store])
    _sync(pipe.device)
    wall = time.perf_counter() - start
    return {
        "path": "reference" if accel.is_reference else "optimized",
        "acceleration": accel.to_dict(),
        "warm_up_s": round(setup, 3),
        "wall_s": round(wall, 3),
        "duration_s": result.duration_s,
        "frames": result.frames,
        "dubbed_frames": result.dubbed_frames,
        "timings": result.timings,
        "peak_vram_gb": round(torch.cuda.max_memory_allocated(pipe.device) / 1e9, 2) if pipe.device.type == "cuda" else None,
    }


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        low = value.strip().lower()
        out[key.strip()] = True if low == "true" else False if low == "false" else int(low) if low.isdigit() else value
    return out


def table(columns: list[tuple[str, dict[str, Any]]], peak: float | None, opts: Any) -> str:
    def fmt(v: Any, nd: int = 2) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.{nd}f}"
        return str(v)

    rows: list[tuple[str, list[str]]] = []
    for stage in STAGES:
        rows.append((f"{stage} (s)", [fmt(c["timings"].get(stage, 0.0)) for _, c in columns]))
    rows.append(("warm-up, one-time (s)", [fmt(c["warm_up_s"]) for _, c in columns]))
    rows.append(("end to end excl. pass 1 (s)", [fmt(c["wall_s"]) for _, c in columns]))
    rows.append(("s per video-second", [fmt(c["wall_s"] / max(c["duration_s"], 1e-9), 3) for _, c in columns]))
    mfu = []
    for _, c in columns:
        per = flops_per_frame(c["resolution"], opts.steps, opts.guidance, opts.deepcache)
        if per is None or peak is None:
            mfu.append("n/a")
        else:
            mfu.append(f"{100 * per * c['dubbed_frames'] / c['wall_s'] / (peak * 1e12):.1f} %")
    rows.append(("MFU (end to end)", mfu))
    rows.append(("peak VRAM (GB)", [fmt(c["peak_vram_gb"]) for _, c in columns]))
    rows.append((DIFF_LABEL, [fmt(c.get("max_abs_diff")) if "max_abs_diff" in c else "-" for _, c in columns]))
    rows.append(("mean abs diff vs reference (levels)",
                 [f"{c['mean_abs_diff']:.2e}" if "mean_abs_diff" in c else "-" for _, c in columns]))
    head = ["metric", *[name for name, _ in columns]]
    width = [max(len(head[0]), *(len(r[0]) for r in rows))] + [
        max(len(head[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(columns))
    ]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, width, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    for label, values in rows:
        cells = [label, *values]
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(cells, width, strict=True)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random model, a short clip: < 1 min")
    ap.add_argument("--config", choices=["full", "tiny"], default=None)
    ap.add_argument("--versions", nargs="+", default=["1.5", "1.6"], help="full config: 1.5 → 256 px, 1.6 → 512 px")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--frames", type=int, default=None, help="dub only the first N frames (smoke: 24)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accel", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an Acceleration field of the optimized path (repeatable)")
    ap.add_argument("--analysis", type=Path, default=None,
                    help="pass-1 result (pickle): loaded when the file exists, else computed and written there "
                         "(a GPU machine without mediapipe dubs with the analysis made elsewhere)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H200 measured)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (smoke: 1 — with two threads a busy machine's scheduling, not the "
                         "code, decides the figures)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args(argv)

    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available (use --smoke for the CPU run)", file=sys.stderr)
        return 2
    for f in (args.video, args.audio):
        if not f.exists():
            print(f"error: {f} not found (the ../shared media folder is needed)", file=sys.stderr)
            return 2
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        peak = PEAK_H200.get(dtype_name)
    frames = args.frames if args.frames is not None else (24 if args.smoke else None)

    tmp = Path(tempfile.mkdtemp(prefix="latentdub-bench-gpu-"))
    try:
        return _run(args, device, dtype, dtype_name, peak, frames, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, dtype_name: str,
         peak: float | None, frames: int | None, tmp: Path) -> int:
    from latentdub.acceleration import Acceleration
    from latentdub.face import analyze_video
    from latentdub.options import DubOptions

    os.environ.setdefault("LATENTDUB_DATA_DIR", str(tmp / "data"))  # signing keys, audit log
    video, audio = (trim(args.video, args.audio, frames, tmp) if frames else (args.video, args.audio))
    t0 = time.perf_counter()
    if args.analysis is not None and args.analysis.exists():
        with args.analysis.open("rb") as fh:
            analysis = pickle.load(fh)
    else:
        analysis = analyze_video(video)
        if args.analysis is not None:
            with args.analysis.open("wb") as fh:
                pickle.dump(analysis, fh)
    analysis_s = time.perf_counter() - t0
    opts = DubOptions(steps=args.steps)
    overrides = parse_overrides(args.accel)

    if (args.config or ("tiny" if args.smoke else "full")) == "tiny":
        from latentdub.pipeline import LipSyncPipeline
        from latentdub.weights import make_tiny

        weights = make_tiny(tmp / "tiny")
        models = [("tiny", lambda: LipSyncPipeline.from_pretrained(weights, version="1.5", device=device, dtype=dtype))]
    else:
        models = [(f"{v} @ {512 if v == '1.6' else 256}", lambda v=v: build_full(v, device, dtype)) for v in args.versions]

    print(f"torch {torch.__version__}, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype_name}, {torch.get_num_threads()} CPU threads; clip {video.name}; face analysis {analysis_s:.1f} s "
          f"(once, shared); {args.steps} steps", flush=True)
    columns: list[tuple[str, dict[str, Any]]] = []
    for name, build in models:
        pipe = build()
        width = int(pipe.unet.cfg.cross_attention_dim)
        optimized = replace(Acceleration.auto(device, pipe.resolution), **overrides) if overrides else "optimized"
        num = len(analysis.pts)
        stores = []
        for label, accel in (("reference", "reference"), ("optimized", optimized)):
            out = tmp / f"{name.replace(' ', '').replace('@', '_')}_{label}.mp4"
            store = FrameStore(tmp / f"frames_{label}.npy", num)
            row = run_path(pipe, accel, video, audio, out, opts, analysis, store, width)
            row["resolution"] = pipe.resolution
            row["model"] = name
            stores.append(store)
            columns.append((f"{name} {label}", row))
            print(f"  {name} {label}: {row['wall_s']:.1f} s", flush=True)
        columns[-1][1]["max_abs_diff"], columns[-1][1]["mean_abs_diff"] = frame_diff(*stores)
        for store in stores:
            store.frames = None
            store.path.unlink(missing_ok=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(columns, peak, opts))
    if args.json:
        args.json.write_text(json.dumps({"columns": [c for _, c in columns], "peak_tflops": peak,
                                         "analysis_s": analysis_s}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
