"""``create_app``: the dubbing service's FastAPI application.

* Every error of every route (validation, 404, 405, 413, uncaught bugs) is JSON
  ``{"error": {"code", "message"}}`` with no traceback.
* ``/api/…`` needs ``Authorization: Bearer KEY`` when ``settings.auth_enabled``; the check runs
  before the request body is read. ``/healthz``, ``/readyz`` and ``/metrics`` are open.
* A request body larger than two uploads' worth is refused (413) while it streams in; each
  upload is limited to ``max_upload_bytes`` as it is stored.
* The option fields of ``/jobs`` and ``/sync``, the options schema of ``/api/v1/info`` and so the
  web page's option controls all come from ``settings.options_model``.
* Every response, errors included, carries the security headers :data:`SECURITY_HEADERS`: a
  Content-Security-Policy that loads nothing from other origins (``default-src 'self'``) and
  lets no page frame ours (``frame-ancestors 'none'``), ``nosniff`` and ``Referrer-Policy``.
* ``/docs`` (Swagger UI) is served with its files from the ``fastapi-offline`` package under
  ``/docs/static/``: no CDN, so it works on a machine with no internet. There is no ``/redoc``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from sqlalchemy import Engine
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latentdub.errors import InputError, LatentdubError
from latentdub.service.routes import ApiError, api, probes, submit_router
from latentdub.service.runner import Runner
from latentdub.service.schemas import error_body
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import Conflict, InvalidTransition, JobNotFound
from latentdub.service.uploads import UploadError
from latentdub.service.web import INFO_PATH, web

log = logging.getLogger(__name__)

BODY_SLACK = 1 << 20  # multipart headers and the text fields, on top of two uploads
DEFAULT_SYNC_TIMEOUT_S = 600.0

# Nothing from other origins. The web page has no inline script or style (its JS sets styles
# through the DOM, which CSP allows); its face thumbnails are data: URLs and the result video
# plays from a blob: URL.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",  # frame-ancestors, for browsers without CSP 2
}
DOCS_STATIC = "/docs/static"
# The Swagger UI files /docs loads, from the fastapi-offline package (a fixed list: no path is
# made from the request).
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}


class BodyTooLarge(Exception):
    pass


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


class GateMiddleware:
    """API-key check and request-body limit for ``/api/`` routes, before the body is read."""

    def __init__(self, app: ASGIApp, settings: ServiceSettings, engine: Engine) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine
        self.max_body = 2 * settings.max_upload_bytes + BODY_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/") or scope["path"] == INFO_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = None
        if self.settings.auth_enabled:
            from latentdub.service.auth import verify_key

            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                key = await anyio.to_thread.run_sync(verify_key, self.engine, token.strip())
            if key is None:
                response = _json(
                    401, "unauthorized",
                    "a valid API key is required: send Authorization: Bearer KEY (make one with `latentdub keys create`)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["api_key"] = key
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _json(
            413, "upload_too_large",
            f"the request is larger than the limit ({self.settings.max_upload_bytes} bytes per upload)",
        )
        await response(scope, receive, send)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response; a header the response set itself
    (``/docs``' CSP, which names its one inline script by hash) is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_secured)


def create_app(
    settings: ServiceSettings | None = None,
    runner: Runner | None = None,
    *,
    pipe_factory: Callable[[], Any] | None = None,
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
    preload: bool = False,
) -> FastAPI:
    """The app. ``runner``: any :class:`~.runner.Runner`; default: an
    :class:`~.runner.InProcessRunner` made from ``settings`` and ``pipe_factory``. The runner is
    started (and its jobs recovered) with the app's lifespan, and so is the storage
    :class:`~.storage.Sweeper`. The per-dub options are
    ``settings.options_model``'s fields (give a :class:`~latentdub.options.DubOptions` subclass to
    add some); the runner should read stored options with the same settings."""
    from latentdub.service.runner import InProcessRunner
    from latentdub.service.storage import Sweeper

    settings = settings or ServiceSettings()
    settings.ensure_data_dir()
    if runner is None:
        runner = InProcessRunner(settings, pipe_factory)
    store = runner.store

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start(preload=preload)
        await anyio.to_thread.run_sync(runner.recover)
        sweeper = Sweeper(store, settings)  # storage expiry and orphans: now, then every sweep_interval_s
        sweeper.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(sweeper.stop)
            await anyio.to_thread.run_sync(runner.stop)

    app = FastAPI(
        title="latentdub",
        summary="Lip-sync dubbing: video + new speech in, the same video with a new mouth out.",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # served by _install_docs, from the package instead of a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runner = runner
    app.state.store = store
    app.state.sync_timeout_s = sync_timeout_s
    app.include_router(submit_router(settings.options_model))
    app.include_router(api)
    app.include_router(probes)
    app.include_router(web)
    _install_docs(app)
    app.add_middleware(GateMiddleware, settings=settings, engine=store.engine)
    app.add_middleware(SecurityHeadersMiddleware)  # added last: outermost, so it sees the gate's 401/413 too
    _install_error_handlers(app)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("latentdub")
    except Exception:
        return "0"


def _install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI with its files from the ``fastapi-offline`` package."""
    import fastapi_offline

    folder = Path(fastapi_offline.__file__).parent / "static"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # else the UI may ask validator.swagger.io
        )
        # The page starts Swagger UI with one inline script: allowed by its hash, nothing else is.
        hashes = " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()}'"
            for code in re.findall(r"<script>(.*?)</script>", bytes(page.body).decode(), re.S)
        )
        csp = CSP.replace("default-src 'self';", f"default-src 'self'; script-src 'self' {hashes};")
        page.headers["content-security-policy"] = csp
        return page

    @app.get(f"{DOCS_STATIC}/{{name}}", include_in_schema=False)
    async def docs_file(name: str) -> FileResponse:
        if name not in DOCS_FILES:
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(folder / name, media_type=DOCS_FILES[name])


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _json(err.status, err.code, err.message, headers=err.headers, field=err.field, job_id=err.job_id)

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, err: UploadError) -> JSONResponse:
        return _json(err.status, err.code, err.message, field=err.field)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
        return _json(413, "upload_too_large", "the request body is larger than the server accepts")

    @app.exception_handler(LatentdubError)
    async def _latentdub_error(_: Request, err: LatentdubError) -> JSONResponse:
        if isinstance(err, JobNotFound):
            return _json(404, "not_found", str(err))
        if isinstance(err, Conflict):
            return _json(409, "idempotency_conflict", str(err), job_id=err.job_id)
        if isinstance(err, InvalidTransition):
            return _json(409, "invalid_state", str(err), job_id=err.job_id)
        if isinstance(err, InputError):
            return _json(422, "bad_input", str(err), field=getattr(err, "field", None))
        log.error("unexpected service error: %s", err)
        return _json(500, "internal", str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        field = None
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
            name = ".".join(loc) or "request"
            field = field or name
            problems.append(f"{name}: {e.get('msg', 'is invalid')}")
        return _json(422, "validation_error", "; ".join(problems) or "the request is invalid", field=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err.__cause__, BodyTooLarge):
            return _json(413, "upload_too_large", "the request body is larger than the server accepts")
        codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media"}
        message = err.detail if isinstance(err.detail, str) else "the request cannot be served"
        if err.status_code == 404 and message == "Not Found":
            message = "no such route"
        return _json(err.status_code, codes.get(err.status_code, f"http_{err.status_code}"), message,
                     headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=err)
        # Answered outside the middleware stack (Starlette's ServerErrorMiddleware): its own headers.
        return _json(500, "internal", "internal server error; see the server log", headers=dict(SECURITY_HEADERS))
