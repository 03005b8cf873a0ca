"""Peak RSS of a dub for a 10-second versus a 10-minute input (bounded-memory check).

The long input is a real clip from ../shared/media looped by stream copy (no re-encode), the
new speech is a real 60 s recording looped to the same length. Each dub runs in its own
process with the tiny random model (so the figures measure the pipeline, not the weights) and
reports its own peak RSS. Target: the 10-minute run uses at most 10 % more memory.

    python bench/bench_memory.py [--minutes 10] [--steps 2] [--guidance 1.5] [--clip NAME]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
# Every dub needs a consent record; the bench clips are public research demo media.
BENCH_CONSENT = {"subject": "the person in the bench clip", "granted_by": "the clip's public research release",
                 "method": "public research demo media", "evidence": "../shared/media/SOURCES.md"}


def loop_video(src: Path, dst: Path, seconds: float) -> None:
    """Concatenate copies of ``src``'s video packets (stream copy) until ``seconds`` are filled."""
    with av.open(str(src)) as inp:
        vin = inp.streams.video[0]
        packets = [p for p in inp.demux(vin) if p.size > 0 and p.pts is not None]
        period = int(vin.duration or (packets[-1].pts + packets[1].pts - packets[0].pts))
        with av.open(str(dst), "w") as out:
            vout = out.add_stream_from_template(vin)
            limit = int(seconds / float(vin.time_base))
            offset = 0
            while offset < limit:
                for p in packets:
                    if p.pts + offset >= limit:
                        break
                    q = av.Packet(bytes(p))
                    q.pts = p.pts + offset
                    q.dts = (p.dts if p.dts is not None else p.pts) + offset
                    q.is_keyframe = p.is_keyframe
                    q.time_base = vin.time_base
                    q.stream = vout
                    out.mux(q)
                offset += period


def loop_audio(src: Path, dst: Path, seconds: float) -> None:
    data, rate = sf.read(str(src), dtype="float32", always_2d=True)
    need = int(seconds * rate)
    reps = -(-need // len(data))
    sf.write(str(dst), np.tile(data, (reps, 1))[:need], rate)


def run_child(video: Path, audio: Path, weights: Path, out: Path, steps: int, guidance: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(video), str(audio), str(weights), str(out), str(steps),
           str(guidance)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"dub failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def child(video: str, audio: str, weights: str, out: str, steps: str, guidance: str) -> None:
    import psutil

    from latentdub import DubOptions, LipSyncPipeline
    from latentdub.progress import ProgressEvent

    proc = psutil.Process()
    samples: list[tuple[str, int, float]] = []  # RSS over the run: flat means bounded

    def progress(event: ProgressEvent) -> None:
        if event.done % 500 < 16 or event.done == event.total:
            samples.append((event.stage, event.done, round(proc.memory_info().rss / 2**20, 1)))

    pipe = LipSyncPipeline.from_pretrained(weights, version="1.5")
    options = DubOptions(steps=int(steps), guidance=float(guidance), deepcache=True)
    result = pipe(video, audio, out, options, consent=BENCH_CONSENT, progress=progress)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"frames": result.frames, "duration_s": result.duration_s, "peak_rss_mb": round(peak_mb, 1),
                      "timings": result.timings, "rss_mb_over_time": samples}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--clip", default="infinitetalk_hdtf_man_25fps.mp4")
    parser.add_argument("--speech", default="audio_musetalk_eng_60s_16k.wav")
    args = parser.parse_args()
    if not MEDIA.exists():
        raise SystemExit(f"needs the real media in {MEDIA}")
    from latentdub.weights import make_tiny

    with tempfile.TemporaryDirectory(prefix="latentdub-bench-") as tmp:
        tmpdir = Path(tmp)
        weights = tmpdir / "tiny"
        make_tiny(weights)
        rows = []
        for label, seconds in (("short", args.short_seconds), ("long", args.minutes * 60)):
            video, audio = tmpdir / f"{label}.mp4", tmpdir / f"{label}.wav"
            loop_video(MEDIA / args.clip, video, seconds)
            loop_audio(MEDIA / args.speech, audio, seconds)
            res = run_child(video, audio, weights, tmpdir / f"{label}_out.mp4", args.steps, args.guidance)
            res["input_s"] = seconds
            rows.append(res)
            print(f"{label:5s} input {seconds:7.1f}s  frames {res['frames']:6d}  peak RSS {res['peak_rss_mb']:8.1f} MB"
                  f"  wall {res['wall_s']:7.1f}s", flush=True)
            print(f"      timings {res['timings']}", flush=True)
            print(f"      RSS MB over the run {[m for _, _, m in res['rss_mb_over_time']]}", flush=True)
        ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(f"long/short peak RSS ratio: {ratio:.3f} (target <= 1.10)")
        print(json.dumps({"runs": rows, "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:8])
    else:
        main()
