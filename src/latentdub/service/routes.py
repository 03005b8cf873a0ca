"""The routes of the HTTP API: ``/api/v1/jobs…``, ``/api/v1/sync``, ``/healthz``, ``/readyz``, ``/metrics``.

The option form fields are made from the app's options model (``settings.options_model``,
:class:`~latentdub.options.DubOptions` by default: names and descriptions), so the API, the
library and the CLI share one schema. Values arrive as text and are turned into options once,
by :func:`parse_options`; an error names the field. A form field that is neither one of the
route's fields nor an option is refused (422 ``unknown_field``), not dropped; JSON text (consent,
segments) is bounded in size and nesting before it is parsed; a face point (``X,Y@T``) must lie
in the video's picture and length. Routes get the store, the runner, the
settings and the caller's key from :mod:`.deps`; jobs and assets change only through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, File, Form, Header, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from latentdub.errors import InputError
from latentdub.options import DubOptions, OptionError
from latentdub.service import schemas
from latentdub.service.analysis import AnalysisRefused, AnalyzerDep, remove_cached
from latentdub.service.auth import watermark_opt_out_refusal
from latentdub.service.deps import (
    FormFieldsDep,
    JobDep,
    KeyIdDep,
    RunnerDep,
    SettingsDep,
    StoreDep,
    SyncTimeoutDep,
    visible_to,
)
from latentdub.service.jobs import SegmentAssetError, check_segment_assets
from latentdub.service.models import Asset, Job
from latentdub.service.runner import Runner
from latentdub.service.settings import ServiceSettings
from latentdub.service.storage import asset_json, storage_bytes
from latentdub.service.store import (
    AssetGone,
    AssetInUse,
    AssetNotFound,
    Conflict,
    JobStore,
    KeyLimits,
    LimitReached,
    request_hash,
)
from latentdub.service.uploads import save_upload

# JSON given as form text (consent, segments): json.loads recurses once per nesting level, so
# text nested 100,000 deep would raise RecursionError; its size and depth are checked first.
MAX_JSON_TEXT = 256 * 1024
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")
# The form fields of POST /jobs and /sync besides the options (sync also takes timeout_s).
SUBMIT_FIELDS = ("video", "audio", "consent", "webhook_url", "video_asset_id", "audio_asset_id")

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


def option_form(options_model: type[DubOptions]) -> Callable[..., dict[str, str | None]]:
    """A dependency that reads one optional form field per field of ``options_model``, as text.

    Its signature is made from the model (names, descriptions, defaults), so the OpenAPI form of
    ``/jobs`` and ``/sync`` lists every option; the values are checked later by
    :func:`parse_options`, after the media and consent fields, as the API always did.
    """

    def options_form(**raw: str | None) -> dict[str, str | None]:
        return raw

    params = []
    for name, info in options_model.model_fields.items():
        desc = f"{info.description or ''} Default: {json.dumps(info.default)}."
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[str | None, Form(description=desc)],
            )
        )
    options_form.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return options_form


def parse_options(options_model: type[DubOptions], raw: Mapping[str, str | None]) -> DubOptions:
    """The one place the service turns client input into options; a bad value is a 422 naming it."""
    given = {k: v.strip() for k, v in raw.items() if v is not None and v.strip() != ""}
    for name, text in given.items():  # segments are JSON text: bounded before they are parsed
        check_json_text(text, name, "invalid_option")
    try:
        return options_model.from_dict(given)
    except OptionError as err:
        raise ApiError(422, "invalid_option", str(err), field=err.field) from None


# -- helpers ------------------------------------------------------------------------------------
def _json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest, counted without parsing it."""
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def check_json_text(text: str, field: str, code: str) -> None:
    """A 422 ``code`` naming ``field`` if its text is too long or nests too deep to parse safely."""
    if len(text) > MAX_JSON_TEXT:
        raise ApiError(422, code, f"{field} is too long: {len(text)} characters, at most {MAX_JSON_TEXT}", field=field)
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ApiError(422, code, f"{field} nests more than {MAX_JSON_DEPTH} levels of arrays or objects", field=field)


