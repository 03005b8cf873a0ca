"""Each deployment makes its own secret watermark key (issue 18 §2): made once, mode 0600, one key
when several workers start at once, used by every dub, never replaced by accident."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from cli_helpers import invoke
from latentdub.provenance.dub import ProvenanceSettings
from latentdub.provenance.watermark import DEFAULT_KEY
from latentdub.provenance.watermark_key import (
    KEY_BYTES,
    PUBLIC_KEY,
    WatermarkKeyError,
    ensure_key,
    existing_key,
    init_key,
    key_id,
    key_path,
    load_key,
)


def test_the_key_is_made_once_private_and_random(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    assert existing_key(folder) is None  # verifying makes nothing
    key, created = ensure_key(folder)
    assert created and len(key) == KEY_BYTES and key != PUBLIC_KEY
    path = key_path(folder)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    again, created_again = ensure_key(folder)
    assert again == key and not created_again
    assert existing_key(folder) == key
    other, _ = ensure_key(tmp_path / "elsewhere")
    assert other != key  # each deployment its own
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["watermark.key"]  # no temp file left


def _make(folder: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    barrier.wait()
    key, created = ensure_key(folder)
    out.put((key.hex(), created))


def test_workers_starting_at_once_get_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(tmp_path / "data"), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({k for k, _ in got}) == 1
    assert sum(created for _, created in got) == 1
    assert load_key(key_path(tmp_path / "data")).hex() == got[0][0]


def test_init_refuses_to_replace_and_bad_key_files_are_named(tmp_path: Path) -> None:
    path, key = init_key(tmp_path)
    with pytest.raises(WatermarkKeyError, match="already exists"):
        init_key(tmp_path)
    _, new = init_key(tmp_path, force=True)
    assert new != key and load_key(path) == new
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(WatermarkKeyError, match="at least 16"):
        load_key(short)
    with pytest.raises(WatermarkKeyError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    # An endless or huge file is refused after reading a few KB, not read whole.
    with pytest.raises(WatermarkKeyError, match=r"too large to be a key \(over 4096 bytes\)"):
        load_key("/dev/zero")


def test_dubs_use_the_deployment_key_not_the_public_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(tmp_path / "deploy"))
    settings = ProvenanceSettings()
    key = settings.watermark_secret()
    assert key != bytes(DEFAULT_KEY) and key == load_key(tmp_path / "deploy" / "watermark.key")
    assert ProvenanceSettings(watermark_key_dir=tmp_path / "svc").watermark_secret() == load_key(
        tmp_path / "svc" / "watermark.key")
    assert ProvenanceSettings(watermark_key=b"k" * 32).watermark_secret() == b"k" * 32


def test_keys_init_watermark_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["keys", "init-watermark", "--dir", str(tmp_path), "--json"], monkeypatch, capsys)
    assert code == 0, out
    info = json.loads(out)
    key = load_key(tmp_path / "watermark.key")
    assert info == {"path": str(tmp_path / "watermark.key"), "key_id": key_id(key)}
    assert key.hex() not in out  # the key itself is never printed
    code, out, err = invoke(["keys", "init-watermark", "--dir", str(tmp_path)], monkeypatch, capsys)
    assert code != 0 and "already exists" in (out + err)
    assert os.stat(tmp_path / "watermark.key").st_mode & 0o077 == 0
