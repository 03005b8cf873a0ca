"""``latentdub worker``: run dubbing jobs from the Celery queue on this machine's GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentdub.cli._app import app


@app.command("worker")
def worker(
    broker: Annotated[
        str | None, typer.Option(help="Celery broker URL, e.g. redis://host:6379/0 (default: $LATENTDUB_BROKER_URL).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="The service folder shared with the server (uploads, results, SQLite).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Job database URL (default: the server's; SQLite in --data-dir).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Local weights folder (official layout).")] = None,
    version: Annotated[str, typer.Option(help="Model version: 1.5 or 1.6.")] = "1.6",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps: one worker process per GPU.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32 (default: official rule).")] = None,
) -> None:
    """Take jobs from the queue one at a time, models loaded once; a job whose worker dies runs again elsewhere."""
    from latentdub.devices import parse_device
    from latentdub.errors import InputError
    from latentdub.service.celery_app import configure_pipeline, run_worker
    from latentdub.service.settings import ServiceSettings

    values: dict[str, object] = {}
    if broker:
        values["broker_url"] = broker
    if data_dir is not None:
        values["data_dir"] = data_dir
    if database_url:
        values["database_url"] = database_url
    settings = ServiceSettings(**values)
    if not settings.broker_url:
        raise InputError("latentdub worker needs a broker: --broker redis://host:6379/0 or LATENTDUB_BROKER_URL")
    parse_device(device, flag="--device")  # before taking jobs, not when the first one loads the model
    configure_pipeline(weights=str(weights) if weights else None, version=version, device=device, dtype=dtype)
    run_worker(settings)
