"""The routes of the HTTP API: ``/api/v1/jobs…``, ``/api/v1/sync``, ``/healthz``, ``/readyz``, ``/metrics``.

The option form fields are made from :class:`~latentdub.options.DubOptions` (names and
descriptions), so the API, the library and the CLI share one schema. Values arrive as text and
are validated by ``DubOptions`` itself; an error names the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from latentdub.errors import InputError
from latentdub.options import DubOptions
from latentdub.service import schemas
from latentdub.service.store import Conflict, JobStore, request_hash
from latentdub.service.uploads import remove_assets, save_upload

CONSENT_HELP = (
    "The consent record of the person in the video, as a JSON object in text: subject, granted_by, "
    "method and evidence are required (id, granted_at, scope, expires_at optional)."
)
SYNC_POLL_S = 0.25


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None, job_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.job_id = job_id
        self.headers = headers
        super().__init__(message)


def _with_option_fields(func: Any) -> Any:
    """Add one optional form field per DubOptions field to ``func``'s signature (for FastAPI)."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name, info in DubOptions.model_fields.items():
        default = info.default
        desc = f"{info.description or ''} Default: {json.dumps(default)}."
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[str | None, Form(description=desc)],
            )
        )
    func.__signature__ = sig.replace(parameters=params)
    return func


# -- helpers ------------------------------------------------------------------------------------
def _state(request: Request) -> tuple[JobStore, Any, Any]:
    state = request.app.state
    return state.store, state.runner, state.settings


def _key_id(request: Request) -> str | None:
    key = getattr(request.state, "api_key", None)
    return None if key is None else key.id


def _parse_consent(text: str | None) -> dict[str, Any]:
    from latentdub.provenance.consent import REQUIRED, ConsentError, parse_consent

    if text is None or not text.strip():
        raise ApiError(
            422, "consent_required",
            f"consent is required: a JSON object with {', '.join(REQUIRED)} "
            f"(consent record is missing: {', '.join(REQUIRED)})",
            field="consent",
        )
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ApiError(422, "invalid_consent", f"consent is not valid JSON ({err.msg})", field="consent") from None
    if not isinstance(data, dict):
        raise ApiError(
            422, "invalid_consent", f"consent must be a JSON object with {', '.join(REQUIRED)}", field="consent"
        )
    try:
        return parse_consent(data).to_dict()  # a mapping: never read as a server file path
    except ConsentError as err:
        raise ApiError(422, "invalid_consent", str(err), field="consent") from None


def _parse_options(raw: dict[str, str | None]) -> dict[str, Any]:
    from latentdub.options import OptionError

    given = {k: v.strip() for k, v in raw.items() if v is not None and v.strip() != ""}
    try:
        return DubOptions.from_dict(given).to_dict()
    except OptionError as err:
        raise ApiError(422, "invalid_option", str(err), field=err.field) from None


def _check_quota(request: Request, store: JobStore, settings: Any) -> None:
    key_id = _key_id(request)
    if key_id is None:
        return
    if settings.key_concurrency and store.count_active(key_id) >= settings.key_concurrency:
        raise ApiError(
            429, "concurrency_limit",
            f"this API key already has {settings.key_concurrency} job(s) queued or running; wait for one to end",
        )
    if settings.key_daily_quota:
        day = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if store.count_since(key_id, day) >= settings.key_daily_quota:
            raise ApiError(429, "daily_quota", f"this API key used its {settings.key_daily_quota} jobs for today")


async def _submit(
    request: Request,
    video: UploadFile | None,
    audio: UploadFile | None,
    consent: str | None,
    webhook_url: str | None,
    options: dict[str, str | None],
) -> tuple[Any, bool]:
    """Validate, store the uploads, create (or find, by idempotency key) the job and queue it."""
    from latentdub.service.webhooks import check_webhook_url

    store, runner, settings = _state(request)
    for name, upload in (("video", video), ("audio", audio)):
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_field", f"{name} is required: upload it as a multipart file field", field=name)
    consent_record = _parse_consent(consent)
    opts = _parse_options(options)
    hook = None
    if webhook_url is not None and webhook_url.strip():
        try:
            hook = check_webhook_url(webhook_url)
        except InputError as err:
            raise ApiError(422, "invalid_webhook_url", str(err), field="webhook_url") from None
    idem = request.headers.get("idempotency-key")
    if idem is not None and (not idem.strip() or len(idem.strip()) > 255):
        raise ApiError(422, "invalid_idempotency_key", "the Idempotency-Key header must be 1 to 255 characters")
    key_id = _key_id(request)
    if not idem:
        await anyio.to_thread.run_sync(_check_quota, request, store, settings)
    assets: list[Any] = []
    try:
        assets.append(await save_upload(video, "video", "video", settings, store.engine, key_id))
        assets.append(await save_upload(audio, "audio", "audio", settings, store.engine, key_id))
    except BaseException:
        await anyio.to_thread.run_sync(remove_assets, store.engine, [a.id for a in assets])
        raise
    body = {
        "options": opts,
        "consent": consent_record,
        "webhook_url": hook,
        "video_sha256": assets[0].sha256,
        "audio_sha256": assets[1].sha256,
    }

    def create() -> tuple[Any, bool]:
        if idem:
            _check_quota_unless_replay(request, store, settings, idem.strip())
        return store.create(
            options=opts, consent=consent_record, video_asset_id=assets[0].id, audio_asset_id=assets[1].id,
            webhook_url=hook, api_key_id=key_id, idempotency_key=idem, request_hash=request_hash(body),
        )

    try:
        job, created = await anyio.to_thread.run_sync(create)
    except BaseException:
        await anyio.to_thread.run_sync(remove_assets, store.engine, [a.id for a in assets])
        raise
    if not created:  # an idempotent repeat: the first request's files are the job's
        await anyio.to_thread.run_sync(remove_assets, store.engine, [a.id for a in assets])
    else:
        runner.submit(job.id)
    return job, created


