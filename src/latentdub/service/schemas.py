"""Response shapes of the HTTP API (for the OpenAPI document at ``/docs``)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code, e.g. invalid_option, consent_required.")
    message: str = Field(description="A human explanation that names the field at fault.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")


class ErrorResponse(BaseModel):
    """Every error of every route has this shape."""

    error: ErrorBody
    job_id: str | None = Field(None, description="The job concerned (e.g. /sync timing out).")


class JobOut(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    progress: float = Field(description="Overall progress 0..1, from the engine's progress events.")
    stage: str | None = Field(None, description="Current engine stage (read, fit, faces, audio_features, dub, finalize).")
    eta_s: float | None = Field(None, description="Estimated seconds left in the current stage.")
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorBody | None = Field(None, description="On failure: the error code and message.")
    result: dict[str, Any] | None = Field(
        None, description="The dub's summary (frames, face / pass-through report, timings, model, provenance); "
        "never a server path.",
    )
    result_url: str | None = Field(None, description="Where the result video is, once the job succeeded.")
    expires_at: str | None = Field(None, description="When the result file is removed (the job stays); null: no result or kept forever.")
    expired_at: str | None = Field(None, description="When the result file was removed (GET …/result: 410 result_expired).")


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class Readiness(BaseModel):
    ready: bool
    weights_loaded: bool
    worker_alive: bool
    reasons: list[str]


def job_out(job: Any, retention_s: float = 0.0) -> dict[str, Any]:
    """The JSON of a job (the store's dict plus the result's URL and its expiry: ``expires_at``,
    when the result file goes, ``retention_s`` after the job's end; ``expired_at`` once it went)."""
    data = job.to_dict()
    expired = getattr(job, "expired_at", None)
    data["result_url"] = f"/api/v1/jobs/{job.id}/result" if job.status == "succeeded" and expired is None else None
    ends = None
    if expired is None and retention_s > 0 and job.finished_at is not None and getattr(job, "output_path", None):
        ends = job.finished_at + dt.timedelta(seconds=retention_s)
    data["expires_at"] = iso(expired or ends)
    data["expired_at"] = iso(expired)
    return data


def iso(value: dt.datetime | None) -> str | None:
    """A UTC time as the API writes it (``…Z``)."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


# -- what a client sees of a job ------------------------------------------------------------------
# A dub's result (pipeline.DubResult.to_dict) as the job JSON and its webhook show it: an
# allow-list, so a field added to the result later stays private until it is named here. Left
# out: ``output`` (the server's file; clients use result_url), the model's ``source`` (a server
# folder), the audit entry's ``log`` and ``supersedes.chain`` (server files). A name maps to None
# (the value as it is: numbers, labels, time ranges) or to the allow-list of its own fields.
Spec = Mapping[str, "Spec | None"]
RESULT_SPEC: Spec = {
    "frames": None, "dubbed_frames": None, "fps": None, "duration_s": None, "audio_duration_s": None,
    "width": None, "height": None, "passthrough_ranges": None, "timings": None, "fit": None, "encoder": None,
    "tracks": None, "silence": None, "speakers": None, "occlusion": None,
    "model": {"name": None, "version": None, "resolution": None, "random_weights": None, "device": None,
              "dtype": None},
    "provenance": {
        "job_id": None, "consent_id": None,
        "watermark": {"on": None, "id": None},
        "inputs": {"video_sha256": None, "audio_sha256": None},
        "c2pa": {"signed": None, "issuer": None, "signer": None, "alg": None, "manifest_label": None,
                 "trusted": None, "sign_s": None},
        "audit": {"seq": None, "hash": None, "supersedes": {"seq": None, "hash": None, "output_sha256": None}},
    },
}
# An absolute POSIX or Windows path inside free text (a warning, an error message).
_PATH_IN_TEXT = re.compile(r"(?<![\w.:/~-])(?:/|[A-Za-z]:\\)[^\s'\"(),;]+")


def _pick(value: Any, spec: Spec | None) -> Any:
    if spec is None or not isinstance(value, Mapping):
        return value if spec is None else None
    return {name: _pick(value[name], sub) for name, sub in spec.items() if name in value}


def public_text(text: str | None) -> str | None:
    """``text`` with every absolute path in it replaced by ``<server path>``."""
    return None if text is None else _PATH_IN_TEXT.sub("<server path>", text)


def public_result(result: Mapping[str, Any] | None, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The allow-listed view of a job's ``result`` (see :data:`RESULT_SPEC`).

    ``options``: the options the dub ran with (``auto`` preset made concrete), but the segments as
    the job stored them (audio asset ids, not the files the worker put in their place); the
    warnings with any path taken out.
    """
    if result is None:
        return None
    out: dict[str, Any] = _pick(result, RESULT_SPEC)
    if isinstance(result.get("options"), Mapping):
        out["options"] = {**result["options"], "segments": (options or {}).get("segments")}
    out["warnings"] = [public_text(str(w)) for w in result.get("warnings") or ()]
    return out


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    return body
