"""Storage lifecycle against a live server: assets listed and deleted per key, the per-key storage
limit under simultaneous uploads, results and assets expiring while the server runs, orphaned
files swept at start-up, and the stored bytes on ``/metrics``.

The dub itself is a stand-in (it writes a fixed-size result, and can be held running), so the
tests measure storage, not the model. The limit and the expiry run on a SQLite file and on a real
PostgreSQL (``test_service_quota``'s ``db_url`` fixture; skipped where PostgreSQL is absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service_helpers import assert_error, live, speech
from test_service_quota import db_url, together  # noqa: F401  (db_url: a fixture, used by name)
from test_service_store import pg_url  # noqa: F401  (pg_url: needed by db_url)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")

import httpx

from latentdub.errors import Cancelled
from latentdub.options import DubOptions
from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.db import open_database
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
RESULT_SIZE = 40_000  # bytes of the stand-in dub's result
HOURS = 3600.0


class StandInDub:
    """The pipeline's call shape: writes ``RESULT_SIZE`` bytes as the result; while ``hold`` is
    clear, a started job stays running (a server shutdown still stops it)."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, video: Path, audio: Path, output: Path, opts: Any, **kw: Any) -> Any:
        cancel = kw.get("cancel")
        while not self.hold.wait(0.05):
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopped")
        Path(output).write_bytes(b"\0" * RESULT_SIZE)
        return SimpleNamespace(to_dict=lambda: {"frames": 1, "duration_s": 0.04})


class Client:
    """One API key's view of a live server."""

    def __init__(self, base: str, key: str | None) -> None:
        self.base = base
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers=self.auth, timeout=60, **kw)

    def delete(self, path: str) -> httpx.Response:
        return httpx.delete(f"{self.base}{path}", headers=self.auth, timeout=60)

    def upload(self, path: Path, kind: str) -> httpx.Response:
        return httpx.post(f"{self.base}/api/v1/assets", data={"kind": kind},
                          files={"file": ("x.bin", path.read_bytes(), "application/octet-stream")},
                          headers=self.auth, timeout=60)

    def asset(self, path: Path, kind: str) -> dict[str, Any]:
        r = self.upload(path, kind)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def submit(self, video_id: str, audio_id: str) -> str:
        form = {"consent": json.dumps(CONSENT), "video_asset_id": video_id, "audio_asset_id": audio_id}
        r = httpx.post(f"{self.base}/api/v1/jobs", data=form, headers=self.auth, timeout=60)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def wait_job(self, job_id: str, status: str | tuple[str, ...], timeout_s: float = 20.0) -> dict[str, Any]:
        wanted = (status,) if isinstance(status, str) else status
        return until(lambda: (j := self.get(f"/api/v1/jobs/{job_id}").json())["status"] in wanted and j, timeout_s)

    def usage(self) -> dict[str, Any]:
        r = self.get("/api/v1/usage")
        assert r.status_code == 200, r.text
        return dict(r.json())