def _check_form_fields(given: tuple[str, ...], allowed: set[str], options_model: type[DubOptions]) -> None:
    """A field the form does not have is refused, not dropped: ``stepz=5`` would otherwise dub
    with the default steps, and the caller would never know."""
    for name in given:
        if name not in allowed:
            raise ApiError(
                422, "unknown_field",
                f"{name} is not a field of this request; the options are: {', '.join(options_model.model_fields)}; "
                f"the other fields: {', '.join(sorted(allowed - set(options_model.model_fields)))}",
                field=name,
            )


def _check_face_points(options: DubOptions, video: Path) -> None:
    """A face given as X,Y@T (``face``, a segment's ``face``) must point into the video's picture
    at a time within it; otherwise the job would be queued and fail only after the face analysis."""
    from latentdub.face.selection import parse_policy
    from latentdub.media.reader import probe_video

    given = [("face", "face", getattr(options, "face", None))]
    given += [("segments", f"segments: {seg.label(i)}: face", seg.face)
              for i, seg in enumerate(getattr(options, "segments", None) or ())]
    points = [(field, label, pol) for field, label, text in given
              if isinstance(text, str) and (pol := parse_policy(text)).kind == "point"]
    if not points:
        return
    try:
        info = probe_video(video)  # the header and one frame: stored uploads were sniffed already
    except InputError:
        raise ApiError(422, "bad_video", "video: the stored video can no longer be read", field="video") from None
    for field, label, pol in points:
        if not (0 <= pol.x < info.width and 0 <= pol.y < info.height):
            raise ApiError(
                422, "invalid_option",
                f"{label}: the point {pol.x:g},{pol.y:g} is outside the {info.width}x{info.height} video; "
                f"X must be from 0 to {info.width - 1} and Y from 0 to {info.height - 1} (pixels)",
                field=field,
            )
        if not 0 <= pol.t < info.duration_s:
            raise ApiError(
                422, "invalid_option",
                f"{label}: the time {pol.t:g} s is not within the {info.duration_s:.2f} s video; "
                f"T must be from 0 to under {info.duration_s:.2f} (seconds)",
                field=field,
            )


def _parse_consent(text: str | None) -> dict[str, Any]:
    from latentdub.provenance.consent import REQUIRED, ConsentError, parse_consent

    if text is None or not text.strip():
        raise ApiError(
            422, "consent_required",
            f"consent is required: a JSON object with {', '.join(REQUIRED)} "
            f"(consent record is missing: {', '.join(REQUIRED)})",
            field="consent",
        )
    check_json_text(text, "consent", "invalid_consent")
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


def _check_quota(store: JobStore, settings: ServiceSettings, key_id: str | None) -> None:
    """An early 429 before uploads are stored; the store decides again when it creates the job."""
    try:
        store.check_limits(key_id, KeyLimits(settings.key_concurrency, settings.key_daily_quota))
    except LimitReached as err:
        raise ApiError(429, err.code, str(err)) from None


def _lookup_asset(store: JobStore, asset_id: str, field: str, kind: str, key_id: str | None) -> Asset:
    """The stored asset ``asset_id`` of this key: 404 if unknown or another key's, 422 if the wrong kind."""
    asset = store.get_asset(asset_id)
    if asset is None or not visible_to(key_id, asset.api_key_id) or not Path(asset.path).is_file():
        raise ApiError(404, "asset_not_found", f"{field}: no {kind} asset with id {asset_id!r}", field=field)
    if asset.kind != kind:
        raise ApiError(
            422, "wrong_asset_kind", f"{field}: asset {asset_id} is a {asset.kind} asset, not a {kind} asset",
            field=field,
        )
    return asset


def _one_source(name: str, upload: Any, asset_id: str | None) -> tuple[Any, str | None]:
    """Exactly one of the file field ``name`` and the form field ``name_asset_id``."""
    has_file = upload is not None and not isinstance(upload, str)
    asset_id = asset_id.strip() if isinstance(asset_id, str) and asset_id.strip() else None
    if has_file and asset_id is not None:
        raise ApiError(
            422, "ambiguous_field",
            f"{name}: give either the {name} file or {name}_asset_id, not both", field=f"{name}_asset_id",
        )
    if not has_file and asset_id is None:
        raise ApiError(
            422, "missing_field",
            f"{name} is required: upload it as a multipart file field, or give {name}_asset_id "
            "(the id of an asset uploaded to /api/v1/assets)",
            field=name,
        )
    return (upload if has_file else None), asset_id


