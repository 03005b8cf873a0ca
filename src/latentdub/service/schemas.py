"""Response shapes of the HTTP API (for the OpenAPI document at ``/docs``)."""

from __future__ import annotations

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
    result: dict[str, Any] | None = Field(None, description="The dub's summary (frames, face / pass-through report, timings).")
    result_url: str | None = Field(None, description="Where the result video is, once the job succeeded.")


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class Readiness(BaseModel):
    ready: bool
    weights_loaded: bool
    worker_alive: bool
    reasons: list[str]


def job_out(job: Any) -> dict[str, Any]:
    """The JSON of a job (the store's dict plus the result's URL)."""
    data = job.to_dict()
    data["result_url"] = f"/api/v1/jobs/{job.id}/result" if job.status == "succeeded" else None
    return data


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    return body
