"""The service's audit log: one chain per machine, one entry per job, and `audit verify` over a folder.

A job whose worker dies after the audit entry was written but before the job was marked finished
runs again and makes a new (newly signed) file. The re-run must not log a second, unrelated dub:
its entry names the one it replaces (``supersedes``), the job counts once, and the chain still
verifies. The service's workers write ``<service data_dir>/audit/<host>.jsonl``; another host
writes its own chain, and ``latentdub audit verify --service-dir`` checks them all.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import invoke
from latentdub.files import sha256_file
from latentdub.provenance.audit import AuditLog, dub_entry
from latentdub.provenance.dub import DubProvenance, ProvenanceSettings
from latentdub.service.db import open_database
from latentdub.service.jobs import run_job
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}


class Crash(BaseException):
    """The worker process dying: not an error run_job records (the job stays running)."""


class Result:
    def __init__(self, output: Path, provenance: dict[str, Any]) -> None:
        self.output, self.provenance = output, provenance

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "provenance": self.provenance}


class SigningPipe:
    """The pipeline's provenance steps without the model: the video is copied, then the same
    finalizers as a real dub run on the temporary file (content credentials, then the audit
    entry), then it is renamed into place. Each run signs anew, so each run's file differs."""

    def __init__(self, video: Path) -> None:
        self.video = video
        self.provenance = ProvenanceSettings()

    def __call__(self, video: Path, audio: Path, output: Path, opts: Any, *, job_id: str, **_: Any) -> Result:
        prov = DubProvenance(video_sha256=sha256_file(video), audio_sha256=sha256_file(audio),
                             options=opts.to_dict(), model={"name": "test"}, consent=CONSENT, job_id=job_id,
                             settings=self.provenance)
        tmp = output.with_name(output.name + ".tmp.mp4")
        shutil.copyfile(self.video, tmp)
        signed: dict[str, Any] = {}
        for finalize in prov.finalizers():
            signed.update(finalize(tmp))
        tmp.replace(output)
        return Result(output, {**prov.summary(), **signed})


class CrashingStore(JobStore):
    """A store whose ``finish`` kills the worker the first ``crashes`` times."""

    def __init__(self, engine: Any, crashes: int = 1) -> None:
        super().__init__(engine)
        self.crashes = crashes

    def finish(self, job_id: str, result: Any, *, output_path: str | None = None) -> Any:
        if self.crashes:
            self.crashes -= 1
            raise Crash("the worker died between the audit entry and store.finish")
        return super().finish(job_id, result, output_path=output_path)


@pytest.fixture
def service(tmp_path: Path, media_dir: Path) -> Iterator[tuple[ServiceSettings, CrashingStore, str]]:
    """Settings, a store that crashes once, and a queued job with its two uploads."""
    settings = ServiceSettings(data_dir=tmp_path / "svc", auth_enabled=False)
    settings.ensure_data_dir()
    engine = open_database(settings.database_url)
    store = CrashingStore(engine)
    uploads = tmp_path / "svc" / "uploads"
    uploads.mkdir()
    video = uploads / "v.mp4"
    shutil.copyfile(media_dir / VIDEO, video)
    audio = uploads / "a.wav"
    shutil.copyfile(media_dir / "audio_musetalk_eng_60s_16k.wav", audio)
    assets = [store.add_asset(kind=k, sha256=sha256_file(p), size=p.stat().st_size, path=str(p), api_key_id=None)
              for k, p in (("video", video), ("audio", audio))]
    job, _ = store.create(options={"steps": 1}, consent=CONSENT, video_asset_id=assets[0].id,
                          audio_asset_id=assets[1].id)
    try:
        yield settings, store, job.id
    finally:
        engine.dispose()


def _chain_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _crash_then_recover(settings: ServiceSettings, store: CrashingStore, job_id: str, pipe: SigningPipe) -> None:
    with pytest.raises(Crash):
        run_job(job_id, store=store, pipe=pipe, settings=settings)
    assert store.get(job_id).status == "running"  # as a dead worker leaves it
    assert [j.id for j in store.recover()] == [job_id]  # the restart's recovery queues it again