@dataclass
class Submission:
    """One job request as the form gave it (the text of every field, files still unread)."""

    video: UploadFile | None
    audio: UploadFile | None
    consent: str | None
    webhook_url: str | None
    options: dict[str, str | None]
    video_asset_id: str | None = None
    audio_asset_id: str | None = None
    idempotency_key: str | None = None
    given_fields: tuple[str, ...] = ()  # the names of every form field the request sent
    route_fields: tuple[str, ...] = ()  # the route's own fields besides SUBMIT_FIELDS and the options


async def _submit(
    sub: Submission, *, store: JobStore, runner: Runner, settings: ServiceSettings, key_id: str | None
) -> tuple[Job, bool]:
    """Validate, store the uploads, create (or find, by idempotency key) the job and queue it."""
    from latentdub.service.webhooks import check_webhook_target, check_webhook_url

    allowed = {*SUBMIT_FIELDS, *sub.route_fields, *settings.options_model.model_fields}
    _check_form_fields(sub.given_fields, allowed, settings.options_model)
    sources = {
        "video": _one_source("video", sub.video, sub.video_asset_id),
        "audio": _one_source("audio", sub.audio, sub.audio_asset_id),
    }
    consent_record = _parse_consent(sub.consent)
    parsed = parse_options(settings.options_model, sub.options)
    if not getattr(parsed, "watermark", True):  # a permission, checked before any upload is stored
        refusal = await anyio.to_thread.run_sync(
            lambda: watermark_opt_out_refusal(store.engine, key_id, server_allows=settings.allow_no_watermark)
        )
        if refusal is not None:
            raise ApiError(403, "watermark_required", refusal, field="watermark")
    opts = parsed.to_dict()
    hook = None
    if sub.webhook_url is not None and sub.webhook_url.strip():
        try:
            hook = check_webhook_url(sub.webhook_url)
            if not settings.allow_private_webhooks:
                await anyio.to_thread.run_sync(check_webhook_target, hook)
        except InputError as err:
            raise ApiError(422, "invalid_webhook_url", str(err), field="webhook_url") from None
    idem = sub.idempotency_key
    if idem is not None and (not idem.strip() or len(idem.strip()) > 255):
        raise ApiError(422, "invalid_idempotency_key", "the Idempotency-Key header must be 1 to 255 characters")
    assets: dict[str, Asset] = {}
    try:  # a segment's audio: an audio asset of this key, never a server path
        await anyio.to_thread.run_sync(check_segment_assets, store, parsed, key_id)
    except SegmentAssetError as err:
        raise ApiError(err.status, err.code, str(err), field=err.field) from None
    for name, (_, asset_id) in sources.items():  # ids first: a bad id costs no upload
        if asset_id is not None:
            assets[name] = await anyio.to_thread.run_sync(_lookup_asset, store, asset_id, f"{name}_asset_id", name, key_id)
    if not idem:
        await anyio.to_thread.run_sync(_check_quota, store, settings, key_id)
    fresh: list[str | None] = []  # uploaded by this request: removed again if it does not make a job
    try:
        for name, (upload, _) in sources.items():
            if upload is not None:
                assets[name] = await save_upload(upload, name, name, settings, store, key_id)
                fresh.append(assets[name].id)
        # Only now is the video's size and length known (an upload's or a stored asset's).
        await anyio.to_thread.run_sync(_check_face_points, parsed, Path(assets["video"].path))
    except BaseException:
        await anyio.to_thread.run_sync(store.remove_assets, fresh)
        raise
    body = {
        "options": opts,
        "consent": consent_record,
        "webhook_url": hook,
        "video_sha256": assets["video"].sha256,
        "audio_sha256": assets["audio"].sha256,
    }

    def create() -> tuple[Job, bool]:
        try:  # limits counted and job inserted in one locked transaction; a replay is no new job
            return store.create(
                options=opts, consent=consent_record, video_asset_id=assets["video"].id,
                audio_asset_id=assets["audio"].id, webhook_url=hook, api_key_id=key_id, idempotency_key=idem,
                request_hash=request_hash(body),
                limits=KeyLimits(settings.key_concurrency, settings.key_daily_quota),
            )
        except LimitReached as err:
            raise ApiError(429, err.code, str(err)) from None
        except AssetGone as err:  # swept or deleted since it was looked up
            raise ApiError(404, "asset_not_found", str(err), field=f"{err.kind}_asset_id") from None

    try:
        job, created = await anyio.to_thread.run_sync(create)
    except BaseException:
        await anyio.to_thread.run_sync(store.remove_assets, fresh)
        raise
    if not created:  # an idempotent repeat: the first request's files are the job's
        await anyio.to_thread.run_sync(store.remove_assets, fresh)
    else:  # the in-process runner records the dispatch, the Celery one hands it to its outbox: both block
        await anyio.to_thread.run_sync(runner.submit, job.id)
    return job, created


