"""Verify a video: the whole story of its watermark, credentials and audit record.

:func:`verify_file` decodes the file once and reads, from the same frames:

* the watermark with the deployment's secret key, per time window (``segment_s``; one
  :class:`~latentdub.provenance.watermark.WatermarkDetector` per window, frames sampled as
  ``detect_file`` samples them) and over the whole file; adjacent windows with the same finding
  are merged, so a video spliced from two dubs names both job ids with their time ranges;
* the public key of older versions, over the whole file (anyone could have made or removed
  such a mark: the report says so);
* the picture's fingerprint, compared with the one the audit log kept for each job id found
  (:mod:`latentdub.provenance.fingerprint`): a mark on footage that is not the job's output is
  a *copied mark*, not proof that the footage is AI-made;
* a score of −5 or less (the mark's known chips come out inverted: a removal that subtracted
  too much) is *tampering*;
* the C2PA credentials, and whether their ``watermark_id`` agrees with the mark. The job id is
  claimed (``attribution``) only when the mark and valid credentials agree, or, without
  credentials, when the picture matches the job's fingerprint.

``status`` is one of :data:`STATUSES`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentdub.provenance.fingerprint import Fingerprint, QueryPrint
from latentdub.provenance.watermark import Z_MIN, WatermarkDetector, WatermarkReport
from latentdub.provenance.watermark_key import PUBLIC_KEY, PUBLIC_KEY_NOTE, is_public, key_id

MARKED, AI_MARKER, COPIED, TAMPERED, NOT_FOUND = "marked", "ai_marker", "copied_mark", "tampered", "not_found"
STATUSES = (MARKED, AI_MARKER, COPIED, TAMPERED, NOT_FOUND)
TAMPER_Z = -5.0  # score at or below this: the mark's known chips are inverted (over-subtracted)
SEGMENT_S = 2.0
LEGACY_EVERY = 4  # the public key (older files) reads every fourth sampled frame
STATUS_TEXT = {
    MARKED: "marked: AI-generated, job id read",
    AI_MARKER: "AI marker only: the AI-generated marker is there, no job id could be read",
    COPIED: "copied mark: a mark taken from another video; NOT proof that this footage is AI-made",
    TAMPERED: "tampered: the mark was subtracted (a removal attempt)",
    NOT_FOUND: "not found",
}


def _status_of(report: WatermarkReport) -> str:
    if report.found:
        return MARKED
    if report.frames_checked and report.score <= TAMPER_Z:
        return TAMPERED
    if report.ai_marker:
        return AI_MARKER
    return NOT_FOUND


def _hex(job_id: int | None) -> str | None:
    return None if job_id is None else f"{job_id:08x}"


def _parse_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return int(value.strip(), 16)
        except ValueError:
            return None
    return None


@dataclass
class Segment:
    """A time range whose windows read the same: ``status`` and (if marked) ``job_id``."""

    start_s: float
    end_s: float
    status: str
    job_id: int | None
    score: float  # the lowest window score of the range (the weakest evidence)
    frames: int
    content: dict[str, Any] | None = None  # the fingerprint check of a marked range

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "status": self.status,
            "job_id": self.job_id,
            "job_id_hex": _hex(self.job_id),
            "score": round(self.score, 3),
            "frames_checked": self.frames,
            "content": self.content,
        }


@dataclass
class VerifyReport:
    file: str
    status: str
    watermark: WatermarkReport  # the whole file, with the key that counts
    key: dict[str, Any]
    segments: list[Segment]
    job_ids: list[int]
    copies: dict[str, Any]  # job id hex → the fingerprint check
    c2pa: dict[str, Any] | None
    credentials: dict[str, Any]
    attribution: dict[str, Any]
    duration_s: float
    frames_decoded: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def marked(self) -> bool:
        """Either mark says AI-generated (a copied or removed mark does not count)."""
        creds = bool(self.c2pa and self.c2pa.get("present"))
        return self.status in (MARKED, AI_MARKER) or creds

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "status": self.status,
            "status_text": STATUS_TEXT[self.status],
            "marked": self.marked,
            "watermark": self.watermark.to_dict(),
            "key": self.key,
            "segments": [s.to_dict() for s in self.segments],
            "job_ids": [_hex(j) for j in self.job_ids],
            "copy_check": self.copies,
            "c2pa": self.c2pa,
            "credentials": self.credentials,
            "attribution": self.attribution,
            "duration_s": round(self.duration_s, 3),
            "frames_decoded": self.frames_decoded,
            "elapsed_s": round(self.elapsed_s, 3),
            "notes": self.notes,
        }


# -- the audit log's fingerprints -----------------------------------------------------------------
def job_fingerprints(audit_paths: Iterable[str | os.PathLike[str]], job_id: int) -> list[dict[str, Any]]:
    """The audit entries (newest last) whose ``watermark_id`` is ``job_id``, each as
    ``{"job": …, "log": …, "seq": …, "fingerprint": Fingerprint | None}``."""
    from latentdub.provenance.audit import AuditLog

    found: list[dict[str, Any]] = []
    for path in audit_paths:
        if not Path(path).is_file():
            continue
        for entry in AuditLog(path).entries():
            if _parse_id(entry.get("watermark_id")) != job_id:
                continue
            found.append({
                "job": entry.get("job_id"),
                "log": str(path),
                "seq": entry.get("seq"),
                "fingerprint": Fingerprint.from_dict(entry.get("fingerprint")),
            })  # fmt: skip
    return found


def _check_copy(query: QueryPrint, job_id: int, ranges: list[tuple[float, float]],
                audit_paths: list[Path]) -> dict[str, Any]:
    """Does the picture in ``ranges`` match what job ``job_id`` wrote? ``match``: True, False or
    None (undetermined: the job is not in the log, it kept no fingerprint, or too little time)."""
    entries = job_fingerprints(audit_paths, job_id)
    if not entries:
        return {"match": None, "reason": "this deployment's audit log does not know the job id"}
    prints = [e for e in entries if e["fingerprint"] is not None]
    if not prints:
        return {"match": None, "reason": "the job's audit entry keeps no fingerprint", "job": entries[-1]["job"]}
    results = []
    for start, end in ranges:
        best: dict[str, Any] | None = None
        for e in prints:  # a re-run job (or a 32-bit collision): any of its outputs may be this one
            got = query.match(e["fingerprint"], start, end)
            got = {**got, "job": e["job"]}
            if best is None or (got["score"] is not None and (best["score"] is None or got["score"] > best["score"])):
                best = got
        assert best is not None
        results.append({"start_s": round(start, 3), "end_s": round(end, 3), **best})
    decided = [r for r in results if r["match"] is not None]
    match = None if not decided else all(r["match"] for r in decided)
    scores = [r["score"] for r in decided]
    out = {"match": match, "job": results[0]["job"], "ranges": results,
           "score": None if not scores else round(min(scores), 4)}
    if match is None:
        out["reason"] = "too little of the job's picture to compare"
    return out


# -- the scan ---------------------------------------------------------------------------------------
def verify_file(
    path: str | os.PathLike[str],
    *,
    key: bytes | None,
    key_source: str = "deployment",
    trust: str | os.PathLike[str] | None = None,
    audit_paths: Iterable[str | os.PathLike[str]] = (),
    max_frames: int = 150,
    segment_s: float = SEGMENT_S,
    credentials: bool = True,
) -> VerifyReport:
    """Everything verify says about ``path`` (see the module docstring).

    ``key``: the deployment's secret key (None: there is none; only the public key is tried);
    ``key_source`` names it in the report (``deployment``, ``file``). ``audit_paths``: the audit
    chains whose fingerprints the copy check reads. ``credentials``: read the C2PA manifest.
    """
    from latentdub.media.reader import iter_frames, probe_video

    if max_frames < 1:
        raise ValueError(f"max_frames must be ≥ 1, got {max_frames}")
    if not segment_s > 0:
        raise ValueError(f"segment_s must be > 0, got {segment_s}")
    t0 = time.perf_counter()
    path = Path(path)
    info = probe_video(path)
    total = max(1, info.num_frames)
    step = max(1, math.ceil(total / max_frames))
    duration = float(info.duration_s or 0.0)
    n_windows = max(1, round(duration / segment_s)) if duration > 0 else None  # a short tail joins the last

    primary = key if key is not None and not is_public(key) else PUBLIC_KEY
    primary_public = is_public(primary)
    windows: dict[int, WatermarkDetector] = {}
    # The whole file's detector is the windows' merged (each frame is read once) where the
    # detector can merge; else it is fed the same frames.
    can_merge = callable(getattr(WatermarkDetector, "merge", None))
    whole = WatermarkDetector(primary)
    # Marks of older versions (the public key): every LEGACY_EVERY-th sampled frame is plenty
    # for a clean mark, and keeps verify's cost near one read per frame.
    legacy = None if primary_public else WatermarkDetector(PUBLIC_KEY)
    query = QueryPrint()
    decoded = sampled = 0
    first_t: float | None = None
    last_t = 0.0
    for frame in iter_frames(path):
        decoded += 1
        first_t = frame.time_s if first_t is None else first_t
        last_t = frame.time_s
        query.add(frame.time_s, frame.image)
        if frame.index % step or sampled >= max_frames:
            continue
        sampled += 1
        w = max(0, math.floor((frame.time_s - first_t) / segment_s))  # windows from the first frame on
        if n_windows is not None:
            w = min(w, n_windows - 1)
        det = windows.get(w)
        if det is None:
            det = windows[w] = WatermarkDetector(primary)
        det.add(frame.image)
        if not can_merge:
            whole.add(frame.image)
        if legacy is not None and sampled % LEGACY_EVERY == 1 % LEGACY_EVERY:
            legacy.add(frame.image)
    first_t = first_t or 0.0
    end_t = last_t + (1.0 / info.fps if info.fps and info.fps > 0 else 0.0)
    duration = max(duration, end_t - first_t)
    if can_merge:
        for w in sorted(windows):
            whole.merge(windows[w])

    overall = whole.report()
    key_info: dict[str, Any] = {"source": "public" if primary_public else key_source, "id": key_id(primary),
                                "public": primary_public}
    notes: list[str] = []
    segments = _segments(windows, segment_s, first_t, end_t, searched=bool(overall.found and not _identity(overall)))
    used_legacy = False
    quiet = _status_of(overall) == NOT_FOUND and all(s.status == NOT_FOUND for s in segments)
    # Older files were marked where the mark stays (no geometry search for them): a cheap
    # identity score first, the full reading only where it shows something.
    if legacy is not None and legacy.frames and quiet and (legacy.score() >= Z_MIN or legacy.score() <= TAMPER_Z):
        old = legacy.report()
        if _status_of(old) != NOT_FOUND:  # a mark made with the public key
            used_legacy = True
            overall = old
            key_info = {"source": "public", "id": key_id(PUBLIC_KEY), "public": True}
            segments = [Segment(first_t, end_t, _status_of(old), old.payload.job_id if old.payload else None,
                                old.score, old.frames_checked)]
    if key_info["public"]:
        key_info["note"] = PUBLIC_KEY_NOTE
        if primary_public and not used_legacy:
            notes.append("no deployment watermark key: only the public key was tried")

    # Job ids over time, and the whole file's if the windows could not read one.
    job_ids: list[int] = []
    for s in segments:
        if s.job_id is not None and s.job_id not in job_ids:
            job_ids.append(s.job_id)
    if overall.found and overall.payload is not None and overall.payload.job_id not in job_ids:
        job_ids.append(overall.payload.job_id)

    # Copy check: is the picture under each job id that job's output?
    audit = [Path(p) for p in audit_paths]
    copies: dict[str, Any] = {}
    for job in job_ids:
        ranges = [(s.start_s, s.end_s) for s in segments if s.job_id == job] or [(first_t, end_t)]
        check = _check_copy(query, job, _merge_ranges(ranges), audit)
        copies[_hex(job)] = check
        for s in segments:
            if s.job_id == job:
                s.content = {"match": check["match"], "score": check.get("score")}
                if check["match"] is False:
                    s.status = COPIED
    tampered = _status_of(overall) == TAMPERED or any(s.status == TAMPERED for s in segments)
    if tampered:
        status = TAMPERED
    elif any(c["match"] is False for c in copies.values()):
        status = COPIED
    elif job_ids:
        status = MARKED
    elif overall.ai_marker or any(s.status == AI_MARKER for s in segments):
        status = AI_MARKER
    else:
        status = NOT_FOUND

    c2pa = None
    if credentials:
        from latentdub.provenance.c2pa import read_credentials

        c2pa = read_credentials(path, trust_anchors=trust).to_dict()
    creds = _credentials(c2pa, job_ids, status)
    attribution = _attribution(status, job_ids, copies, creds)
    return VerifyReport(
        file=str(path), status=status, watermark=overall, key=key_info, segments=segments, job_ids=job_ids,
        copies=copies, c2pa=c2pa, credentials=creds, attribution=attribution, duration_s=duration,
        frames_decoded=decoded, elapsed_s=time.perf_counter() - t0, notes=notes,
    )  # fmt: skip


def _identity(report: WatermarkReport) -> bool:
    """Whether the mark was read where it was put (not found by the geometry search)."""
    return getattr(report, "search_score", None) is None


def _window_status(det: WatermarkDetector, searched: bool) -> tuple[str, int | None, float]:
    """(status, job id, score) of one window. The identity score is cheap; the full report
    (geometry search where the identity reads nothing) only where it can find something:
    a marker at the identity, or a file whose mark was found away from the identity."""
    z = det.score()
    if z <= TAMPER_Z:
        return TAMPERED, None, z
    if z < Z_MIN and not searched:
        return NOT_FOUND, None, z
    rep = det.report()
    job = rep.payload.job_id if rep.found and rep.payload is not None else None
    return _status_of(rep), job, rep.score


def _segments(windows: dict[int, WatermarkDetector], segment_s: float, first_t: float, end_t: float, *,
              searched: bool) -> list[Segment]:
    out: list[Segment] = []
    order = sorted(windows)
    for i, w in enumerate(order):
        status, job, score = _window_status(windows[w], searched)
        frames = windows[w].frames
        start = first_t + (0.0 if i == 0 else w * segment_s)
        end = end_t if i == len(order) - 1 else first_t + order[i + 1] * segment_s
        if out and out[-1].status == status and out[-1].job_id == job:
            prev = out[-1]
            prev.end_s, prev.score, prev.frames = end, min(prev.score, score), prev.frames + frames
        else:
            out.append(Segment(start, end, status, job, score, frames))
    return out


def _merge_ranges(ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1e-6:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _credentials(c2pa: dict[str, Any] | None, job_ids: list[int], status: str) -> dict[str, Any]:
    """Whether the C2PA manifest's watermark id and the mark agree."""
    if not c2pa or not c2pa.get("present"):
        return {"present": False, "agreement": "no_credentials", "watermark_id": None}
    dub = (c2pa.get("claims") or {}).get("latentdub") or {}
    claimed = _parse_id(dub.get("watermark_id")) if isinstance(dub, dict) else None
    base = {"present": True, "valid": bool(c2pa.get("valid")), "watermark_id": _hex(claimed)}
    if claimed is None:
        agreement = "credentials_without_id" if not job_ids else "disagree"
    elif not job_ids:
        agreement = "mark_missing"  # the credentials name a mark the picture does not carry (now)
    elif job_ids == [claimed] and status == MARKED:
        agreement = "agree"
    else:
        agreement = "disagree"
    return {**base, "agreement": agreement}


