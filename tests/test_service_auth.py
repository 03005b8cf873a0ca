"""API keys of the service: made once, stored as a hash, verified, listed, revoked; and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from cli_helpers import invoke
from latentdub.service.auth import (
    KeyNotFound,
    create_key,
    hash_key,
    list_keys,
    parse_key,
    revoke_key,
    verify_key,
)
from latentdub.service.db import open_database, read_session
from latentdub.service.models import ApiKey
from latentdub.service.settings import ServiceSettings


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(f"sqlite:///{tmp_path / 'service.db'}")
    yield engine
    engine.dispose()


def test_key_format_and_only_hash_stored(engine: Engine, tmp_path: Path) -> None:
    plaintext, key = create_key(engine, "ci robot")
    assert plaintext.startswith(f"ld_{key.prefix}_")
    prefix, secret = parse_key(plaintext)  # type: ignore[misc]
    assert prefix == key.prefix and len(secret) >= 43  # 32 bytes, base64url
    with read_session(engine) as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hash_key(plaintext) and row.name == "ci robot"
    assert plaintext not in json.dumps(row.to_dict())
    engine.dispose()
    for path in tmp_path.glob("service.db*"):  # the database and its WAL
        assert secret.encode() not in path.read_bytes()


def test_verify_key(engine: Engine) -> None:
    plaintext, key = create_key(engine, "a")
    other, _ = create_key(engine, "b")
    assert other != plaintext
    found = verify_key(engine, plaintext)
    assert found is not None and found.id == key.id and found.last_used_at is not None
    assert verify_key(engine, f"  {plaintext}\n") is not None
    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    for bad in (None, "", "nonsense", tampered, "ld_zzzzzzzz_" + "x" * 43, plaintext.replace("ld_", "xx_")):
        assert verify_key(engine, bad) is None, bad
    # Another key's secret under this key's prefix fails.
    assert verify_key(engine, f"ld_{key.prefix}_{parse_key(other)[1]}") is None  # type: ignore[index]


def test_list_and_revoke(engine: Engine) -> None:
    p1, k1 = create_key(engine, "one")
    p2, k2 = create_key(engine, "two")
    assert [k.id for k in list_keys(engine)] == [k1.id, k2.id]
    revoked = revoke_key(engine, k1.prefix)
    assert revoked.revoked_at is not None
    assert verify_key(engine, p1) is None and verify_key(engine, p2) is not None
    assert revoke_key(engine, k1.id).revoked_at == revoked.revoked_at  # twice is fine
    assert revoke_key(engine, f"ld_{k2.prefix}").revoked_at is not None
    assert [k.id for k in list_keys(engine, include_revoked=False)] == []
    with pytest.raises(KeyNotFound):
        revoke_key(engine, "nothing")
    with pytest.raises(KeyNotFound):
        revoke_key(engine, "  ")


# -- CLI ----------------------------------------------------------------------------------------
def _run(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return invoke(args, monkeypatch, capsys)


def test_cli_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "svc"
    code, out, err = _run(["keys", "create", "--name", "bench", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0, err
    plaintext = out.strip().splitlines()[-1]
    assert parse_key(plaintext) is not None
    assert "cannot be shown again" in err
    # The key works against the database that --data-dir names (= ServiceSettings.data_dir).
    engine = open_database(ServiceSettings(data_dir=data).database_url)
    try:
        key = verify_key(engine, plaintext)
        assert key is not None and key.name == "bench"
    finally:
        engine.dispose()

    code, out, err = _run(["keys", "list", "--data-dir", str(data), "--json"], monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["prefix"] for r in rows] == [key.prefix] and rows[0]["revoked_at"] is None
    assert plaintext not in out and parse_key(plaintext)[1] not in out  # type: ignore[index]
    code, out, err = _run(["keys", "list", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0 and key.prefix in out and "bench" in out and plaintext not in out + err

    code, out, err = _run(["keys", "revoke", key.prefix, "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0, err
    assert "revoked" in out
    code, out, err = _run(["keys", "list", "--data-dir", str(data), "--json"], monkeypatch, capsys)
    assert json.loads(out)[0]["revoked_at"] is not None
    code, out, err = _run(["keys", "revoke", "nope", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 2 and "no API key" in err and "Traceback" not in err


def test_cli_default_data_dir_and_signing_commands_remain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LATENTDUB_SERVICE_DATA_DIR", str(tmp_path / "from-env"))
    code, out, err = _run(["keys", "create"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "from-env" / "service.db").exists()
    code, out, err = _run(["keys", "list"], monkeypatch, capsys)
    assert code == 0 and "-" in out
    code, out, err = _run(["keys", "--help"], monkeypatch, capsys)
    for name in ("init-signing", "show", "create", "list", "revoke"):
        assert name in out + err
    code, out, err = _run(["keys", "init-signing", "--dir", str(tmp_path / "sig"), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["chain"]