def _check_quota_unless_replay(request: Request, store: JobStore, settings: Any, idem: str) -> None:
    from sqlalchemy import select

    from latentdub.service.db import read_session
    from latentdub.service.models import Job
    from latentdub.service.store import ANONYMOUS_SCOPE

    scope = _key_id(request) or ANONYMOUS_SCOPE
    with read_session(store.engine) as session:
        seen = session.scalar(select(Job.id).where(Job.idempotency_scope == scope, Job.idempotency_key == idem))
    if seen is None:
        _check_quota(request, store, settings)


async def _get_job(request: Request, job_id: str) -> Any:
    store, _, _ = _state(request)
    job = await anyio.to_thread.run_sync(store.get, job_id)  # JobNotFound → 404
    key_id = _key_id(request)
    if key_id is not None and job.api_key_id not in (None, key_id):
        from latentdub.service.store import JobNotFound

        raise JobNotFound(job_id)
    return job


def _result_file(job: Any) -> Path:
    if job.status != "succeeded":
        raise ApiError(409, "not_ready", f"job {job.id} is {job.status}; the result exists once it succeeded", job_id=job.id)
    path = Path(job.output_path or "")
    if not job.output_path or not path.is_file():
        raise ApiError(410, "result_gone", f"the result of job {job.id} is no longer on the server", job_id=job.id)
    return path


def _video_response(job: Any) -> FileResponse:
    return FileResponse(_result_file(job), media_type="video/mp4", filename=f"{job.id}.mp4")


# -- routes -------------------------------------------------------------------------------------
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (401, 404, 409, 413, 415, 422, 429)
}

api = APIRouter(prefix="/api/v1", responses=ERRORS)
probes = APIRouter()


@_with_option_fields
async def create_job(
    request: Request,
    video: Annotated[UploadFile | None, File(description="The video of the person speaking.")] = None,
    audio: Annotated[UploadFile | None, File(description="The new speech (any audio file, or a video with sound).")] = None,
    consent: Annotated[str | None, Form(description=CONSENT_HELP)] = None,
    webhook_url: Annotated[str | None, Form(description="Optional http(s) URL that gets a signed POST when the job ends.")] = None,
    **options: str | None,
) -> JSONResponse:
    """Submit a dub: 202 and the job. With ``Idempotency-Key``, a repeat returns the same job (200)."""
    job, created = await _submit(request, video, audio, consent, webhook_url, options)
    return JSONResponse(schemas.job_out(job), status_code=202 if created else 200)


api.add_api_route(
    "/jobs", create_job, methods=["POST"], status_code=202, response_model=schemas.JobOut,
    summary="Submit a dub job",
)


@_with_option_fields
async def sync_dub(
    request: Request,
    video: Annotated[UploadFile | None, File(description="The video of the person speaking.")] = None,
    audio: Annotated[UploadFile | None, File(description="The new speech.")] = None,
    consent: Annotated[str | None, Form(description=CONSENT_HELP)] = None,
    webhook_url: Annotated[str | None, Form(description="Optional webhook URL, as for /jobs.")] = None,
    timeout_s: Annotated[str | None, Form(description="Seconds to wait for the result (default: the server's sync_timeout_s).")] = None,
    **options: str | None,
) -> Response:
    """Dub and wait: 200 with the mp4, or 504 with the job id if it takes longer (the job goes on)."""
    limit = request.app.state.sync_timeout_s
    if timeout_s is not None and timeout_s.strip():
        try:
            limit = float(timeout_s)
        except ValueError:
            limit = float("nan")
        if not (0 < limit <= 24 * 3600):
            raise ApiError(422, "invalid_field", "timeout_s must be a number of seconds above 0", field="timeout_s")
    job, _ = await _submit(request, video, audio, consent, webhook_url, options)
    store, _, _ = _state(request)
    deadline = time.monotonic() + limit
    while True:
        job = await anyio.to_thread.run_sync(store.get, job.id)
        if job.is_final or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(SYNC_POLL_S, max(0.0, deadline - time.monotonic())))
    if job.status == "succeeded":
        response = _video_response(job)
        response.headers["X-Job-Id"] = job.id
        return response
    if job.status == "failed":
        status = 422 if job.error_code == "bad_input" else 500
        raise ApiError(status, job.error_code or "internal", job.error_message or "the dub failed", job_id=job.id)
    if job.status == "cancelled":
        raise ApiError(409, "cancelled", f"job {job.id} was cancelled", job_id=job.id)
    raise ApiError(
        504, "timeout",
        f"job {job.id} did not finish within {limit:g} s; it goes on: poll /api/v1/jobs/{job.id}",
        job_id=job.id,
    )