def _result_file(job: Job) -> Path:
    if job.status != "succeeded":
        raise ApiError(409, "not_ready", f"job {job.id} is {job.status}; the result exists once it succeeded", job_id=job.id)
    if job.expired_at is not None:
        raise ApiError(
            410, "result_expired",
            f"the result of job {job.id} expired at {schemas.iso(job.expired_at)} (results are kept for a "
            "limited time after their job ends)", job_id=job.id,
        )
    path = Path(job.output_path or "")
    if not job.output_path or not path.is_file():
        raise ApiError(410, "result_gone", f"the result of job {job.id} is no longer on the server", job_id=job.id)
    return path


_RANGE_SPEC = re.compile(r"(\d*)-(\d*)")


def _byte_ranges(header: str) -> list[tuple[str, str]] | None:
    """The (first, last) texts of a ``Range: bytes=…`` header, or None if it is not valid (RFC 9110
    §14.1.1: another unit, a spec that is not ``A-B``, ``A-`` or ``-N``, or ``B`` before ``A``)."""
    unit, eq, specs = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    out = []
    for part in specs.split(","):
        part = part.strip(" \t")
        if not part:  # empty list elements are allowed (RFC 9110 §5.6.1)
            continue
        match = _RANGE_SPEC.fullmatch(part)
        if match is None or not any(match.groups()):
            return None
        first, last = match.groups()
        if first and last and int(last) < int(first):
            return None
        out.append((first, last))
    return out or None


def _satisfiable(spec: tuple[str, str], size: int) -> bool:
    first, last = spec
    return int(first) < size if first else int(last) > 0 and size > 0


