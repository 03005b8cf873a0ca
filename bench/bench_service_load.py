"""API latency of `latentdub serve` under load while a real job runs.

    python bench/bench_service_load.py --clients 8 --seconds 20

It makes a tiny random model (latentdub.weights.make_tiny) and a data dir in a temp folder,
creates a key with `latentdub keys create`, starts `latentdub serve` as a subprocess on a free
port, submits one real job (a clip from ../shared/media with a few seconds of its speech), and
while that job runs, N client threads (httpx) poll GET /api/v1/jobs/{id}; every 4th client also
submits small jobs (1 s of speech, steps=1). It prints p50/p95 latency of the status polls and of
the submissions, and the error count (any non-2xx answer or network error; must be 0).
Per-key limits are turned off for the run (LATENTDUB_KEY_CONCURRENCY=0, ..._DAILY_QUOTA=0).

It also reports the server's resident memory (its process and children, sampled every 5 ms):
at the start and at its peak under load, then through the audio-bomb case (issue 17 §1): small
Opus files made with PyAV (tests/test_audio_bombs.py) that declare, jump to or hold hours of
audio, each posted as an audio asset; each must be a 413 (anything else is an error), and the
time and the server's peak RSS above its level before each is printed. `--only-bombs` skips
the load phase (no job is run).
"""

from __future__ import annotations

import argparse
import contextlib
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
import psutil
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


def _rss(proc: psutil.Process) -> int:
    """Resident bytes of the server process and its children (workers, analysis processes)."""
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):  # a child that just ended
            total += p.memory_info().rss
    return total


class RssPeak:
    """The server's peak RSS while the block runs (a thread samples it every 5 ms)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.peak = _rss(self.proc)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss(self.proc))
            self._done.wait(0.005)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(self.proc))


def _bombs(folder: Path) -> dict[str, Path]:
    """The audio bombs of issue 17 §1, made with PyAV by the test module (one definition of each)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_audio_bombs import declare_mkv_duration, jump_opus, long_opus, overlap_opus

    folder.mkdir(parents=True, exist_ok=True)
    return {
        "2 h Opus (Ogg)": long_opus(folder / "long.ogg", 7200, "ogg"),
        "2 h Opus, header says 1 s (MKV)": declare_mkv_duration(long_opus(folder / "liar.mkv", 7200, "matroska"), 1.0),
        "7200 s jump (MKV)": jump_opus(folder / "jump.mkv", 7200),
        "7200 s jump, header says 2.4 s": declare_mkv_duration(jump_opus(folder / "jump-liar.mkv", 7200), 2.4),
        "1e6 s jump, header says 2.4 s": declare_mkv_duration(jump_opus(folder / "jump6.mkv", 1e6), 2.4),
        "2 h of frames overlapping in 60 s": overlap_opus(folder / "overlap.mkv", 60000),
    }


def bomb_case(base: str, auth: dict[str, str], pid: int, folder: Path) -> tuple[list[dict[str, object]], list[str]]:
    """Post each bomb as an audio asset: (one row per bomb, errors)."""
    rows: list[dict[str, object]] = []
    errors: list[str] = []
    with httpx.Client(timeout=300) as c:
        for name, path in _bombs(folder).items():
            body = path.read_bytes()
            with RssPeak(pid) as rss:
                t0 = time.perf_counter()
                r = c.post(f"{base}/api/v1/assets", headers=auth, data={"kind": "audio"},
                           files={"file": ("speech.ogg", body, "audio/ogg")})
                seconds = time.perf_counter() - t0
            code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith(
                "application/json") else None
            rows.append({"bomb": name, "bytes": len(body), "status": r.status_code, "code": code,
                         "seconds": round(seconds, 3), "server_rss_mb": round(rss.start / 2**20),
                         "server_rss_growth_mb": round((rss.peak - rss.start) / 2**20, 1)})
            if r.status_code != 413:
                errors.append(f"bomb {name!r}: HTTP {r.status_code}: {r.text[:200]}")
    return rows, errors


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
    parser.add_argument("--only-bombs", action="store_true", help="skip the load phase: only the audio-bomb case")
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

        def load_phase() -> tuple[dict[str, object], list[str]]:
            """The main job, the polling and submitting clients: (report, errors)."""

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
            return report, errors

        report: dict[str, object] = {"cpu_count": os.cpu_count()}
        errors: list[str] = []
        if not args.only_bombs:
            with RssPeak(server.pid) as rss:
                load_report, load_errors = load_phase()
            report.update(load_report)
            errors += load_errors
            report["server_rss_start_mb"] = round(rss.start / 2**20)
            report["server_rss_peak_mb"] = round(rss.peak / 2**20)
            print(f"server RSS   : {report['server_rss_start_mb']} MB at the start, "
                  f"{report['server_rss_peak_mb']} MB at the peak under load")

        rows, bomb_errors = bomb_case(base, auth, server.pid, tmp / "bombs")
        errors += bomb_errors
        report["bombs"] = rows
        report["errors"] = len(errors)
        print("audio bombs  : (posted as audio assets; each must be a 413)")
        for row in rows:
            print(f"  {row['bomb']:36s} {row['bytes']:>9,d} B  HTTP {row['status']} {row['code'] or '':9s} "
                  f"{row['seconds']:6.2f} s  server RSS {row['server_rss_mb']} MB "
                  f"+{row['server_rss_growth_mb']} MB")
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