def until(check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """``check()``'s first true value, polled until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def stored_bytes(base: str) -> dict[str, int]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {k: int(v) for k, v in re.findall(r'^latentdub_storage_bytes\{kind="(\w+)"\} (\d+)$', text, re.M)}


@contextlib.contextmanager
def serving(data_dir: Path, dub: StandInDub, db: str | None = None, **knobs: Any) -> Iterator[SimpleNamespace]:
    """A live server (no job limits) running ``dub``; ``knobs``: more settings."""
    settings = ServiceSettings(data_dir=data_dir, database_url=db or "", key_concurrency=0, key_daily_quota=0,
                               **knobs)
    app = create_app(settings, pipe_factory=lambda: dub)
    with live(app) as base:
        try:
            yield SimpleNamespace(base=base, store=app.state.store, settings=settings,
                                  client=lambda name: Client(base, create_key(app.state.store.engine, name)[0]))
        finally:
            dub.hold.set()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "speech.wav", 1.0)}


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


# -- listing, reading, deleting; usage and /metrics ---------------------------------------------
def test_assets_are_listed_and_deleted_per_key_and_metered(tmp_path: Path, clip: dict[str, Path]) -> None:
    dub = StandInDub()
    with serving(tmp_path / "data", dub) as srv:
        mine, other = srv.client("mine"), srv.client("other")
        before = stored_bytes(srv.base)
        assert before == {"uploads": 0, "results": 0, "analysis": 0}
        video = mine.asset(clip["video"], "video")
        audio = mine.asset(clip["audio"], "audio")
        theirs = other.asset(clip["audio"], "audio")
        ownerless = srv.store.add_asset(kind="audio", sha256="0" * 64, size=5, path=str(tmp_path / "x.wav"),
                                        api_key_id=None)  # uploaded with auth off
        sizes = clip["video"].stat().st_size + clip["audio"].stat().st_size
        assert set(video) == {"id", "kind", "sha256", "bytes", "created_at", "expires_at"}
        assert video["expires_at"] > video["created_at"]  # 7 days by default

        page = mine.get("/api/v1/assets").json()
        assert [a["id"] for a in page["assets"]] == [audio["id"], video["id"]] and page["next_cursor"] is None
        first = mine.get("/api/v1/assets", params={"limit": 1}).json()
        second = mine.get("/api/v1/assets", params={"limit": 1, "cursor": first["next_cursor"]}).json()
        assert [a["id"] for a in first["assets"] + second["assets"]] == [audio["id"], video["id"]]
        assert second["next_cursor"] is None
        assert mine.get(f"/api/v1/assets/{video['id']}").json() == video
        for foreign in (theirs["id"], ownerless.id, str(uuid.uuid4())):  # another key's, no key's, none
            assert_error(mine.get(f"/api/v1/assets/{foreign}"), 404)
            assert_error(mine.delete(f"/api/v1/assets/{foreign}"), 404)
        assert srv.store.get_asset(theirs["id"]) is not None

        usage = mine.usage()
        assert usage["storage"] == {"bytes": sizes, "limit_bytes": 20 * 1024**3, "assets": 2, "asset_bytes": sizes,
                                    "results": 0, "result_bytes": 0}
        assert stored_bytes(srv.base)["uploads"] == sizes + clip["audio"].stat().st_size + 5

        # a running job keeps its assets: 409; once it ended, its result counts toward the key's bytes
        dub.hold.clear()
        job_id = mine.submit(video["id"], audio["id"])
        mine.wait_job(job_id, "running")
        err = assert_error(mine.delete(f"/api/v1/assets/{video['id']}"), 409, job_id)
        assert err["code"] == "asset_in_use"
        dub.hold.set()
        job = mine.wait_job(job_id, "succeeded")
        assert job["expires_at"] > job["finished_at"] and job["expired_at"] is None
        assert mine.usage()["storage"]["result_bytes"] == RESULT_SIZE
        assert stored_bytes(srv.base)["results"] == RESULT_SIZE

        cache = srv.settings.data_dir / "analysis" / f"{video['id']}.json"
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("{}")
        stored = Path(srv.store.get_asset(video["id"]).path)
        r = mine.delete(f"/api/v1/assets/{video['id']}")
        assert r.status_code == 200 and r.json() == {"id": video["id"], "deleted": True}, r.text
        assert not stored.exists() and not cache.exists() and srv.store.get_asset(video["id"]) is None
        assert_error(mine.get(f"/api/v1/assets/{video['id']}"), 404)
        assert [a["id"] for a in mine.get("/api/v1/assets").json()["assets"]] == [audio["id"]]
        assert mine.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"  # the job stays
        assert stored_bytes(srv.base)["uploads"] == 2 * clip["audio"].stat().st_size + 5
        assert mine.usage()["storage"]["bytes"] == clip["audio"].stat().st_size + RESULT_SIZE


# -- the storage limit under simultaneous uploads (SQLite and PostgreSQL) ------------------------
def test_simultaneous_uploads_keep_the_storage_limit(db_url: str, tmp_path: Path, clip: dict[str, Path]) -> None:  # noqa: F811
    size = clip["audio"].stat().st_size
    with serving(tmp_path / "data", StandInDub(), db_url, key_storage_bytes=int(3.5 * size)) as srv:
        client, other = srv.client("k"), srv.client("other")
        got = together(8, lambda _: client.upload(clip["audio"], "audio"))
        codes = sorted(r.status_code if isinstance(r, httpx.Response) else repr(r) for r in got)
        assert codes == [201] * 3 + [413] * 5, [getattr(r, "text", r) for r in got]
        refused = [assert_error(r, 413, "would pass the limit") for r in got if r.status_code == 413]
        assert {e["code"] for e in refused} == {"storage_quota"}
        assert client.usage()["storage"]["bytes"] == 3 * size
        assert len(files_in(srv.settings.data_dir / "uploads")) == 3  # the refused uploads' files are gone
        assert other.upload(clip["audio"], "audio").status_code == 201  # each key has its own
        # deleting frees the bytes
        victim = client.get("/api/v1/assets").json()["assets"][0]["id"]
        assert client.delete(f"/api/v1/assets/{victim}").status_code == 200
        assert client.upload(clip["audio"], "audio").status_code == 201
        err = assert_error(client.upload(clip["audio"], "audio"), 413, field="file")
        assert err["code"] == "storage_quota"


# -- expiry while the server runs (SQLite and PostgreSQL) ----------------------------------------
def test_results_and_assets_expire_while_the_server_runs(db_url: str, tmp_path: Path,  # noqa: F811
                                                         clip: dict[str, Path]) -> None:
    dub = StandInDub()
    with serving(tmp_path / "data", dub, db_url, retention_s=3.0, sweep_interval_s=0.2) as srv:
        client = srv.client("k")
        video, audio = client.asset(clip["video"], "video"), client.asset(clip["audio"], "audio")
        done = client.submit(video["id"], audio["id"])
        cache = srv.settings.data_dir / "analysis" / f"{video['id']}.json"
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("{}")
        job = client.wait_job(done, "succeeded")
        result = srv.settings.data_dir / "results" / f"{done}.mp4"
        assert job["expires_at"] is not None and job["expired_at"] is None

        # a second job, held running, keeps its own assets past their time
        dub.hold.clear()
        video2, audio2 = client.asset(clip["video"], "video"), client.asset(clip["audio"], "audio")
        held = client.submit(video2["id"], audio2["id"])
        client.wait_job(held, "running")

        err = until(lambda: (r := client.get(f"/api/v1/jobs/{done}/result")).status_code == 410 and r, 15)
        assert assert_error(err, 410, "expired at")["code"] == "result_expired"
        job = client.get(f"/api/v1/jobs/{done}").json()  # the row stays, saying when
        assert job["status"] == "succeeded" and job["expired_at"] is not None and job["result_url"] is None
        assert job["expires_at"] == job["expired_at"] and not result.exists()
        until(lambda: client.get(f"/api/v1/assets/{audio['id']}").status_code == 404, 15)
        assert_error(client.get(f"/api/v1/assets/{video['id']}"), 404)
        assert not cache.exists()
        time.sleep(3.5)  # past the held job's assets' time: still there, in use
        assert {a["id"] for a in client.get("/api/v1/assets").json()["assets"]} == {video2["id"], audio2["id"]}

        dub.hold.set()
        client.wait_job(held, "succeeded")
        until(lambda: not client.get("/api/v1/assets").json()["assets"], 15)
        until(lambda: client.get(f"/api/v1/jobs/{held}/result").status_code == 410, 15)
        assert files_in(srv.settings.data_dir / "uploads") == set()
        assert files_in(srv.settings.data_dir / "results") == set()
        assert client.usage()["storage"]["bytes"] == 0
        assert stored_bytes(srv.base)["uploads"] == 0 and stored_bytes(srv.base)["results"] == 0
        assert {j["id"] for j in client.get("/api/v1/jobs").json()["jobs"]} == {done, held}


# -- orphans at start-up ------------------------------------------------------------------------
def test_orphaned_files_are_removed_at_start_up(tmp_path: Path, clip: dict[str, Path]) -> None:
    data = tmp_path / "data"
    settings = ServiceSettings(data_dir=data)
    store = JobStore(open_database(settings.database_url))
    folders = {name: data / name for name in ("uploads", "results", "analysis")}
    for folder in folders.values():
        folder.mkdir(parents=True)

    def made(folder: str, name: str, age_s: float, size: int = 100) -> Path:
        path = folders[folder] / name
        path.write_bytes(b"x" * size)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    kept_asset = made("uploads", f"{uuid.uuid4()}.wav", 5 * HOURS)
    asset = store.add_asset(kind="audio", sha256="0" * 64, size=100, path=str(kept_asset), api_key_id=None)
    finished, _ = store.create(options=DubOptions().to_dict())
    store.mark_running(finished.id, "w")
    kept_result = made("results", f"{finished.id}.mp4", 5 * HOURS)
    store.finish(finished.id, {"frames": 1}, output_path=str(kept_result))
    running, _ = store.create(options=DubOptions().to_dict())
    store.mark_running(running.id, "w")
    store.engine.dispose()
    kept = [
        kept_asset,
        kept_result,
        made("results", f"{running.id}.mp4", 5 * HOURS),  # of a job to run again (a worker writes it)
        made("uploads", f"{uuid.uuid4()}.part", 60),  # an upload streaming in (maybe in another process)
        made("uploads", f"{uuid.uuid4()}.mp4", 60),  # sniffed a moment ago; its row comes next
        made("analysis", f"{asset.id}.json", 5 * HOURS),
    ]
    orphans = [
        made("uploads", f"{uuid.uuid4()}.mp4", 4 * HOURS, size=4_400_000),  # the kill -9 of issue 17
        made("uploads", f"{uuid.uuid4()}.part", 2 * HOURS),
        made("results", f"{uuid.uuid4()}.mp4", 2 * HOURS),  # of a job deleted meanwhile
        made("results", f".{uuid.uuid4()}.mp4.ab12.tmp", 2 * HOURS),
        made("analysis", f"{uuid.uuid4()}.json", 2 * HOURS),  # of a deleted asset
    ]
    gate = threading.Event()  # the model never loads: the recovered job stays queued, its file stays

    def never_loads() -> Any:
        gate.wait(60)
        raise RuntimeError("test: no model")

    app = create_app(ServiceSettings(data_dir=data, sweep_interval_s=HOURS), pipe_factory=never_loads)
    with live(app):
        try:
            until(lambda: not any(p.exists() for p in orphans), 15)
            assert all(p.exists() for p in kept), [p.name for p in kept if not p.exists()]
        finally:
            gate.set()  # before the server stops: its worker waits in the model's loading