api.add_api_route(
    "/sync", sync_dub, methods=["POST"], summary="Dub and wait for the video",
    responses={200: {"content": {"video/mp4": {}}}, 504: {"model": schemas.ErrorResponse}},
)


@api.get("/jobs/{job_id}", response_model=schemas.JobOut, summary="A job's status, progress and result")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return schemas.job_out(await _get_job(request, job_id))


@api.get("/jobs", response_model=schemas.JobPage, summary="List jobs, newest first")
async def list_jobs(
    request: Request,
    status: Annotated[str | None, Query(description="queued, running, succeeded, failed or cancelled")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    store, _, _ = _state(request)
    key_id = _key_id(request)
    jobs, nxt = await anyio.to_thread.run_sync(
        lambda: store.list(status=status or None, limit=limit, cursor=cursor, api_key_id=key_id)
    )
    return {"jobs": [schemas.job_out(j) for j in jobs], "next_cursor": nxt}


@api.get(
    "/jobs/{job_id}/result", summary="The dubbed video (HTTP Range supported)",
    responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "Partial content"}},
)
async def get_result(request: Request, job_id: str) -> FileResponse:
    return _video_response(await _get_job(request, job_id))


@api.post("/jobs/{job_id}/cancel", response_model=schemas.JobOut, summary="Cancel a job")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    job = await _get_job(request, job_id)
    _, runner, _ = _state(request)
    job = await anyio.to_thread.run_sync(runner.cancel, job.id)
    return schemas.job_out(job)


@api.delete("/jobs/{job_id}", summary="Delete a finished or queued job and its files")
async def delete_job(request: Request, job_id: str) -> dict[str, Any]:
    job = await _get_job(request, job_id)
    store, runner, _ = _state(request)
    if job.status == "queued":
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(runner.cancel, job.id)
    if job.status == "running":
        raise ApiError(409, "running", f"job {job.id} is running; cancel it first", job_id=job.id)
    job = await anyio.to_thread.run_sync(store.delete, job.id)  # InvalidTransition (running) → 409
    if job.output_path:
        with contextlib.suppress(OSError):
            Path(job.output_path).unlink(missing_ok=True)
    await anyio.to_thread.run_sync(remove_assets, store.engine, [job.video_asset_id, job.audio_asset_id])
    return {"id": job.id, "deleted": True}


@probes.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", response_model=schemas.Readiness, summary="Readiness: weights loaded, worker alive")
async def readyz(request: Request) -> JSONResponse:
    info = request.app.state.runner.ready()
    return JSONResponse(info, status_code=200 if info["ready"] else 503)


@probes.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    store, runner, _ = _state(request)
    text = await anyio.to_thread.run_sync(render_metrics, store, runner)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def render_metrics(store: JobStore, runner: Any) -> str:
    counts = store.counts_by_status()
    lines = ["# HELP latentdub_jobs Jobs in the database by status.", "# TYPE latentdub_jobs gauge"]
    lines += [f'latentdub_jobs{{status="{s}"}} {n}' for s, n in counts.items()]
    lines += [
        "# HELP latentdub_queue_depth Jobs waiting for the worker.",
        "# TYPE latentdub_queue_depth gauge",
        f"latentdub_queue_depth {runner.queue_depth()}",
    ]
    done, _ = store.list(status="succeeded", limit=500)
    wall = video_s = frames = 0.0
    for job in done:
        result = job.result or {}
        if job.started_at is None or job.finished_at is None or not result.get("duration_s"):
            continue
        wall += (job.finished_at - job.started_at).total_seconds()
        video_s += float(result.get("duration_s") or 0.0)
        frames += float(result.get("frames") or 0)
    lines += [
        "# HELP latentdub_seconds_per_video_second Wall seconds per second of output video (last 500 jobs).",
        "# TYPE latentdub_seconds_per_video_second gauge",
        f"latentdub_seconds_per_video_second {wall / video_s if video_s else 'NaN'}",
        "# HELP latentdub_frames_per_second Output frames per wall second (last 500 jobs).",
        "# TYPE latentdub_frames_per_second gauge",
        f"latentdub_frames_per_second {frames / wall if wall else 'NaN'}",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["ApiError", "Conflict", "api", "probes"]
