"""Time one U-Net forward: full step, DeepCache full step and DeepCache shallow step.

    .venv/bin/python bench/bench_unet.py                      # small golden config, CPU, fp32+bf16
    .venv/bin/python bench/bench_unet.py --config full        # LatentSync 1.5/1.6 size
    .venv/bin/python bench/bench_unet.py --config full --device cuda --dtype fp16 bf16
    .venv/bin/python bench/bench_unet.py --config tiny --dtype fp32   # make-tiny model + its VAE
    .venv/bin/python bench/bench_unet.py --config tiny --dtype fp32 --mmap-threshold-mib 1
                                                  # as inside a dub (the pipeline sets 1 MiB)

Random weights (timing only). For the full config on CPU a one-frame probe is run first and
the full window is timed only if the extrapolated time is below ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from latentdub.models import DeepCache, UNet3DConditionModel, unet_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def small_config() -> dict:
    path = SHARED / "reference" / "golden_unet_small_config.json"
    if path.exists():
        return json.loads(path.read_text())["model_config"]
    cfg = unet_config("1.5")  # same layout, reduced widths
    cfg.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32)
    return cfg


def tiny_config() -> dict:
    from latentdub.weights.tiny import tiny_unet_config

    return tiny_unet_config()


def set_mmap_threshold(mib: int) -> None:
    """glibc's M_MMAP_THRESHOLD: every allocation above it is fresh, page-faulted memory."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, mib << 20)


@torch.inference_mode()
def bench_tiny_vae(device: str, dtype: torch.dtype, repeats: int) -> None:
    """The make-tiny VAE on one window: encode 32 crops (masked + reference), decode 16."""
    from latentdub.weights.tiny import TINY_RESOLUTION, _tiny_vae

    vae = _tiny_vae(0).eval()
    torch.nn.Module.to(vae, device=device, dtype=dtype)  # diffusers' own .to warns on casts
    g = torch.Generator().manual_seed(2)
    res = TINY_RESOLUTION
    crops = torch.randn(32, 3, res, res, generator=g).to(device, dtype)
    latents = torch.randn(16, 4, res // 8, res // 8, generator=g).to(device, dtype)
    vae.encode(crops[:2])  # warm-up
    t_enc = timed(lambda: vae.encode(crops).latent_dist.sample(), device, repeats)
    t_dec = timed(lambda: vae.decode(latents).sample, device, repeats)
    print(
        f"tiny VAE {device:5s} {dtype!s:15s} {res} px: encode 32 {t_enc * 1e3:8.1f} ms, "
        f"decode 16 {t_dec * 1e3:8.1f} ms -> {t_enc + t_dec:5.2f} s per window"
    )


def build(config: dict, device: str, dtype: torch.dtype) -> UNet3DConditionModel:
    model = UNet3DConditionModel.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised layers get random values too
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def bench(name, config, device, dtype, b, f, size, repeats, max_seconds) -> None:
    t_build = time.perf_counter()
    model = build(config, device, dtype)
    t_build = time.perf_counter() - t_build
    width = config["cross_attention_dim"]

    def inputs(frames):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, 13, frames, size, size, generator=g).to(device, dtype)
        a = torch.randn(b * frames, 50, width, generator=g).to(device, dtype)
        return x, a

    if max_seconds:  # probe with one frame, extrapolate linearly in frames
        x1, a1 = inputs(1)
        model(x1, 500, a1)
        probe = timed(lambda: model(x1, 500, a1), device, 1)
        estimate = probe * f
        if estimate > max_seconds:
            print(
                f"{name:6s} {device:5s} {dtype!s:15s} B={b} F={f} {size}x{size}: skipped, "
                f"1-frame probe {probe:.2f} s -> ~{estimate:.0f} s per step (> {max_seconds} s)"
            )
            return

    x, a = inputs(f)
    model(x, 500, a)  # warm-up
    t_full = timed(lambda: model(x, 500, a), device, repeats)
    cache = DeepCache(interval=3)

    def cached_full():
        cache.reset()
        model(x, 500, a, deep_cache=cache)

    t_cache_full = timed(cached_full, device, repeats)

    def shallow():
        cache.step = 1
        model(x, 480, a, deep_cache=cache)

    t_shallow = timed(shallow, device, repeats)
    # a 20-step DDIM window with interval 3: 7 full + 13 shallow steps
    window = 7 * t_cache_full + 13 * t_shallow
    peak = ""
    if device.startswith("cuda"):
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(
        f"{name:6s} {device:5s} {dtype!s:15s} B={b} F={f} {size}x{size}: "
        f"full {t_full * 1e3:9.1f} ms | DeepCache full {t_cache_full * 1e3:9.1f} ms, "
        f"shallow {t_shallow * 1e3:8.1f} ms ({t_full / t_shallow:5.1f}x) | "
        f"20-step window {20 * t_full:7.2f} s -> {window:7.2f} s with DeepCache "
        f"(build {t_build:.1f} s{peak})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["small", "full", "tiny", "both"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=2, help="2 = one window with CFG")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="latent size (32: 1.5, 64: 1.6)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mmap-threshold-mib", type=int, default=0, help="glibc malloc setting")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mmap_threshold_mib:
        set_mmap_threshold(args.mmap_threshold_mib)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    configs = {"small": small_config(), "full": unet_config("1.5"), "tiny": tiny_config()}
    names = ["small", "full"] if args.config == "both" else [args.config]
    for name in names:
        on_cpu_full = name == "full" and args.device == "cpu"
        for dt in args.dtype:
            bench(
                name,
                configs[name],
                args.device,
                DTYPES[dt],
                args.batch,
                args.frames,
                args.size,
                1 if on_cpu_full else args.repeats,
                args.max_seconds if on_cpu_full else 0,
            )
            if name == "tiny":
                bench_tiny_vae(args.device, DTYPES[dt], args.repeats)


if __name__ == "__main__":
    main()
