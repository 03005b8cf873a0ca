"""``latentdub serve``: the HTTP dubbing service (FastAPI on uvicorn, OpenAPI at /docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentdub.cli._app import app, console_err
from latentdub.errors import InputError


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The service's folder (database, uploads, results); default: $LATENTDUB_SERVICE_DATA_DIR "
            "or the latentdub data folder's service/.",
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Local weights folder (official layout) instead of the HF hub/cache.")
    ] = None,
    version: Annotated[str, typer.Option(help="Model version: 1.5 (256 px) or 1.6 (512 px).")] = "1.6",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without API keys (local use only).")
    ] = False,
    sync_timeout: Annotated[
        float, typer.Option(help="Default wait of POST /api/v1/sync, in seconds.", min=1)
    ] = 600.0,
    broker: Annotated[
        str | None,
        typer.Option(help="Celery broker (redis://host:6379/0): jobs run on `latentdub worker` processes "
                     "(default: $LATENTDUB_BROKER_URL; none: in this process)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the dubbing service: the model is loaded once, queued jobs are recovered at start."""
    import uvicorn

    from latentdub.devices import parse_device
    from latentdub.pipeline import LipSyncPipeline
    from latentdub.service.app import create_app
    from latentdub.service.settings import ServiceSettings

    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    if weights is not None and not weights.is_dir():
        raise InputError(f"--weights {weights} is not a folder")
    parse_device(device, flag="--device")  # before the service starts, not when it loads the model
    values: dict[str, object] = {}
    if data_dir is not None:
        values["data_dir"] = data_dir
    if no_auth:
        values["auth_enabled"] = False
    if broker:
        values["broker_url"] = broker
    settings = ServiceSettings(**values)

    def load() -> LipSyncPipeline:
        return LipSyncPipeline.from_pretrained(weights or version, version=version, device=device)

    if settings.broker_url:  # scale-out: the workers load the model, this process only serves
        from latentdub.service.celery_app import CeleryRunner

        settings.ensure_data_dir()
        service = create_app(settings, CeleryRunner(settings), sync_timeout_s=sync_timeout)
    else:
        service = create_app(settings, pipe_factory=load, sync_timeout_s=sync_timeout, preload=True)
    if not settings.auth_enabled:
        console_err.print("warning: API keys are OFF (--no-auth); keep this server local", highlight=False)
    console_err.print(
        f"latentdub service on http://{host}:{port} (docs: /docs), data in {settings.data_dir}", highlight=False
    )
    uvicorn.run(service, host=host, port=port, log_level=log_level)
