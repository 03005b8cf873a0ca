"""Turning the watermark off is a permission: only keys made with ``--allow-no-watermark`` may,
and without auth only a server that says so (``LATENTDUB_ALLOW_NO_WATERMARK``).

Against a live server on SQLite and on a real PostgreSQL (the permission is a column of the key's
row). The model never loads: what matters is whether the job is taken, and that a refused
request stores nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import invoke
from service_helpers import assert_error, live, speech
from test_service_store import _pg_database, pg_url  # noqa: F401  (pg_url: a fixture, used by name)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")

import httpx

from latentdub.service.app import create_app
from latentdub.service.auth import create_key, revoke_key
from latentdub.service.db import open_database
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    server = request.getfixturevalue("pg_url")
    with _pg_database(server) as url:
        yield url


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "speech.wav", 1.0)}


Serve = Callable[..., tuple[str, Any]]


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[Serve]:
    """``serve(**settings)``: (base URL, app) of a live server on ``db_url`` whose model never loads."""
    servers: list[Any] = []
    gate = threading.Event()

    def never_loads() -> Any:
        gate.wait(300)
        raise RuntimeError("test: no model")

    def start(**values: Any) -> tuple[str, Any]:
        settings = ServiceSettings(data_dir=tmp_path / f"data{len(servers)}", database_url=db_url,
                                   key_concurrency=0, key_daily_quota=0, **values)
        app = create_app(settings, pipe_factory=never_loads)
        server = live(app)
        base = server.__enter__()
        servers.append(server)
        return base, app

    try:
        yield start
    finally:
        gate.set()
        for server in reversed(servers):
            server.__exit__(None, None, None)


def _submit(base: str, clip: dict[str, Path], key: str | None, **options: str) -> Any:
    files = {"video": ("v.mp4", clip["video"].read_bytes(), "video/mp4"),
             "audio": ("a.wav", clip["audio"].read_bytes(), "audio/wav")}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    form = {"consent": json.dumps(CONSENT), "steps": "1", **options}
    return httpx.post(f"{base}/api/v1/jobs", data=form, files=files, headers=headers, timeout=120)


def _stored(app: Any) -> int:
    """Uploads stored by the server: asset rows and files."""
    rows = len(app.state.store.list_assets(None, limit=500)[0])
    folder = app.state.settings.data_dir / "uploads"
    return rows + (len(list(folder.iterdir())) if folder.is_dir() else 0)


def test_only_keys_with_the_permission_may_turn_the_watermark_off(serve: Serve, clip: dict[str, Path]) -> None:
    base, app = serve()
    engine = app.state.store.engine
    plain, plain_row = create_key(engine, "plain")
    for value in ("false", "0", "no"):
        r = _submit(base, clip, plain, watermark=value)
        err = assert_error(r, 403, "--allow-no-watermark", field="watermark")
        assert err["code"] == "watermark_required"
    assert _stored(app) == 0, "a refused request stores no upload"
    assert plain_row.to_dict()["allow_no_watermark"] is False
    allowed, allowed_row = create_key(engine, "editor", allow_no_watermark=True)
    assert allowed_row.to_dict()["allow_no_watermark"] is True

    r = _submit(base, clip, plain)  # the default (on) and an explicit on are fine
    assert r.status_code == 202, r.text
    r = _submit(base, clip, plain, watermark="true")
    assert r.status_code == 202 and r.json()["options"]["watermark"] is True, r.text

    r = _submit(base, clip, allowed, watermark="false")
    assert r.status_code == 202, r.text
    job = app.state.store.get(r.json()["id"])
    assert job.options["watermark"] is False  # what the worker reads: the job's own row

    # The server setting does not widen what a key may do when auth is on.
    base2, app2 = serve(allow_no_watermark=True)
    plain2, _ = create_key(app2.state.store.engine, "plain")
    assert_error(_submit(base2, clip, plain2, watermark="false"), 403, field="watermark")

    revoke_key(engine, allowed_row.id)  # a revoked key is refused before this check (401)
    assert _submit(base, clip, allowed, watermark="false").status_code == 401


def test_without_auth_the_server_setting_decides(serve: Serve, clip: dict[str, Path]) -> None:
    base, app = serve(auth_enabled=False)
    err = assert_error(_submit(base, clip, None, watermark="false"), 403, "LATENTDUB_ALLOW_NO_WATERMARK",
                       field="watermark")
    assert err["code"] == "watermark_required" and _stored(app) == 0
    assert _submit(base, clip, None).status_code == 202

    base, app = serve(auth_enabled=False, allow_no_watermark=True)
    r = _submit(base, clip, None, watermark="false")
    assert r.status_code == 202 and r.json()["options"]["watermark"] is False, r.text


def test_the_setting_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert ServiceSettings(data_dir=tmp_path).allow_no_watermark is False
    monkeypatch.setenv("LATENTDUB_ALLOW_NO_WATERMARK", "true")
    assert ServiceSettings(data_dir=tmp_path).allow_no_watermark is True


def test_cli_keys_create_allow_no_watermark_and_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "svc"
    code, out, err = invoke(["keys", "create", "--name", "plain", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = invoke(["keys", "create", "--name", "editor", "--allow-no-watermark", "--data-dir", str(data)],
                            monkeypatch, capsys)
    assert code == 0 and "may turn the watermark off" in err, err
    code, out, err = invoke(["keys", "list", "--data-dir", str(data), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert {r["name"]: r["allow_no_watermark"] for r in json.loads(out)} == {"plain": False, "editor": True}
    code, out, err = invoke(["keys", "list", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0 and "no-watermark" in out
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert "allowed" in rows["editor"] and "allowed" not in rows["plain"]
    engine = open_database(ServiceSettings(data_dir=data).database_url)
    try:
        from latentdub.service.auth import list_keys

        assert {k.name: k.allow_no_watermark for k in list_keys(engine)} == {"plain": False, "editor": True}
    finally:
        engine.dispose()