class ResultFileResponse(FileResponse):
    """A file with HTTP Range as RFC 9110 says: an invalid ``Range`` header is ignored (200 and the
    whole file, where Starlette answers 400 in text); one that no byte of the file satisfies is a
    JSON 416 with ``Content-Range: bytes */SIZE``; unsatisfiable parts of a list are left out."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = Headers(scope=scope).get("range")
        if header is not None:
            size = (await anyio.to_thread.run_sync(os.stat, self.path)).st_size
            specs = _byte_ranges(header)
            kept = [(a, b) for a, b in specs or () if _satisfiable((a, b), size)]
            if specs is not None and not kept:
                response = JSONResponse(
                    schemas.error_body(
                        "range_not_satisfiable",
                        f"the Range header asks for no byte of the result, which has {size} bytes "
                        f"(bytes 0-{max(size - 1, 0)})",
                    ),
                    status_code=416, headers={"Content-Range": f"bytes */{size}"},
                )
                await response(scope, receive, send)
                return
            others = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
            if kept:
                others.append((b"range", ("bytes=" + ",".join(f"{a}-{b}" for a, b in kept)).encode("latin-1")))
            scope = {**scope, "headers": others}
        await super().__call__(scope, receive, send)


def _video_response(job: Job) -> FileResponse:
    return ResultFileResponse(_result_file(job), media_type="video/mp4", filename=f"{job.id}.mp4")


# -- routes -------------------------------------------------------------------------------------
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (401, 403, 404, 409, 410, 413, 415, 416, 422, 429)
}

api = APIRouter(prefix="/api/v1", responses=ERRORS)
probes = APIRouter()

VideoFile = Annotated[UploadFile | None, File(description="The video of the person speaking.")]
ConsentForm = Annotated[str | None, Form(description=CONSENT_HELP)]
VideoAssetForm = Annotated[
    str | None, Form(description="Instead of the video file: the id of a video asset uploaded to /api/v1/assets.")
]
AudioAssetForm = Annotated[
    str | None, Form(description="Instead of the audio file: the id of an audio asset uploaded to /api/v1/assets.")
]
IdempotencyHeader = Annotated[
    str | None, Header(description="Repeat a request safely: the same key and body return the same job.")
]


def submit_router(options_model: type[DubOptions]) -> APIRouter:
    """``POST /jobs`` and ``POST /sync``, with one form field per field of ``options_model``."""
    router = APIRouter(prefix="/api/v1", responses=ERRORS)
    # A default, not an Annotated alias: annotations are strings here (PEP 563) and a local
    # alias could not be resolved from them.
    option_fields = Depends(option_form(options_model))

    @router.post("/jobs", status_code=202, response_model=schemas.JobOut, summary="Submit a dub job")
    async def create_job(
        store: StoreDep, runner: RunnerDep, settings: SettingsDep, key_id: KeyIdDep, given_fields: FormFieldsDep,
        video: VideoFile = None,
        audio: Annotated[UploadFile | None, File(description="The new speech (any audio file, or a video with sound).")] = None,
        consent: ConsentForm = None,
        webhook_url: Annotated[str | None, Form(description="Optional http(s) URL that gets a signed POST when the job ends.")] = None,
        video_asset_id: VideoAssetForm = None,
        audio_asset_id: AudioAssetForm = None,
        idempotency_key: IdempotencyHeader = None,
        options: dict[str, str | None] = option_fields,
    ) -> JSONResponse:
        """Submit a dub: 202 and the job. With ``Idempotency-Key``, a repeat returns the same job (200)."""
        sub = Submission(video, audio, consent, webhook_url, options, video_asset_id, audio_asset_id, idempotency_key,
                         given_fields)
        job, created = await _submit(sub, store=store, runner=runner, settings=settings, key_id=key_id)
        return JSONResponse(schemas.job_out(job, settings.retention_s), status_code=202 if created else 200)

    @router.post(
        "/sync", summary="Dub and wait for the video",
        responses={200: {"content": {"video/mp4": {}}}, 504: {"model": schemas.ErrorResponse}},
    )
    async def sync_dub(
        store: StoreDep, runner: RunnerDep, settings: SettingsDep, key_id: KeyIdDep, given_fields: FormFieldsDep,
        default_timeout_s: SyncTimeoutDep,
        video: VideoFile = None,
        audio: Annotated[UploadFile | None, File(description="The new speech.")] = None,
        consent: ConsentForm = None,
        webhook_url: Annotated[str | None, Form(description="Optional webhook URL, as for /jobs.")] = None,
        video_asset_id: VideoAssetForm = None,
        audio_asset_id: AudioAssetForm = None,
        timeout_s: Annotated[str | None, Form(description="Seconds to wait for the result (default: the server's sync_timeout_s).")] = None,
        idempotency_key: IdempotencyHeader = None,
        options: dict[str, str | None] = option_fields,
    ) -> Response:
        """Dub and wait: 200 with the mp4, or 504 with the job id if it takes longer (the job goes on)."""
        limit = _sync_limit(timeout_s, default_timeout_s)
        sub = Submission(video, audio, consent, webhook_url, options, video_asset_id, audio_asset_id, idempotency_key,
                         given_fields, route_fields=("timeout_s",))
        job, _ = await _submit(sub, store=store, runner=runner, settings=settings, key_id=key_id)
        return await _wait_for_video(store, job, limit)

    return router


def _sync_limit(text: str | None, default: float) -> float:
    if text is None or not text.strip():
        return default
    try:
        limit = float(text)
    except ValueError:
        limit = float("nan")
    if not (0 < limit <= 24 * 3600):
        raise ApiError(422, "invalid_field", "timeout_s must be a number of seconds above 0", field="timeout_s")
    return limit


async def _wait_for_video(store: JobStore, job: Job, limit: float) -> Response:
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


class AssetOut(BaseModel):
    """An uploaded asset."""

    id: str
    kind: str = Field(description="video | audio")
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")
    bytes: int
    created_at: str
    expires_at: str | None = Field(
        None, description="When the asset is removed (kept longer while a queued or running job uses it); "
        "null: never."
    )


class AssetPage(BaseModel):
    assets: list[AssetOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class StorageOut(BaseModel):
    bytes: int = Field(description="Bytes stored: assets plus results.")
    limit_bytes: int = Field(description="The key's storage limit (key_storage_bytes); 0: none.")
    assets: int
    asset_bytes: int
    results: int
    result_bytes: int


class UsageOut(BaseModel):
    """What the caller's key uses (with auth off: everything stored; no daily count)."""

    storage: StorageOut
    jobs_today: int = Field(description="Jobs submitted this UTC day (deleted ones included).")
    daily_quota: int = Field(description="Jobs allowed per UTC day; 0: no limit.")


