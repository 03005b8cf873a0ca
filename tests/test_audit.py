"""The hash-chained audit log, and the `keys` / `audit` commands."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest

from cli_helpers import invoke
from latentdub.provenance.audit import AuditError, AuditLog, dub_entry
from latentdub.provenance.consent import parse_consent

ZEROS = "0" * 64


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "latentdub-data"
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(folder))
    return folder


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _filled(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append({"event": "dub", "n": i, "note": "é"})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_builds_the_chain_as_specified(data_dir: Path) -> None:
    log = AuditLog()
    assert log.path == data_dir / "audit.jsonl"
    first = log.append({"event": "dub", "n": 0})
    second = log.append({"event": "dub", "n": 1})
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["prev_hash"] == ZEROS
    lines = _lines(log.path)
    assert len(lines) == 2 and all(line.endswith(b"\n") for line in lines)
    # Each line is the canonical JSON of its entry; recompute every hash independently.
    for line in lines:
        entry = json.loads(line)
        assert line.rstrip(b"\n") == _canonical(entry)
        body = {k: v for k, v in entry.items() if k != "hash"}
        assert entry["hash"] == hashlib.sha256(_canonical(body)).hexdigest()
    assert second["prev_hash"] == hashlib.sha256(lines[0].rstrip(b"\n")).hexdigest()
    assert first["time"].endswith("Z")
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    result = log.verify()
    assert result.ok and result.entries == 2 and result.first_bad_line is None


def test_dub_entry_records_consent_hashes_options_and_model(tmp_path: Path) -> None:
    consent = parse_consent({"subject": "Jane", "granted_by": "Jane", "method": "recorded verbal", "evidence": "rec-9"})
    entry = dub_entry(
        consent=consent, video_sha256="a" * 64, audio_sha256="b" * 64, output_sha256="c" * 64,
        options={"steps": 20}, model={"name": "LatentSync 1.6", "random_weights": False},
    )  # fmt: skip
    written = AuditLog(tmp_path / "log.jsonl").append(entry)
    back = next(AuditLog(tmp_path / "log.jsonl").entries())
    assert back == written
    assert back["consent_id"] == consent.id and back["consent"]["evidence"] == "rec-9"
    assert back["inputs"] == {"video_sha256": "a" * 64, "audio_sha256": "b" * 64}
    assert back["output"]["sha256"] == "c" * 64 and back["options"] == {"steps": 20}


def test_edited_line_is_found_with_its_number(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    lines = _lines(log.path)
    entry = json.loads(lines[2])
    entry["n"] = 99  # a quiet edit: the line is still valid JSON
    lines[2] = _canonical(entry) + b"\n"
    log.path.write_bytes(b"".join(lines))
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "line 3" in (result.reason or "")


def test_edit_with_a_recomputed_hash_breaks_the_next_line(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    lines = _lines(log.path)
    entry = json.loads(lines[1])
    entry["n"] = 42
    entry["hash"] = hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()
    lines[1] = _canonical(entry) + b"\n"
    log.path.write_bytes(b"".join(lines))
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "does not follow line 2" in (result.reason or "")


@pytest.mark.parametrize(("drop", "bad_line"), [(0, 1), (2, 3), (3, 4)])
def test_deleted_line_is_found(tmp_path: Path, drop: int, bad_line: int) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    lines = _lines(log.path)
    del lines[drop]
    log.path.write_bytes(b"".join(lines))
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, bad_line)
    assert "missing" in (result.reason or "")


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    lines = _lines(log.path)
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_bytes(b"".join(lines))
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, 2)


def test_removing_the_last_lines_is_found_by_the_head(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    lines = _lines(log.path)
    log.path.write_bytes(b"".join(lines[:3]))
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "removed from the end" in (result.reason or "")
    # The same log without its head file verifies, but says what it cannot know.
    log.head_path.unlink()
    result = log.verify()
    assert result.ok and result.entries == 3 and any("head file" in w for w in result.warnings)


def test_truncated_last_line_is_found_and_blocks_appends(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.jsonl")
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-15])  # a write cut off mid-line
    result = log.verify()
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert "incomplete" in (result.reason or "")
    with pytest.raises(AuditError, match=r"incomplete line \(line 5"):
        log.append({"event": "dub"})
    assert log.path.read_bytes() == data[:-15]


def test_bad_entries_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="seq, hash"):
        log.append({"seq": 7, "hash": "x"})
    with pytest.raises(AuditError, match="plain JSON"):
        log.append({"value": float("nan")})
    with pytest.raises(AuditError, match="plain JSON"):
        log.append({"value": object()})
    assert not log.path.exists()


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(path)
    for i in range(count):
        log.append({"event": "dub", "worker": worker, "i": i, "pad": "x" * (worker * 500)})


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    result = AuditLog(path).verify()
    assert result.ok, result.reason
    assert result.entries == 60
    seen = sorted((e["worker"], e["i"]) for e in AuditLog(path).entries())
    assert seen == [(w, i) for w in range(4) for i in range(15)]


# -- CLI ----------------------------------------------------------------------------------------
def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code, out, err = invoke(args, monkeypatch, capsys)
    return code, out + err


def test_cli_keys_init_signing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mykeys"
    code, text = run_main(["keys", "init-signing", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 0, text
    for name in ("chain.pem", "signing.key", "ca.pem"):
        assert (folder / name).is_file() and str(folder / name) in text
    before = (folder / "signing.key").read_bytes()
    code, text = run_main(["keys", "init-signing", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 2 and "--force" in text and "Traceback" not in text
    assert (folder / "signing.key").read_bytes() == before
    code, text = run_main(["keys", "init-signing", "--dir", str(folder), "--force"], monkeypatch, capsys)
    assert code == 0 and (folder / "signing.key").read_bytes() != before


def test_cli_keys_default_folder_is_the_data_dir(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run_main(["keys", "init-signing", "--json"], monkeypatch, capsys)
    assert code == 0, text
    info = json.loads(text)
    assert Path(info["chain"]) == data_dir / "signing" / "chain.pem"


def test_cli_audit_verify_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = _filled(tmp_path / "audit.jsonl", n=4)
    code, text = run_main(["audit", "verify", "--log", str(log.path)], monkeypatch, capsys)
    assert code == 0 and "4 entries" in text

    lines = _lines(log.path)
    lines[1] = lines[1].replace(b'"n":1', b'"n":7')
    log.path.write_bytes(b"".join(lines))
    code, text = run_main(["audit", "verify", "--log", str(log.path)], monkeypatch, capsys)
    assert code == 1 and "line 2" in text
    code, text = run_main(["audit", "verify", "--log", str(log.path), "--json"], monkeypatch, capsys)
    assert code == 1
    report = json.loads(text)
    assert report["ok"] is False and report["first_bad_line"] == 2

    code, text = run_main(["audit", "verify", "--log", str(tmp_path / "missing.jsonl")], monkeypatch, capsys)
    assert code == 2 and "does not exist" in text and "Traceback" not in text


def test_cli_audit_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = _filled(tmp_path / "audit.jsonl", n=3)
    code, text = run_main(["audit", "show", "--log", str(log.path), "--json", "--last", "2"], monkeypatch, capsys)
    assert code == 0
    assert [e["seq"] for e in json.loads(text)] == [2, 3]