def test_a_crash_before_finish_logs_the_job_once_in_this_hosts_chain(
    service: tuple[ServiceSettings, CrashingStore, str], media_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    settings, store, job_id = service
    pipe = SigningPipe(media_dir / VIDEO)
    _crash_then_recover(settings, store, job_id, pipe)
    chain = settings.data_dir / "audit" / f"{socket.gethostname()}.jsonl"
    assert chain.is_file(), "the service's worker writes its host's chain in the service folder"
    first = _chain_lines(chain)
    assert [e["job_id"] for e in first] == [job_id]

    run_job(job_id, store=store, pipe=pipe, settings=settings)
    job = store.get(job_id)
    assert job.status == "succeeded" and job.output_path
    entries = _chain_lines(chain)
    # The re-run made a new file (signed anew): it is logged, naming the entry it replaces.
    assert len(entries) == 2 and entries[0]["output"]["sha256"] != entries[1]["output"]["sha256"]
    assert entries[1]["supersedes"] == {"chain": chain.name, "seq": 1, "hash": entries[0]["hash"],
                                        "output_sha256": entries[0]["output"]["sha256"]}
    # The entry that counts is the delivered file's.
    found = AuditLog(chain).find_job(job_id)
    assert found is not None and found["output"]["sha256"] == sha256_file(Path(job.output_path))
    assert job.result["provenance"]["audit"]["supersedes"]["seq"] == 1
    check = AuditLog(chain).verify()
    assert check.ok and check.entries == 2 and check.jobs == 1 and check.superseded == 1, check
    # Not in the data folder's own audit.jsonl (the local CLI's log): only in the service's chain.
    assert all(e.get("job_id") != job_id for e in AuditLog().entries())

    code, out, err = invoke(["audit", "verify", "--service-dir", str(settings.data_dir)], monkeypatch, capsys)
    assert code == 0, out + err
    assert chain.name in out and "1 jobs" in out and "1 superseded" in out and "all intact" in out
    code, out, err = invoke(["audit", "verify", "--service-dir", str(settings.data_dir), "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["jobs"] == 1 and report["entries"] == 2


def test_the_same_output_is_logged_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "host.jsonl")
    entry = dub_entry(consent=CONSENT, video_sha256="a" * 64, audio_sha256="b" * 64, output_sha256="c" * 64,
                      options={}, model={}, job_id="job-1")
    first, appended = log.append_job(entry)
    again, appended_again = log.append_job(entry)  # a finalizer run twice on the same file
    assert appended and not appended_again and again == first
    other, _ = log.append_job({**entry, "job_id": "job-2"})
    assert [e["job_id"] for e in log.entries()] == ["job-1", "job-2"] and other["seq"] == 2
    assert log.find_job("job-1") == first and log.find_job("job-3") is None
    # An id that only appears inside another field is not that job's entry.
    log.append({"event": "note", "about": {"job_id": "job-9"}})
    assert log.find_job("job-9") is None
    with pytest.raises(Exception, match="job_id"):
        log.append_job({"event": "dub"})


def test_a_retry_on_another_host_links_to_the_first_hosts_chain(
    service: tuple[ServiceSettings, CrashingStore, str], media_dir: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Workers on two machines share the service folder: each writes its own chain; a job that
    died on one and ran again on the other is one job, and verify checks the link between them."""
    settings, store, job_id = service
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-a")
    _crash_then_recover(settings, store, job_id, SigningPipe(media_dir / VIDEO))
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-b")
    run_job(job_id, store=store, pipe=SigningPipe(media_dir / VIDEO), settings=settings)
    folder = settings.data_dir / "audit"
    a, b = _chain_lines(folder / "worker-a.jsonl"), _chain_lines(folder / "worker-b.jsonl")
    assert len(a) == 1 and len(b) == 1
    assert b[0]["supersedes"]["chain"] == "worker-a.jsonl" and b[0]["supersedes"]["hash"] == a[0]["hash"]

    from latentdub.provenance.audit import verify_chains

    check = verify_chains(folder)
    assert check.ok and check.entries == 2 and check.jobs == 1 and check.superseded == 1, check.to_dict()
    code, out, err = invoke(["audit", "verify", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 0 and "worker-a.jsonl" in out and "worker-b.jsonl" in out, out + err

    # The first host's chain goes missing: the link no longer leads anywhere.
    (folder / "worker-a.jsonl").rename(folder / "worker-a.jsonl.bak")
    check = verify_chains(folder)
    assert not check.ok and "worker-a.jsonl" in check.problems[0]
    code, out, err = invoke(["audit", "verify", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 1 and "NOT intact" in out, out + err


def test_verify_dir_names_the_broken_chain_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "audit"
    for host in ("alpha", "beta"):
        log = AuditLog(folder / f"{host}.jsonl")
        for i in range(3):
            log.append({"event": "dub", "job_id": f"{host}-{i}", "output": {"sha256": str(i)}})
    code, out, err = invoke(["audit", "verify", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 0 and "2 chains, 6 entries, 6 jobs: all intact" in out, out + err

    beta = folder / "beta.jsonl"
    lines = beta.read_bytes().splitlines(keepends=True)
    beta.write_bytes(lines[0] + lines[1].replace(b'"sha256":"1"', b'"sha256":"7"') + lines[2])
    code, out, err = invoke(["audit", "verify", "--dir", str(folder)], monkeypatch, capsys)
    assert code == 1, out + err
    assert "ok      alpha.jsonl" in out and "BROKEN  beta.jsonl at line 2" in out
    code, out, err = invoke(["audit", "verify", "--dir", str(folder), "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(c["path"].endswith("alpha.jsonl"), c["ok"]) for c in report["chains"]] == [(True, True), (False, False)]

    # Bad input: clear messages, exit 2.
    (tmp_path / "fresh-service").mkdir()
    for args, hint in ((["--dir", str(tmp_path / "none")], "not a folder"),
                       (["--service-dir", str(tmp_path / "fresh-service")], "no audit/ folder"),
                       (["--dir", str(folder), "--log", str(beta)], "one of"),
                       (["--dir", str(tmp_path / "fresh-service")], "no audit chain")):
        code, out, err = invoke(["audit", "verify", *args], monkeypatch, capsys)
        assert code == 2 and hint in out + err and "Traceback" not in out + err, (args, out, err)


def test_a_duplicate_without_a_link_is_reported(tmp_path: Path) -> None:
    """What the old code wrote after such a crash: two unrelated entries of one job. The chain is
    intact (nothing was tampered with) but verify says so, and counts the job once."""
    log = AuditLog(tmp_path / "old.jsonl")
    log.append({"event": "dub", "job_id": "j", "output": {"sha256": "1"}})
    log.append({"event": "dub", "job_id": "j", "output": {"sha256": "2"}})
    check = log.verify()
    assert check.ok and check.jobs == 1 and any("logged twice" in w for w in check.warnings)
    # A link that does not name the job's previous entry is not something the log writes.
    bad = AuditLog(tmp_path / "bad.jsonl")
    bad.append({"event": "dub", "job_id": "k", "output": {"sha256": "1"}})
    bad.append({"event": "dub", "job_id": "k", "output": {"sha256": "2"},
                "supersedes": {"chain": "bad.jsonl", "seq": 7, "hash": "x"}})
    check = bad.verify()
    assert not check.ok and check.first_bad_line == 2 and "supersedes" in (check.reason or "")


def test_a_pipeline_with_its_own_audit_log_keeps_it_and_still_logs_the_job_once(
    service: tuple[ServiceSettings, CrashingStore, str], media_dir: Path, tmp_path: Path
) -> None:
    """A deployment that set ``pipe.provenance.audit_log`` keeps its log; the crash is handled there too."""
    settings, store, job_id = service
    pipe = SigningPipe(media_dir / VIDEO)
    pipe.provenance.audit_log = tmp_path / "own.jsonl"
    _crash_then_recover(settings, store, job_id, pipe)
    run_job(job_id, store=store, pipe=pipe, settings=settings)
    assert store.get(job_id).status == "succeeded"
    entries = _chain_lines(tmp_path / "own.jsonl")
    assert [e["job_id"] for e in entries] == [job_id, job_id]
    assert "supersedes" not in entries[0] and entries[1]["supersedes"]["seq"] == 1, entries[1].get("supersedes")
    assert not (settings.data_dir / "audit").exists()
