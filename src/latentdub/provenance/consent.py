"""Consent records: who is depicted, who agreed to the dub, how, and where the proof is.

A dub changes what a real person appears to say, so latentdub asks for a record of consent and
writes its id into the content credentials and the audit log. The record is a small JSON object::

    {"subject": "Jane Doe", "granted_by": "Jane Doe", "method": "signed release form",
     "evidence": "contracts/2026-114.pdf", "granted_at": "2026-11-01T10:00:00Z",
     "scope": "Spanish dub of the product video", "expires_at": "2027-11-01T00:00:00Z"}

``subject``, ``granted_by``, ``method`` and ``evidence`` are required and must not be blank;
``id`` is derived from the record's content when absent (the same record always gets the same
id); any further fields are kept as given. A record past ``expires_at`` is refused. latentdub
cannot check the evidence itself: the record is the operator's statement, made traceable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from latentdub.errors import InputError

REQUIRED = ("subject", "granted_by", "method", "evidence")
_NEEDS = "a consent record needs subject, granted_by, method and evidence"
# Clocks disagree a little; a grant dated minutes ahead is a skew, not a forgery.
_FUTURE_SLACK = dt.timedelta(minutes=5)


class ConsentError(InputError):
    """A consent record that is missing, malformed, incomplete or no longer valid."""


class ConsentRecord(BaseModel):
    """One person's consent to being dubbed. Unknown fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True, frozen=True)

    subject: str = Field(min_length=1, description="Who is depicted in the video.")
    granted_by: str = Field(min_length=1, description="Who gave consent (the subject, or their representative).")
    method: str = Field(min_length=1, description='How consent was given, e.g. "signed release form", "recorded verbal".')
    evidence: str = Field(min_length=1, description="Where the proof is: a URL, document id or file path.")
    id: str | None = Field(None, min_length=1, description="Record id; derived from the content when absent.")
    granted_at: dt.datetime | None = Field(None, description="When consent was given (ISO 8601).")
    scope: str | list[str] | None = Field(None, description="What the consent covers.")
    expires_at: dt.datetime | None = Field(None, description="When consent ends (ISO 8601); later dubs are refused.")

    @model_validator(mode="after")
    def _derive(self) -> ConsentRecord:
        # Naive times are taken as UTC and all are kept in UTC: comparisons are well defined and
        # the same instant written two ways gives the same id.
        for name in ("granted_at", "expires_at"):
            value = getattr(self, name)
            if value is not None:
                utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
                object.__setattr__(self, name, utc)
        if self.granted_at and self.expires_at and self.expires_at <= self.granted_at:
            raise ValueError("expires_at must be after granted_at")
        if self.id is None:
            object.__setattr__(self, "id", content_id(self.model_dump(mode="json", exclude={"id"}, exclude_none=True)))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, extra fields included."""
        return self.model_dump(mode="json", exclude_none=True)

    def check_current(self, now: dt.datetime | None = None) -> None:
        """Raise :class:`ConsentError` if the record has expired or is dated in the future."""
        now = now or dt.datetime.now(dt.UTC)
        if self.expires_at is not None and self.expires_at <= now:
            raise ConsentError(
                f"consent record {self.id} expired on {self.expires_at.isoformat()}; "
                "a dub needs consent that is valid now."
            )
        if self.granted_at is not None and self.granted_at > now + _FUTURE_SLACK:
            raise ConsentError(f"consent record {self.id} is dated in the future (granted_at {self.granted_at.isoformat()}).")


def content_id(fields: Mapping[str, Any]) -> str:
    """A stable id for a record's content: ``consent-`` + 32 hex digits of its SHA-256."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "consent-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


CONSENT_EXAMPLE = (
    '{"subject": "Jane Doe", "granted_by": "Jane Doe", "method": "signed release form", '
    '"evidence": "contracts/2026-114.pdf"}'
)


def require_consent(value: Any, *, how: str = "consent=…") -> ConsentRecord:
    """The checked record, or :class:`ConsentError` saying that every dub needs one and how to give it.

    ``how`` names the way to pass it in the caller's world (``--consent``, a form field, ``consent=``).
    """
    if value is None:
        raise ConsentError(
            f"every dub needs a consent record: give {how} with a JSON object (or .json file) holding "
            f"{', '.join(REQUIRED)}, e.g. {CONSENT_EXAMPLE}"
        )
    return parse_consent(value)


def parse_consent(value: str | Path | Mapping[str, Any], *, now: dt.datetime | None = None) -> ConsentRecord:
    """A checked, current :class:`ConsentRecord` from a JSON string, a JSON file or a mapping."""
    data = _load(value)
    try:
        record = ConsentRecord(**data)
    except ValidationError as err:
        raise ConsentError(_explain(err)) from None
    record.check_current(now)
    return record


def _load(value: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, ConsentRecord):
        return value.model_dump()
    if isinstance(value, Mapping):
        return _as_object(dict(value), "the consent record")
    if isinstance(value, Path):
        return _read_file(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConsentError(f"the consent record is empty ({_NEEDS}).")
        if text.startswith(("{", "[")):
            return _parse_json(text, "the consent record")
        return _read_file(Path(text).expanduser())
    raise ConsentError(f"a consent record must be JSON text, a JSON file or a mapping, not {type(value).__name__}.")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConsentError(f"consent record file {path} does not exist (give a JSON file or the JSON text itself).")
    if path.is_dir():
        raise ConsentError(f"consent record {path} is a folder, not a JSON file.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows add a BOM
    except UnicodeDecodeError:
        raise ConsentError(f"consent record file {path} is not UTF-8 text.") from None
    except OSError as err:
        raise ConsentError(f"cannot read consent record file {path}: {err.strerror or err}") from None
    if not text.strip():
        raise ConsentError(f"consent record file {path} is empty ({_NEEDS}).")
    return _parse_json(text, f"consent record file {path}")


def _parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConsentError(f"{what} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from None
    return _as_object(data, what)


def _as_object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else type(data).__name__
        raise ConsentError(f"{what} must be a JSON object with subject, granted_by, method and evidence, not {kind}.")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConsentError(f"{what} has non-text field names: {bad_keys!r}.")
    return data


def _explain(err: ValidationError) -> str:
    """All of pydantic's complaints as one sentence per kind, naming the fields."""
    missing: list[str] = []
    empty: list[str] = []
    other: list[str] = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"]) or "record"
        kind = e["type"]
        if kind == "missing":
            missing.append(name)
        elif kind == "string_too_short":
            empty.append(name)
        elif kind in ("datetime_from_date_parsing", "datetime_parsing", "datetime_type"):
            other.append(f"{name} must be an ISO 8601 date-time such as 2026-11-01T10:00:00Z, got {e.get('input')!r}")
        elif name == "scope" or name.startswith("scope."):
            if "scope must be text or a list of texts" not in other:
                other.append("scope must be text or a list of texts")
        elif kind == "string_type":
            other.append(f"{name} must be text, got {e.get('input')!r}")
        elif kind == "value_error" and not e["loc"]:
            other.append(str(e.get("msg", "")).removeprefix("Value error, "))
        else:
            other.append(f"{name}: {e.get('msg', 'is invalid')}")
    parts = []
    if missing:
        parts.append(f"consent record is missing: {', '.join(missing)}")
    if empty:
        parts.append(f"consent record has empty fields: {', '.join(empty)}")
    if parts:
        parts[-1] += f" ({_NEEDS})"
    parts.extend(f"consent record: {o}" for o in other)
    return "; ".join(parts) + "."
