"""Weight loading benchmark: official ``.pt`` vs converted fp16 safetensors.

    python bench/bench_weights.py            # tiny random model (seconds)
    python bench/bench_weights.py --full     # + a full-size random LatentSync 1.5 UNet
                                             #   (1.27 B params: writes a 5 GB .pt and a
                                             #   2.5 GB safetensors to a temp dir, needs
                                             #   ~12 GB free RAM; everything is deleted after)

Each load runs in a fresh subprocess (so import and allocator state do not leak between
measurements) and reports wall time and peak RSS. The files were just written, so these are
warm page-cache numbers; a cold disk adds read time (≈ file size / disk throughput).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _child(mode: str, folder: str, dtype_name: str) -> None:
    """Run one load and print {"seconds", "peak_rss_gb"} as JSON."""
    import logging

    logging.disable(logging.WARNING)  # the tiny model's RANDOM WEIGHTS warning
    from latentdub.weights import load_unet, resolve_weights

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    if mode == "official-style":
        # What LatentSync does: build on CPU with random init, torch.load into RAM, load.
        from latentdub.models.unet import UNet3DConditionModel

        files = resolve_weights("1.5", folder, prefer_converted=False)
        model = UNet3DConditionModel.from_config(files.unet_config)
        state = torch.load(files.unet, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state, strict=True)
        model.to(dtype)
    else:
        from dataclasses import replace

        files = resolve_weights("1.5", folder, prefer_converted=mode == "safetensors")
        if mode == "safetensors":  # force the converted file, whatever the dtype
            assert files.unet_fp16 is not None
            files = replace(files, unet=files.unet_fp16)
        model = load_unet(files, dtype=dtype)
    seconds = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_rss_gb": rss_gb, "params": n}))


def _measure(mode: str, folder: Path, dtype: str, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(folder), dtype],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SystemExit(f"{mode} -> {dtype} failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "peak_rss_gb": best["peak_rss_gb"]}


def _full_random_unet(folder: Path) -> None:
    """latentsync_unet.pt with the full 1.5 layout and random values (nothing pretrained)."""
    from latentdub.models.unet import UNet3DConditionModel, unet_config

    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(unet_config("1.5"))
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, t in model.state_dict().items():
        state[key] = torch.empty(t.shape).normal_(0, 0.02, generator=g)
    torch.save({"state_dict": state, "global_step": 0}, folder / "latentsync_unet.pt")


def _report(label: str, folder: Path, repeats: int, modes: list[tuple[str, str]]) -> None:
    from latentdub.weights import convert_weights

    pt = folder / "latentsync_unet.pt"
    print(f"\n== {label}: {pt.stat().st_size / 2**30:.2f} GiB .pt")
    results = {}
    for mode, dtype in modes:
        if mode == "safetensors" and not (folder / "latentsync_unet.fp16.safetensors").exists():
            start = time.perf_counter()
            convert_weights(folder)
            st = folder / "latentsync_unet.fp16.safetensors"
            print(
                f"convert: {time.perf_counter() - start:.1f} s -> {st.stat().st_size / 2**30:.2f}"
                " GiB fp16 safetensors"
            )
        r = _measure(mode, folder, dtype, repeats)
        results[(mode, dtype)] = r
        print(
            f"{mode:>15} -> {dtype:<8} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_gb']:.2f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also benchmark the full-size UNet")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "DIR", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    from latentdub.weights import make_tiny

    modes = [
        ("official-style", "float32"),
        ("pt", "float32"),
        ("pt", "float16"),
        ("safetensors", "float16"),
        ("safetensors", "float32"),
    ]
    with tempfile.TemporaryDirectory(prefix="latentdub-bench-") as tmp:
        tiny = Path(tmp) / "tiny"
        make_tiny(tiny)
        _report("tiny random model (3.6 M params)", tiny, args.repeats, modes)
        if args.full:
            full = Path(tmp) / "full"
            # whisper + VAE of the tiny model; the UNet is replaced below (and nothing converted)
            shutil.copytree(tiny, full, ignore=shutil.ignore_patterns("*.fp16.safetensors"))
            (full / "latentdub.json").unlink()
            start = time.perf_counter()
            _full_random_unet(full)
            print(f"\n(created the full random 1.5 UNet in {time.perf_counter() - start:.0f} s)")
            _report("full-size LatentSync 1.5 UNet (1.27 B params)", full, 1, modes)


if __name__ == "__main__":
    main()
