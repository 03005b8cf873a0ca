"""Scale-out through Celery + Redis: a worker killed mid-job loses nothing and duplicates nothing.

A real ``redis-server`` (Debian's, installed by ``.ci/run``) on 127.0.0.1, real ``latentdub
worker`` processes with the tiny random model, real media. Skips with the reason when
``redis-server`` is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("celery", reason="celery is not installed")

from latentdub.provenance.c2pa import sha256_file
from latentdub.service.db import open_database, write_session
from latentdub.service.models import Asset
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore

CONSENT = {"subject": "the woman in the clip", "granted_by": "the subject", "method": "signed release form",
           "evidence": "release-42.pdf"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_worker(settings: ServiceSettings, weights: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LATENTDUB_VISIBILITY_TIMEOUT_S": str(settings.visibility_timeout_s),
           "LATENTDUB_LEASE_S": str(settings.lease_s)}
    return subprocess.Popen(
        [sys.executable, "-m", "latentdub", "worker", "--broker", settings.broker_url, "--data-dir",
         str(settings.data_dir), "--weights", str(weights), "--version", "1.5"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def add_asset(settings: ServiceSettings, engine: object, src: Path, kind: str) -> str:
    folder = settings.ensure_data_dir() / "uploads"
    folder.mkdir(exist_ok=True)
    dst = folder / f"{kind}-{src.name}"
    shutil.copyfile(src, dst)
    asset = Asset(kind=kind, sha256=sha256_file(dst), bytes=dst.stat().st_size, path=str(dst))
    with write_session(engine) as session:  # type: ignore[arg-type]
        session.add(asset)
        session.flush()
        return asset.id


def test_three_jobs_survive_a_worker_killed_mid_job(
    redis_url: str, tiny_weights: Path, media_dir: Path, tmp_path: Path
) -> None:
    from latentdub.service.celery_app import CeleryRunner

    settings = ServiceSettings(data_dir=tmp_path / "svc", broker_url=redis_url, visibility_timeout_s=4, lease_s=6)
    engine = open_database(settings.database_url)
    store = JobStore(engine)
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(tmp_path / "a.wav"), data[:rate], rate)
    video = add_asset(settings, engine, media_dir / "retalking_face3_woman_25fps.mp4", "video")
    audio = add_asset(settings, engine, tmp_path / "a.wav", "audio")
    jobs = [store.create(options={"steps": 3}, consent=CONSENT, video_asset_id=video, audio_asset_id=audio)[0]
            for _ in range(3)]
    runner = CeleryRunner(settings)
    for job in jobs:
        runner.submit(job.id)

    log = tmp_path / "workers.log"
    first = start_worker(settings, tiny_weights, log)
    victim = None
    try:
        deadline = time.monotonic() + 180
        while victim is None and time.monotonic() < deadline:
            running = [j for j in jobs if store.get(j.id).status == "running"]
            victim = running[0].id if running else None
            time.sleep(0.1)
        assert victim is not None, log.read_text()[-3000:]
        time.sleep(0.5)  # mid-job
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        second = start_worker(settings, tiny_weights, log)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                states = [store.get(j.id).status for j in jobs]
                if all(s in ("succeeded", "failed", "cancelled") for s in states):
                    break
                time.sleep(0.5)
            final = [store.get(j.id) for j in jobs]
            assert [j.status for j in final] == ["succeeded"] * 3, (
                [(j.status, j.error_code, j.error_message) for j in final], log.read_text()[-3000:])
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            try:
                second.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(second.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    # Nothing lost: every job has its own finished output. Nothing duplicated: one audit entry each.
    for job in final:
        assert job.output_path and Path(job.output_path).is_file()
    chains = sorted((settings.data_dir / "audit").glob("*.jsonl"))  # one chain per worker machine
    assert chains, "the workers log in the service folder's audit/"
    entries = [json.loads(line) for chain in chains for line in chain.read_text().splitlines() if line.strip()]
    for job in jobs:
        assert sum(1 for e in entries if e.get("job_id") == job.id) == 1, job.id
    assert store.get(victim).attempts >= 2  # the killed run, then the one that finished


def test_cancel_reaches_a_job_running_on_a_worker(
    redis_url: str, tiny_weights: Path, media_dir: Path, tmp_path: Path
) -> None:
    from latentdub.service.celery_app import CeleryRunner

    settings = ServiceSettings(data_dir=tmp_path / "svc", broker_url=redis_url, visibility_timeout_s=30, lease_s=30)
    engine = open_database(settings.database_url)
    store = JobStore(engine)
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(tmp_path / "a.wav"), data[: 3 * rate], rate)
    video = add_asset(settings, engine, media_dir / "retalking_face3_woman_25fps.mp4", "video")
    audio = add_asset(settings, engine, tmp_path / "a.wav", "audio")
    job, _ = store.create(options={"steps": 200}, consent=CONSENT, video_asset_id=video, audio_asset_id=audio)
    runner = CeleryRunner(settings)
    runner.submit(job.id)
    log = tmp_path / "worker.log"
    worker = start_worker(settings, tiny_weights, log)
    try:
        deadline = time.monotonic() + 180
        while store.get(job.id).stage != "dub" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get(job.id).stage == "dub", log.read_text()[-3000:]
        asked = time.monotonic()
        runner.cancel(job.id)
        while store.get(job.id).status == "running" and time.monotonic() - asked < 30:
            time.sleep(0.1)
        assert store.get(job.id).status == "cancelled", log.read_text()[-3000:]
        assert time.monotonic() - asked < 5.0
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    assert not (settings.data_dir / "results" / f"{job.id}.mp4").exists()