@api.post("/assets", status_code=201, response_model=AssetOut, summary="Upload a video or audio for later jobs")
async def create_asset(
    store: StoreDep,
    settings: SettingsDep,
    key_id: KeyIdDep,
    file: Annotated[UploadFile | None, File(description="The media file (content is sniffed; the name is ignored).")] = None,
    kind: Annotated[str | None, Form(description="video or audio: what the asset will be used as.")] = None,
) -> JSONResponse:
    """Upload a video or audio once; jobs then name it with ``video_asset_id`` / ``audio_asset_id``."""
    kind = (kind or "").strip()
    if kind not in ("video", "audio"):
        raise ApiError(422, "invalid_field", "kind is required: video or audio", field="kind")
    if file is None or isinstance(file, str):
        raise ApiError(422, "missing_field", "file is required: upload it as a multipart file field", field="file")
    asset = await save_upload(file, "file", kind, settings, store, key_id)  # 413 storage_quota past the limit
    return JSONResponse(asset_json(asset, settings), status_code=201)


def _own_asset(store: JobStore, asset_id: str, key_id: str | None) -> Asset:
    """The asset of this key (any with auth off); another key's or an owner-less one is a 404."""
    asset = store.get_asset(asset_id)
    if asset is None or not visible_to(key_id, asset.api_key_id):
        raise ApiError(404, "asset_not_found", f"no asset with id {asset_id!r}")
    return asset


