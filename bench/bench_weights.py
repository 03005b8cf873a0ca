"""Weight loading benchmark: official ``.pt`` vs converted fp16 safetensors.

    python bench/bench_weights.py            # tiny random model (seconds)
    python bench/bench_weights.py --full     # + a full-size random LatentSync 1.5 UNet
                                             #   (1.27 B params: writes a 5 GB .pt and a
                                             #   2.4 GB safetensors to a temp dir, needs
                                             #   ~11 GB free RAM; everything is deleted after)

Every step runs in a fresh subprocess: import and allocator state do not leak between
measurements, and the parent stays small (on Linux a child's ``ru_maxrss`` starts at the
parent's RSS at fork time, which would otherwise inflate every reading). Reported: wall time
and peak RSS of the load (RSS counts the memory-mapped checkpoint pages a load touches). The
files were just written, so these are warm page-cache numbers; a cold disk adds read time
(≈ file size / disk throughput).
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

MODES = [  # (how, dtype)
    ("official-style", "float32"),  # random init + torch.load into RAM + load_state_dict
    ("pt", "float32"),  # latentdub: meta build + memory-mapped .pt
    ("pt", "float16"),
    ("safetensors", "float16"),  # latentdub: meta build + memory-mapped fp16 safetensors
    ("safetensors", "float32"),  # (forced; fp32 loads read the .pt)
]


def _load(mode: str, folder: str, dtype_name: str) -> None:
    """One load; prints {"seconds", "peak_rss_gb", "params"} as JSON."""
    from dataclasses import replace

    import torch

    from latentdub.models.unet import UNet3DConditionModel
    from latentdub.weights import load_unet, resolve_weights

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    if mode == "official-style":
        files = resolve_weights("1.5", folder, prefer_converted=False)
        model = UNet3DConditionModel.from_config(files.unet_config)
        state = torch.load(files.unet, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state, strict=True)
        model.to(dtype)
    else:
        files = resolve_weights("1.5", folder, prefer_converted=mode == "safetensors")
        if mode == "safetensors":  # force the converted file, whatever the dtype
            assert files.unet_fp16 is not None
            files = replace(files, unet=files.unet_fp16)
        model = load_unet(files, dtype=dtype)
    seconds = time.perf_counter() - start
    # Memory-mapped weights are read on first use: touch one value per 4 KiB page so the
    # "ready" time includes that I/O, as the first denoising step would.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            step = max(1, 4096 // t.element_size())
            t.reshape(-1)[::step].sum()
    ready = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "ready": ready, "peak_rss_gb": rss_gb, "params": n}))


def _make_full(folder: str) -> None:
    """latentsync_unet.pt with the full 1.5 layout and random values (nothing pretrained)."""
    import torch

    from latentdub.models.unet import UNet3DConditionModel, unet_config

    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(unet_config("1.5"))
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.empty(t.shape).normal_(0, 0.02, generator=g) for k, t in model.state_dict().items()
    }
    torch.save({"state_dict": state, "global_step": 0}, Path(folder) / "latentsync_unet.pt")


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def _report(label: str, folder: Path, repeats: int) -> None:
    pt = folder / "latentsync_unet.pt"
    print(f"\n== {label}: {pt.stat().st_size / 2**30:.2f} GiB .pt", flush=True)
    for mode, dtype in MODES:
        st = folder / "latentsync_unet.fp16.safetensors"
        if mode == "safetensors" and not st.exists():
            start = time.perf_counter()
            _run("--step", "convert", str(folder))
            print(
                f"convert: {time.perf_counter() - start:.1f} s -> "
                f"{st.stat().st_size / 2**30:.2f} GiB fp16 safetensors",
                flush=True,
            )
        runs = [
            json.loads(_run("--step", "load", mode, str(folder), dtype).strip().splitlines()[-1])
            for _ in range(repeats)
        ]
        best = min(runs, key=lambda r: r["seconds"])
        print(
            f"{mode:>15} -> {dtype:<8} load {best['seconds']:6.2f} s   ready (all pages read) "
            f"{best['ready']:6.2f} s   peak RSS {best['peak_rss_gb']:.2f} GiB",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also benchmark the full-size UNet")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()

    if args.step:
        step, *rest = args.step
        if step == "load":
            _load(*rest)
        elif step == "make-full":
            _make_full(*rest)
        elif step == "make-tiny":
            from latentdub.weights import make_tiny

            make_tiny(rest[0])
        elif step == "convert":
            from latentdub.weights import convert_weights

            convert_weights(rest[0])
        return

    with tempfile.TemporaryDirectory(prefix="latentdub-bench-") as tmp:
        tiny = Path(tmp) / "tiny"
        _run("--step", "make-tiny", str(tiny))
        _report("tiny random model", tiny, args.repeats)
        if args.full:
            full = Path(tmp) / "full"
            # whisper + VAE of the tiny model; the UNet is replaced (and nothing converted)
            shutil.copytree(tiny, full, ignore=shutil.ignore_patterns("*.fp16.safetensors"))
            (full / "latentdub.json").unlink()
            start = time.perf_counter()
            _run("--step", "make-full", str(full))
            print(f"\n(created the full random 1.5 UNet in {time.perf_counter() - start:.0f} s)")
            _report("full-size LatentSync 1.5 UNet (1.27 B params)", full, 1)


if __name__ == "__main__":
    main()
