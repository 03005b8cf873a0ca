"""API keys: ``ld_<prefix>_<secret>``, shown once, stored only as a SHA-256 hash.

The secret is 32 random bytes (``secrets.token_urlsafe(32)``), so a plain SHA-256 is enough:
there is nothing to brute-force that a slow password hash would protect. ``prefix`` (8 hex
characters) is stored in clear to find the key's row and to name the key in lists; it is not
secret. Hashes are compared with :func:`hmac.compare_digest`.

Turning the invisible watermark off is a permission, not an option anyone may set: without it
only the C2PA manifest marks the output, and a remux strips that. A key may do it only when it
was made with ``allow_no_watermark`` (``keys create --allow-no-watermark``); without auth, the
server setting ``allow_no_watermark`` decides. See :func:`watermark_opt_out_refusal`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import IntegrityError

from latentdub.errors import InputError
from latentdub.service.db import read_session, write_session
from latentdub.service.models import ApiKey, new_id, utcnow

KEY_PREFIX = "ld"
# last_used_at is written at most this often per key, so that checking a key is usually a read.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)


class KeyNotFound(InputError):
    """No API key with that id or prefix."""


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a well-formed key, else None."""
    parts = plaintext.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    prefix, secret = parts[1], parts[2]
    if len(prefix) != 8 or any(c not in "0123456789abcdef" for c in prefix) or len(secret) < 32:
        return None
    return prefix, secret


def create_key(engine: Engine, name: str = "", *, allow_no_watermark: bool = False) -> tuple[str, ApiKey]:
    """Make a key: ``(plaintext, row)``. The plaintext exists only in the return value.

    ``allow_no_watermark``: the key's jobs may turn the invisible watermark off.
    """
    name = name.strip()
    if len(name) > 200:
        raise InputError("an API key name must be at most 200 characters")
    for _ in range(5):  # a prefix collision (1 in 4 billion per pair) just draws again
        prefix = secrets.token_hex(4)
        plaintext = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
        key = ApiKey(
            id=new_id(), name=name, prefix=prefix, key_hash=hash_key(plaintext), created_at=utcnow(),
            allow_no_watermark=bool(allow_no_watermark),
        )
        try:
            with write_session(engine) as session:
                session.add(key)
        except IntegrityError:
            continue
        return plaintext, key
    raise RuntimeError("could not draw an unused API key prefix")


def verify_key(engine: Engine, plaintext: str | None) -> ApiKey | None:
    """The key's row if ``plaintext`` is a valid, unrevoked key; else None. Notes the use."""
    if not plaintext:
        return None
    parsed = parse_key(plaintext)
    if parsed is None:
        return None
    with read_session(engine) as session:
        key = session.scalars(select(ApiKey).where(ApiKey.prefix == parsed[0])).one_or_none()
    if key is None or not hmac.compare_digest(key.key_hash, hash_key(plaintext.strip())):
        return None
    if key.revoked_at is not None:
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        with write_session(engine) as session:
            row = session.get(ApiKey, key.id)
            if row is not None:
                row.last_used_at = now
        key.last_used_at = now
    return key


def list_keys(engine: Engine, *, include_revoked: bool = True) -> list[ApiKey]:
    """All keys, oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with read_session(engine) as session:
        return list(session.scalars(query))


def revoke_key(engine: Engine, id_or_prefix: str) -> ApiKey:
    """Revoke a key by its id or its prefix (``ld_`` in front is allowed); revoking twice is fine."""
    ref = id_or_prefix.strip()
    if ref.startswith(f"{KEY_PREFIX}_"):
        ref = ref.split("_", 2)[1]
    if not ref:
        raise KeyNotFound("give the id or the prefix of the API key to revoke")
    with write_session(engine) as session:
        key = session.scalars(
            select(ApiKey).where(or_(ApiKey.id == ref, ApiKey.prefix == ref)).with_for_update()
        ).one_or_none()
        if key is None:
            raise KeyNotFound(f"no API key with id or prefix {id_or_prefix!r} (see `latentdub keys list`)")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
    return key


def watermark_opt_out_refusal(engine: Engine, key_id: str | None, *, server_allows: bool) -> str | None:
    """Why a job of ``key_id`` may not turn the watermark off, or None if it may.

    Without auth (``key_id`` None) the server setting decides; with auth only the key's own
    permission does (read again here: it is not in the request).
    """
    if key_id is None:
        if server_allows:
            return None
        return ("this server does not allow turning the invisible watermark off (watermark=false); "
                "its operator can allow it with LATENTDUB_ALLOW_NO_WATERMARK=true")  # fmt: skip
    with read_session(engine) as session:
        key = session.get(ApiKey, key_id)
    if key is not None and key.allow_no_watermark and key.revoked_at is None:
        return None
    return ("this API key may not turn the invisible watermark off (watermark=false); only keys made with "
            "`latentdub keys create --allow-no-watermark` may")  # fmt: skip