@api.get("/assets", response_model=AssetPage, summary="List this key's assets, newest first")
async def list_assets(
    store: StoreDep,
    settings: SettingsDep,
    key_id: KeyIdDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    assets, nxt = await anyio.to_thread.run_sync(lambda: store.list_assets(key_id, limit=limit, cursor=cursor))
    return {"assets": [asset_json(a, settings) for a in assets], "next_cursor": nxt}


@api.get("/assets/{asset_id}", response_model=AssetOut, summary="One asset")
async def get_asset(asset_id: str, store: StoreDep, settings: SettingsDep, key_id: KeyIdDep) -> dict[str, Any]:
    return asset_json(await anyio.to_thread.run_sync(_own_asset, store, asset_id, key_id), settings)


@api.delete("/assets/{asset_id}", summary="Delete an asset: its file and cached analysis (409 while a job uses it)")
async def delete_asset(asset_id: str, store: StoreDep, settings: SettingsDep, key_id: KeyIdDep) -> dict[str, Any]:
    def delete() -> None:
        _own_asset(store, asset_id, key_id)
        try:
            store.delete_asset(asset_id)
        except AssetNotFound:  # deleted meanwhile
            raise ApiError(404, "asset_not_found", f"no asset with id {asset_id!r}") from None
        except AssetInUse as err:
            raise ApiError(409, "asset_in_use", str(err), job_id=err.job_id) from None
        remove_cached(settings, asset_id)

    await anyio.to_thread.run_sync(delete)
    return {"id": asset_id, "deleted": True}


@api.get("/usage", response_model=UsageOut, summary="This key's stored bytes and jobs today, with its limits")
async def usage(store: StoreDep, settings: SettingsDep, key_id: KeyIdDep) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        stored = store.storage_usage(key_id)
        return {
            "storage": {
                "bytes": stored.bytes, "limit_bytes": settings.key_storage_bytes if key_id else 0,
                "assets": stored.assets, "asset_bytes": stored.asset_bytes,
                "results": stored.results, "result_bytes": stored.result_bytes,
            },
            "jobs_today": store.usage(key_id) if key_id else 0,
            "daily_quota": settings.key_daily_quota if key_id else 0,
        }

    return await anyio.to_thread.run_sync(read)


@api.get(
    "/assets/{asset_id}/analysis",
    summary="Faces, speaker timeline and thumbnails of an uploaded video (computed once, then cached)",
    responses={503: {"model": schemas.ErrorResponse}},
)
async def analyze_asset(asset_id: str, store: StoreDep, key_id: KeyIdDep, analyzer: AnalyzerDep) -> dict[str, Any]:
    """Pass 1 and active-speaker detection on a video asset of this key: the face tracks (``pin``
    is the ``face`` option value that dubs that track), who speaks when, and ~8 JPEG thumbnails
    (base64) with the faces' boxes. 422 if the video is longer than the analysis limit; 503 while
    the server runs as many analyses as it allows."""
    asset = await anyio.to_thread.run_sync(_lookup_asset, store, asset_id, "asset_id", "video", key_id)
    try:
        return await analyzer.analysis(asset)
    except AnalysisRefused as err:
        raise ApiError(err.status, err.code, err.message, headers=err.headers) from None


@api.get("/jobs/{job_id}", response_model=schemas.JobOut, summary="A job's status, progress and result")
async def get_job(job: JobDep, settings: SettingsDep) -> dict[str, Any]:
    return schemas.job_out(job, settings.retention_s)


@api.get("/jobs", response_model=schemas.JobPage, summary="List jobs, newest first")
async def list_jobs(
    store: StoreDep,
    settings: SettingsDep,
    key_id: KeyIdDep,
    status: Annotated[str | None, Query(description="queued, running, succeeded, failed or cancelled")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    jobs, nxt = await anyio.to_thread.run_sync(
        lambda: store.list(status=status or None, limit=limit, cursor=cursor, api_key_id=key_id)
    )
    return {"jobs": [schemas.job_out(j, settings.retention_s) for j in jobs], "next_cursor": nxt}


@api.get(
    "/jobs/{job_id}/result", summary="The dubbed video (HTTP Range supported)",
    responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "Partial content"}},
)
async def get_result(job: JobDep) -> FileResponse:
    return _video_response(job)


@api.post("/jobs/{job_id}/cancel", response_model=schemas.JobOut, summary="Cancel a job")
async def cancel_job(job: JobDep, runner: RunnerDep, settings: SettingsDep) -> dict[str, Any]:
    return schemas.job_out(await anyio.to_thread.run_sync(runner.cancel, job.id), settings.retention_s)


@api.delete("/jobs/{job_id}", summary="Delete a finished or queued job and its files")
async def delete_job(job: JobDep, store: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    if job.status == "queued":
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(runner.cancel, job.id)
    if job.status == "running":
        raise ApiError(409, "running", f"job {job.id} is running; cancel it first", job_id=job.id)
    job = await anyio.to_thread.run_sync(store.purge, job.id)  # InvalidTransition (running now) → 409
    return {"id": job.id, "deleted": True}


@probes.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", response_model=schemas.Readiness, summary="Readiness: weights loaded, worker alive")
async def readyz(runner: RunnerDep) -> JSONResponse:
    info = runner.ready()
    return JSONResponse(info, status_code=200 if info["ready"] else 503)


@probes.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(store: StoreDep, runner: RunnerDep, settings: SettingsDep) -> PlainTextResponse:
    text = await anyio.to_thread.run_sync(render_metrics, store, runner, settings)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def render_metrics(store: JobStore, runner: Runner, settings: ServiceSettings | None = None) -> str:
    counts = store.counts_by_status()
    lines = ["# HELP latentdub_jobs Jobs in the database by status.", "# TYPE latentdub_jobs gauge"]
    lines += [f'latentdub_jobs{{status="{s}"}} {n}' for s, n in counts.items()]
    lines += [
        "# HELP latentdub_queue_depth Jobs waiting for the worker.",
        "# TYPE latentdub_queue_depth gauge",
        f"latentdub_queue_depth {runner.queue_depth()}",
        "# HELP latentdub_outbox_pending Queued jobs whose message the broker has not accepted yet.",
        "# TYPE latentdub_outbox_pending gauge",
        f"latentdub_outbox_pending {store.outbox_pending()}",
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
    if settings is not None:  # database sums (and a cached size of the analysis folder): no folder walk
        lines += ["# HELP latentdub_storage_bytes Bytes stored by kind: uploaded assets, job results, "
                  "cached analyses.", "# TYPE latentdub_storage_bytes gauge"]
        lines += [f'latentdub_storage_bytes{{kind="{k}"}} {n}' for k, n in storage_bytes(store, settings).items()]
    return "\n".join(lines) + "\n"


__all__ = ["ApiError", "Conflict", "api", "option_form", "parse_options", "probes", "submit_router"]
