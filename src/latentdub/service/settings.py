"""``ServiceSettings``: every knob of the dubbing service, from ``LATENTDUB_*`` variables or flags.

Each field can be set by keyword (the CLI's flags do that) or by an environment variable named
``LATENTDUB_`` + the field name in capitals (``LATENTDUB_AUTH_ENABLED=false``), with one
exception: the service folder is ``LATENTDUB_SERVICE_DATA_DIR``, because ``LATENTDUB_DATA_DIR``
already names latentdub's whole data folder (signing keys, audit log). By default the service
lives in that folder's ``service/`` subfolder, with its SQLite database inside.

``options_model`` is the one place the service takes its per-dub options schema from: the API's
form fields, ``/api/v1/info`` (whose schema the web page builds its controls from) and the
workers' reading of stored options all use it. A :class:`~latentdub.options.DubOptions`
subclass with more fields shows up everywhere with no other edit.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import Field, ImportString, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from latentdub.errors import InputError
from latentdub.options import DubOptions

DATABASE_FILE = "service.db"
WEBHOOK_SECRET_FILE = "webhook-secret"
_DATA_DIR_ENV = "LATENTDUB_SERVICE_DATA_DIR"


def _default_data_dir() -> Path:
    from latentdub.provenance.store import data_dir

    return data_dir() / "service"


class ServiceSettings(BaseSettings):
    """Settings of one service deployment (the HTTP app and its workers share them)."""

    model_config = SettingsConfigDict(
        env_prefix="LATENTDUB_",
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        validation_alias=_DATA_DIR_ENV,
        description="Folder of the service: its SQLite database, uploads and results "
        "(default: the latentdub data folder's service/). Several machines share it as a mount.",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the job database; empty: a SQLite file in data_dir. "
        "PostgreSQL: postgresql+psycopg://user:password@host/db.",
    )
    auth_enabled: bool = Field(
        True, description="Require an API key (Authorization: Bearer KEY). Turn off only for local use."
    )
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="Largest accepted upload, in bytes.")
    max_duration_s: float = Field(600.0, gt=0, description="Longest accepted video or audio, in seconds.")
    max_frame_pixels: int = Field(
        3840 * 2160, ge=1, description="Largest accepted video frame, width × height in pixels."
    )
    key_concurrency: int = Field(
        2, ge=0, description="Jobs one API key may have queued or running at once; 0: no limit."
    )
    key_daily_quota: int = Field(
        100, ge=0, description="Jobs one API key may submit per UTC day; 0: no limit."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Timeout of one webhook request, in seconds.")
    webhook_backoff_s: float = Field(
        2.0, ge=0, description="First retry delay of a webhook; doubles with each retry up to 10 minutes. A "
        "webhook is retried after a network error or a 5xx / 429 answer until it is 3 days old; any other answer is final."
    )
    allow_private_webhooks: bool = Field(
        False,
        description="Allow webhook_url hosts that resolve to loopback, private or link-local addresses "
        "(local testing only).",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC secret that signs webhooks; unset: a random one kept in data_dir/webhook-secret.",
    )
    lease_s: float = Field(
        120.0, gt=0, description="How long a worker's claim on a running job lasts without a heartbeat."
    )
    broker_url: str = Field(
        "",
        description="Celery broker for scale-out (redis://host:6379/0): jobs then run on `latentdub worker` "
        "processes. Empty: they run inside the serving process.",
    )
    visibility_timeout_s: float = Field(
        60.0, gt=0, description="Seconds after which a job whose worker died is delivered to another worker."
    )
    analysis_max_s: float = Field(
        180.0,
        gt=0,
        description="Longest video the face and speaker analysis (GET /api/v1/assets/{id}/analysis) runs on, "
        "in seconds: it runs MediaPipe over every frame.",
    )
    analysis_concurrency: int = Field(
        1, ge=1, description="Face and speaker analyses one serving process runs at once; more are answered 503."
    )
    analysis_workers: int = Field(
        1, ge=0, description="Processes one face analysis uses; 0: one per CPU core (results are the same)."
    )
    key_storage_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="Bytes one API key may keep stored: its uploaded assets plus its jobs' results; an upload "
        "past it is refused (413 storage_quota). 0: no limit.",
    )
    retention_s: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="Seconds results and uploaded assets are kept: a result from its job's end, an asset from "
        "its upload (not while a queued or running job uses it). Job rows stay. 0: keep forever.",
    )
    sweep_interval_s: float = Field(
        300.0,
        gt=0,
        description="Seconds between storage sweeps of a serving process (expired results and assets, orphaned "
        "files); one also runs at start-up.",
    )
    allow_no_watermark: bool = Field(
        False,
        description="Without auth (auth_enabled=false): may a job turn the invisible watermark off "
        "(watermark=false)? With auth, only keys made with `latentdub keys create --allow-no-watermark` may.",
    )
    outbox_interval_s: float = Field(
        5.0,
        gt=0,
        description="With a broker: seconds between rounds of a serving process that publish again the queued "
        "jobs whose message the broker did not accept (it was down when they were submitted).",
    )
    webhook_poll_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between rounds of a serving process that send the webhooks whose next attempt is "
        "due (retries after a network error or a 5xx / 429 answer, and deliveries whose sender died).",
    )
    # A class, or its import path from the environment ("package.module.Class"), so separate
    # worker processes load the same model as the HTTP app.
    options_model: ImportString[type[DubOptions]] = Field(
        DubOptions,
        description="The per-dub options schema (DubOptions or a subclass): the API's option fields, the web "
        "page's controls and what workers read back from stored jobs.",
    )

    def __init__(self, **values: Any) -> None:
        # data_dir= by keyword; from the environment only as LATENTDUB_SERVICE_DATA_DIR (matching
        # by field name would read LATENTDUB_DATA_DIR, the parent folder, as the service folder).
        if "data_dir" in values:
            values[_DATA_DIR_ENV] = values.pop("data_dir")
        super().__init__(**values)

    @model_validator(mode="after")
    def _fill_database_url(self) -> ServiceSettings:
        self.data_dir = Path(self.data_dir).expanduser()
        if not self.database_url.strip():
            self.database_url = f"sqlite:///{(self.data_dir / DATABASE_FILE).as_posix()}"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_data_dir(self) -> Path:
        """Create the service folder (mode 0700) if missing and return it."""
        from latentdub.provenance.store import ensure_private_dir

        return ensure_private_dir(self.data_dir, what="the service data folder")

    def webhook_signing_secret(self) -> str:
        """The webhook secret: the setting, else the one in data_dir (made on first use, mode 0600)."""
        if self.webhook_secret is not None and self.webhook_secret.get_secret_value():
            return self.webhook_secret.get_secret_value()
        path = self.ensure_data_dir() / WEBHOOK_SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_urlsafe(32))
        try:
            value = path.read_text(encoding="ascii").strip()
        except OSError as err:
            raise InputError(f"cannot read the webhook secret {path}: {err.strerror or err}") from err
        if not value:
            raise InputError(f"the webhook secret file {path} is empty; delete it to make a new one.")
        return value