def _attribution(status: str, job_ids: list[int], copies: dict[str, Any], creds: dict[str, Any]) -> dict[str, Any]:
    """Which job made this, claimed only on two agreeing pieces of evidence."""
    none: dict[str, Any] = {"claimed": False, "job_id_hex": None, "job": None, "basis": None}
    if status != MARKED or len(job_ids) != 1:
        reason = {
            COPIED: "the mark was copied onto footage that is not the job's output",
            TAMPERED: "the mark was tampered with",
            AI_MARKER: "no job id could be read",
            NOT_FOUND: "no mark",
        }.get(status, "more than one job id (a splice): see the segments")
        return {**none, "reason": reason}
    job = job_ids[0]
    check = copies.get(_hex(job)) or {}
    if creds["present"]:
        if creds["agreement"] == "agree" and creds.get("valid"):
            return {"claimed": True, "job_id_hex": _hex(job), "job": check.get("job"),
                    "basis": "mark and valid credentials agree"}
        return {**none, "reason": f"the mark and the credentials do not agree ({creds['agreement']}"
                f"{'' if creds.get('valid') else ', credentials invalid'})"}
    if check.get("match") is True:
        return {"claimed": True, "job_id_hex": _hex(job), "job": check.get("job"),
                "basis": "mark, and the picture matches the job's recorded fingerprint"}
    return {**none, "reason": check.get("reason") or "the picture could not be matched to the job's output"}
