"""API latency of `latentdub serve` under load while a real job runs.

    python bench/bench_service_load.py --clients 8 --seconds 20

It makes a tiny random model (latentdub.weights.make_tiny) and a data dir in a temp folder,
creates a key with `latentdub keys create`, starts `latentdub serve` as a subprocess on a free
port, submits one real job (a clip from ../shared/media with a few seconds of its speech), and
while that job runs, N client threads (httpx) poll GET /api/v1/jobs/{id}; every 4th client also
submits small jobs (1 s of speech, steps=1). It prints p50/p95 latency of the status polls and of
the submissions, and the error count (any non-2xx answer or network error; must be 0).
Per-key limits are turned off for the run (LATENTDUB_KEY_CONCURRENCY=0, ..._DAILY_QUOTA=0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
VIDEO = "retalking_face3_woman_25fps.mp4"
SPEECH = "audio_musetalk_eng_60s_16k.wav"
CONSENT = {"subject": "Bench Subject", "granted_by": "Bench Subject", "method": "signed release form",
           "evidence": "bench"}


def _latentdub() -> list[str]:
    return [sys.executable, "-m", "latentdub"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _speech(dst: Path, seconds: float) -> Path:
    data, rate = sf.read(str(MEDIA / SPEECH), dtype="float32", always_2d=True)
    sf.write(str(dst), data[: int(seconds * rate)], rate)
    return dst


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clients run")
    parser.add_argument("--speech-s", type=float, default=4.0, help="seconds of speech of the main job")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    if not (MEDIA / VIDEO).is_file():
        print(f"missing test media: {MEDIA / VIDEO}", file=sys.stderr)
        return 2

    from latentdub.weights import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="latentdub-bench-"))
    weights = make_tiny(tmp / "weights")
    data_dir = tmp / "data"
    env = {**os.environ, "LATENTDUB_KEY_CONCURRENCY": "0", "LATENTDUB_KEY_DAILY_QUOTA": "0",
           "LATENTDUB_DATA_DIR": str(tmp / "latentdub-data")}
    out = subprocess.run([*_latentdub(), "keys", "create", "--data-dir", str(data_dir), "--name", "bench"],
                         env=env, check=True, capture_output=True, text=True)
    key = out.stdout.strip().splitlines()[-1].strip()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp / "serve.log").open("w")
    server = subprocess.Popen(
        [*_latentdub(), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
         "--weights", str(weights)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    auth = {"Authorization": f"Bearer {key}"}
    video = (MEDIA / VIDEO).read_bytes()
    long_audio = _speech(tmp / "speech-long.wav", args.speech_s).read_bytes()
    short_audio = _speech(tmp / "speech-1s.wav", 1.0).read_bytes()
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"the server did not become ready; log: {tmp / 'serve.log'}", file=sys.stderr)
                return 1
            time.sleep(0.2)

        def submit(client: httpx.Client, audio: bytes, policy: str) -> httpx.Response:
            return client.post(
                f"{base}/api/v1/jobs", headers=auth,
                data={"consent": json.dumps(CONSENT), "steps": "1", "length_policy": policy},
                files={"video": ("clip.mp4", video, "video/mp4"), "audio": ("speech.wav", audio, "audio/wav")},
            )

        with httpx.Client(timeout=60) as c:
            r = submit(c, long_audio, "pingpong")
            r.raise_for_status()
            main_id = r.json()["id"]

        polls: list[float] = []
        submits: list[float] = []
        errors: list[str] = []
        small_ids: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client_loop(index: int) -> None:
            with httpx.Client(timeout=60) as c:
                while time.monotonic() < stop_at:
                    if index % 4 == 3:
                        t0 = time.perf_counter()
                        try:
                            r = submit(c, short_audio, "cut")
                            ok, what = r.status_code == 202, f"submit HTTP {r.status_code}: {r.text[:200]}"
                        except httpx.HTTPError as err:
                            ok, what, r = False, f"submit {type(err).__name__}: {err}", None
                        dt_s = time.perf_counter() - t0
                        with lock:
                            submits.append(dt_s)
                            if not ok:
                                errors.append(what)
                            elif r is not None:
                                small_ids.append(r.json()["id"])
                        time.sleep(1.0)
                    else:
                        t0 = time.perf_counter()
                        try:
                            r = c.get(f"{base}/api/v1/jobs/{main_id}", headers=auth)
                            ok, what = r.status_code == 200, f"poll HTTP {r.status_code}: {r.text[:200]}"
                        except httpx.HTTPError as err:
                            ok, what = False, f"poll {type(err).__name__}: {err}"
                        dt_s = time.perf_counter() - t0
                        with lock:
                            polls.append(dt_s)
                            if not ok:
                                errors.append(what)
                        time.sleep(0.05)

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(timeout=10) as c:
            main_job = c.get(f"{base}/api/v1/jobs/{main_id}", headers=auth).json()

        ms = 1000.0
        report = {
            "clients": args.clients,
            "seconds": args.seconds,
            "cpu_count": os.cpu_count(),
            "polls": len(polls),
            "poll_p50_ms": round(_pct(polls, 0.5) * ms, 1),
            "poll_p95_ms": round(_pct(polls, 0.95) * ms, 1),
            "submits": len(submits),
            "submit_p50_ms": round(_pct(submits, 0.5) * ms, 1),
            "submit_p95_ms": round(_pct(submits, 0.95) * ms, 1),
            "errors": len(errors),
            "main_job_status": main_job["status"],
            "main_job_progress": main_job["progress"],
        }
        print(f"clients={args.clients} seconds={args.seconds:g} cpus={os.cpu_count()}")
        print(f"status polls : n={len(polls):5d}  p50={report['poll_p50_ms']:8.1f} ms  p95={report['poll_p95_ms']:8.1f} ms"
              f"  mean={statistics.fmean(polls) * ms if polls else float('nan'):.1f} ms")
        print(f"submissions  : n={len(submits):5d}  p50={report['submit_p50_ms']:8.1f} ms  "
              f"p95={report['submit_p95_ms']:8.1f} ms")
        print(f"main job     : {main_job['status']} progress={main_job['progress']:.2f} "
              f"stage={main_job.get('stage')} (small jobs submitted: {len(small_ids)})")
        print(f"errors       : {len(errors)}")
        for line in errors[:10]:
            print(f"  {line}")
        if args.json:
            print(json.dumps(report))
        return 0 if not errors else 1
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
