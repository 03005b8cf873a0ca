"""The service's web page (``GET /``) and the two small API routes it needs.

* ``GET /`` serves ``static/index.html``; ``/static/app.js`` and ``/static/style.css`` its script
  and style. Nothing external is loaded: no CDN, no framework, no build step.
* ``GET /api/v1/info`` (open, no key): ``{"auth_enabled", "version", "options"}``, so the page
  can show that authentication is off; ``options`` is the JSON Schema of the app's options model
  (``settings.options_model``), from which the page builds its option controls: every field a
  control, typed, ranged and described as the schema says (no option is written into the page).
* ``POST /api/v1/verify`` (a multipart ``video``): the watermark (per segment, with the service's
  secret key: it never leaves the server), copy check, C2PA findings and attribution of any
  video, as ``latentdub verify`` reports them. The upload is stored under ``data_dir/uploads`` with a
  fresh UUID name, sniffed with PyAV and deleted afterwards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from latentdub.errors import InputError
from latentdub.service import schemas
from latentdub.service.deps import OptionsModelDep, SettingsDep
from latentdub.service.routes import ApiError
from latentdub.service.uploads import UploadError, _extension, receive

STATIC_DIR = Path(__file__).parent / "static"
INFO_PATH = "/api/v1/info"
MAX_VERIFY_FRAMES = 1000
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

web = APIRouter()
_api = APIRouter(
    prefix="/api/v1", responses={c: {"model": schemas.ErrorResponse} for c in (401, 413, 415, 422)}
)


@web.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


@web.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    if name not in _ASSETS:  # a fixed list: no path is ever made from the request
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(STATIC_DIR / name, media_type=_ASSETS[name])


class Info(BaseModel):
    auth_enabled: bool = Field(description="Whether /api/ routes need Authorization: Bearer KEY.")
    version: str
    options: dict[str, Any] = Field(
        description="JSON Schema of the per-dub options: the option form fields of /jobs and /sync, "
        "their types, ranges, defaults and descriptions."
    )


@_api.get(
    INFO_PATH.removeprefix("/api/v1"),
    response_model=Info,
    summary="Service version, whether auth is on, and the options schema (no key needed)",
)
async def info(settings: SettingsDep, options_model: OptionsModelDep) -> dict[str, Any]:
    from latentdub import __version__

    return {
        "auth_enabled": bool(settings.auth_enabled),
        "version": __version__,
        "options": options_model.model_json_schema(),
    }


def _inspect(path: Path, max_frames: int, settings: Any) -> dict[str, Any]:
    """Sniff ``path`` (PyAV) and verify it with the service's own secret key and audit chains
    (the key never leaves the server)."""
    import av

    from latentdub.media.reader import probe_video
    from latentdub.provenance.audit import chain_paths
    from latentdub.provenance.verify import verify_file
    from latentdub.provenance.watermark_key import existing_key
    from latentdub.service.jobs import audit_dir

    try:
        probe_video(path)
        with av.open(str(path), mode="r") as container:
            fmt = container.format.name
    except InputError as err:
        message = str(err).replace(str(path), "the upload").replace(path.name, "the upload")
        raise UploadError(415, "unsupported_media", f"video: {message}", "video") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        raise UploadError(
            415,
            "unsupported_media",
            "video: the file is not a video that can be read (or it is truncated)",
            "video",
        ) from None
    final = path.with_suffix(f".{_extension(fmt)}")  # the C2PA reader goes by the extension
    path.rename(final)
    try:
        report = verify_file(final, key=existing_key(settings.data_dir), audit_paths=chain_paths(audit_dir(settings)),
                             max_frames=max_frames).to_dict()
    finally:
        final.unlink(missing_ok=True)
    # The server's storage path is nobody's business, nor are other clients' job ids (the mark's
    # 8-hex-digit id stays: it is what the picture carries).
    report.pop("file", None)
    if report.get("c2pa"):
        report["c2pa"].pop("path", None)
    report["attribution"].pop("job", None)
    for check in (report.get("copy_check") or {}).values():
        check.pop("job", None)
        for part in check.get("ranges") or []:
            part.pop("job", None)
    return report


@_api.post("/verify", summary="Look for the watermark and C2PA content credentials in a video")
async def verify(
    settings: SettingsDep,
    video: Annotated[UploadFile | None, File(description="Any video file.")] = None,
    max_frames: Annotated[
        str | None, Form(description="Frames to sample for the watermark (default 150).")
    ] = None,
) -> dict[str, Any]:
    """As ``latentdub verify --json``: ``status`` (marked, ai_marker, copied_mark, tampered, not_found),
    ``segments``, ``watermark``, ``key``, ``copy_check``, ``c2pa``, ``credentials``, ``attribution``,
    ``marked``; read with the service's secret watermark key, on the server."""
    if video is None or isinstance(video, str):
        raise ApiError(
            422,
            "missing_field",
            "video is required: upload it as a multipart file field",
            field="video",
        )
    frames = 150
    if max_frames is not None and max_frames.strip():
        try:
            frames = int(max_frames)
        except ValueError:
            frames = 0
        if not 1 <= frames <= MAX_VERIFY_FRAMES:
            raise ApiError(
                422,
                "invalid_field",
                f"max_frames must be a whole number from 1 to {MAX_VERIFY_FRAMES}",
                field="max_frames",
            )
    path, _, _ = await receive(video, "video", settings)  # uploads/<uuid>.part, size-limited
    try:
        return await anyio.to_thread.run_sync(_inspect, path, frames, settings)
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


web.include_router(_api)

__all__ = ["INFO_PATH", "web"]
