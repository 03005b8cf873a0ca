"""Signed webhooks: ``Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The signature is HMAC-SHA256 with the shared secret over ``f"{t}.".encode() + body`` (the raw
request body, exactly as received). A receiver checks it like this::

    from latentdub.service.webhooks import verify
    ok = verify(request.headers["Webhook-Signature"], raw_body, SECRET)   # and t within 5 minutes

or, without latentdub::

    t, v1 = (part.split("=", 1)[1] for part in header.split(","))          # "t=…", "v1=…"
    expected = hmac.new(SECRET.encode(), f"{t}.".encode() + raw_body, "sha256").hexdigest()
    ok = hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) <= 300

Each event has a ``Webhook-Id`` that stays the same over retries (receivers de-duplicate on it);
every attempt is signed afresh with its own timestamp. Network errors, 5xx and 429 answers are
retried with exponential backoff (:func:`backoff_delay`); other answers, and an address refused
as not public, are final. The retry schedule lives in :func:`deliver` alone: it says when the next
attempt is due, whether within the call (``retries``) or later, by another run (``retry_until``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from latentdub.errors import InputError
from latentdub.service import addresses

if TYPE_CHECKING:
    import httpx

SIGNATURE_HEADER = "Webhook-Signature"
ID_HEADER = "Webhook-Id"
TIMESTAMP_HEADER = "Webhook-Timestamp"
SCHEME = "v1"
MAX_BACKOFF_S = 600.0
EVENTS = ("job.succeeded", "job.failed", "job.cancelled")


def backoff_delay(attempts: int, backoff_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: ``backoff_s * 2**(attempts-1)``, at
    most :data:`MAX_BACKOFF_S`."""
    return min(backoff_s * 2.0 ** min(max(attempts - 1, 0), 32), MAX_BACKOFF_S)


def _mac(body: bytes, secret: str, timestamp: int) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Webhook-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    return f"t={int(timestamp)},{SCHEME}={_mac(body, secret, int(timestamp))}"


def verify(
    header: str | None,
    body: bytes,
    secret: str,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """Does ``header`` sign ``body`` with ``secret``, within ``tolerance_s`` of ``now``?

    Malformed headers, a missing or non-integer timestamp, a stale (or far-future) timestamp and
    a wrong signature all give False. Several ``v1=`` entries are allowed (secret rotation); any
    one matching is enough. Comparison is constant-time.
    """
    if not header or not secret or not isinstance(header, str):
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isdigit() or len(value) > 12:
                return False
            timestamp = int(value)
        elif key == SCHEME:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _mac(body, secret, timestamp)
    found = False
    for candidate in candidates:  # check them all: no early exit that times the position
        found |= hmac.compare_digest(expected.encode(), candidate.strip().encode("ascii", "replace"))
    return found


def _parse(url: str) -> httpx.URL:
    """``url`` parsed by httpx, the parser of the client that sends it (one parser: no disagreement
    between the host checked and the host connected to); :class:`InputError` when malformed."""
    import httpx

    try:
        parsed = httpx.URL(url.strip())
        port = parsed.port
        host = parsed.host
    except (httpx.InvalidURL, ValueError, TypeError) as err:  # e.g. "http://[::1/": a clean 422
        raise InputError(f"webhook_url is not a valid URL ({err}): {url!r}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise InputError(f"webhook_url must be an absolute http:// or https:// URL, got {url!r}")
    if parsed.userinfo:
        raise InputError("webhook_url must not contain a user name or password")
    if port is not None and not 0 < port < 65536:
        raise InputError(f"webhook_url has an invalid port {port}")
    return parsed


def _host_port(target: httpx.URL) -> tuple[str, int]:
    """The host as the resolver takes it (IDNA-encoded; an IPv6 literal without brackets) and the port."""
    return target.raw_host.decode("ascii"), target.port or (443 if target.scheme == "https" else 80)


def check_webhook_url(url: str) -> str:
    """``url`` (stripped) if it is an absolute http(s) URL with a host, else :class:`InputError`."""
    _parse(url)
    return url.strip()


def check_webhook_target(url: str) -> str:
    """``url`` if every address its host resolves to is public, else :class:`InputError`.

    The submit-time check, for fast feedback: the rules are :mod:`latentdub.service.addresses`'.
    It protects nothing by itself (the name may resolve elsewhere later): :func:`deliver` resolves
    and checks again on every attempt, and connects to the address it checked.
    """
    host, port = _host_port(_parse(url))
    try:
        addresses.public_addresses(host, port)
    except addresses.NonPublicAddress as err:
        raise InputError(
            f"webhook_url: {err}; webhooks go to public addresses only (the server setting "
            "allow_private_webhooks allows others)"
        ) from None
    except addresses.UnresolvableHost as err:
        raise InputError(f"webhook_url: {err}") from None
    return url.strip()


class DeliveryLog(Protocol):
    """Where :func:`deliver` records a delivery (``JobStore.webhook_delivery_log()`` writes it to the
    database). Each call is a complete, durable write: a crash mid-way leaves an accurate record."""

    def started(self, webhook_id: str, job_id: str | None, event: str, url: str) -> None:
        """A new delivery, before its first attempt (no attempts yet)."""

    def attempted(
        self,
        webhook_id: str,
        *,
        attempts: int,
        status: int | None,
        error: str | None,
        delivered_at: dt.datetime | None,
        next_attempt_at: dt.datetime | None,
    ) -> None:
        """The state after an attempt: ``attempts`` in all (earlier runs included), the last HTTP
        status (None: no answer) and error (None: delivered, at ``delivered_at``), and when the
        next try is due (None: no further try follows)."""


@dataclass
class DeliveryResult:
    """How a webhook delivery ended."""

    delivered: bool
    attempts: int
    status: int | None  # the last HTTP status, None if the last attempt got no answer
    error: str | None  # the last network error or unexpected status, None when delivered
    webhook_id: str
    next_attempt_at: dt.datetime | None = None  # when a later run should try again (None: never)


def encode_event(event: str, payload: Mapping[str, Any], webhook_id: str, created: int) -> bytes:
    """The request body: ``{"id", "type", "created_at", "data"}`` as compact UTF-8 JSON."""
    envelope = {"id": webhook_id, "type": event, "created_at": created, "data": dict(payload)}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _post_pinned(
    http: httpx.Client,
    target: httpx.URL,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    allow_private: bool,
) -> httpx.Response:
    """POST ``body`` to ``target`` through an address resolved and checked now, not by the client.

    The URL given to the client names that address, so the client connects where the check looked
    (no second resolution to rebind); the ``Host`` header keeps the name, and for https the TLS
    server name (SNI and the certificate check) is the name too, through httpcore's
    ``sni_hostname`` request extension. The addresses are tried in the resolver's order while
    connecting fails (nothing has been sent then), as ``socket.create_connection`` would.
    """
    import httpx

    host, port = _host_port(target)
    found = addresses.resolve(host, port) if allow_private else addresses.public_addresses(host, port)
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    headers = {**headers, "Host": target.netloc.decode("ascii")}
    for i, address in enumerate(found):
        try:
            return http.post(
                target.copy_with(host=str(address)), content=body, headers=headers, timeout=timeout_s,
                follow_redirects=False, extensions=extensions,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if i == len(found) - 1:
                raise
    raise AssertionError("unreachable: resolve() returns at least one address")


def deliver(
    url: str,
    event: str,
    payload: Mapping[str, Any],
    secret: str,
    *,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 10.0,
    log: DeliveryLog | None = None,
    job_id: str | None = None,
    client: Any = None,
    sleep: Callable[[float], None] = time.sleep,
    webhook_id: str | None = None,
    created_at: dt.datetime | None = None,
    attempts_before: int = 0,
    allow_private: bool = False,
    retry_until: dt.datetime | None = None,
) -> DeliveryResult:
    """POST the event to ``url``, signed, retrying up to ``retries`` times.

    The delay after the event's ``n``-th failed attempt (earlier runs' included) is
    :func:`backoff_delay` ``(n, backoff_s)``: ``backoff_s * 2**(n-1)``, at most 10 minutes.
    Redirects are not followed. Once this call's retries are spent, a retryable failure still gets a
    next attempt time (``next_attempt_at`` in the log and the result) if it falls before
    ``retry_until``: a later run sends it then (the service's redelivery loop); without
    ``retry_until``, or past it, the event is given up.

    Every attempt resolves the host again, refuses it if any of its addresses is not public
    (:mod:`latentdub.service.addresses`; ``allow_private`` skips that check, the server setting
    ``allow_private_webhooks``) and connects to an address it checked, so a name that resolved to a
    public address when the job was submitted cannot be turned to an internal one later (DNS
    rebinding). A refused attempt is recorded as failed (``error`` starts with ``"refused:"``) and
    is not retried; a name that does not resolve is retried like a network error.

    With a ``log``, the delivery is recorded there: ``started`` once
    for a new delivery, then ``attempted`` after every attempt (the attempts, the last status or
    error, the delivery time, the next attempt time), so a crash mid-way leaves an accurate
    record. ``client``: an ``httpx.Client`` to use (tests); one is made otherwise, without
    environment proxies (a proxy would resolve the name itself, and its TLS tunnel would check the
    certificate against the address). A client shared between hosts could reuse a TLS connection
    made for one name for another name on the same address: give each delivery its own.

    To send an event already recorded (the service records it before the first attempt) or an
    undelivered one again, pass its ``webhook_id`` (it stays the ``Webhook-Id``), its ``created_at``
    (the envelope's creation time) and ``attempts_before``, the attempts made so far (the count and
    the backoff go on from there); ``started`` is not called then.
    """
    import httpx

    target = _parse(url)
    url = url.strip()
    if webhook_id is not None:  # a redelivery: the same Webhook-Id and creation time
        created = int((created_at or dt.datetime.now(dt.UTC)).timestamp())
    else:
        webhook_id = str(uuid.uuid4())
        created = int(time.time())
        attempts_before = 0
        if log is not None:
            log.started(webhook_id, job_id, event, url)
    body = encode_event(event, payload, webhook_id, created)

    own_client = client is None
    http = client if client is not None else httpx.Client(
        timeout=timeout_s, follow_redirects=False, trust_env=False
    )
    attempts, status, error = 0, None, None
    next_at: dt.datetime | None = None
    try:
        for attempt in range(max(0, int(retries)) + 1):
            attempts = attempt + 1
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "latentdub-webhooks/1",
                SIGNATURE_HEADER: sign(body, secret, timestamp),
                ID_HEADER: webhook_id,
                TIMESTAMP_HEADER: str(timestamp),
            }
            retry = False
            try:
                response = _post_pinned(
                    http, target, body, headers, timeout_s=timeout_s, allow_private=allow_private
                )
            except addresses.NonPublicAddress as err:  # never sent; retrying soon will not change it
                status, error, retry = None, f"refused: {err}", False
            except addresses.UnresolvableHost as err:  # DNS trouble can be temporary
                status, error, retry = None, f"UnresolvableHost: {err}", True
            except httpx.HTTPError as err:
                status, error, retry = None, f"{type(err).__name__}: {err}", True
            else:
                status = response.status_code
                if 200 <= status < 300:
                    error = None
                else:
                    error = f"HTTP {status}"
                    retry = status >= 500 or status == 429
            delay = backoff_delay(attempts_before + attempts, backoff_s)
            more = retry and attempt < retries
            now = dt.datetime.now(dt.UTC)
            due = now + dt.timedelta(seconds=delay)
            next_at = due if more or (retry and retry_until is not None and due <= retry_until) else None
            if log is not None:
                log.attempted(
                    webhook_id,
                    attempts=attempts_before + attempts,
                    status=status,
                    error=error,
                    delivered_at=now if error is None else None,
                    next_attempt_at=next_at,
                )
            if not more:
                break
            sleep(delay)
    finally:
        if own_client:
            http.close()
    return DeliveryResult(error is None, attempts, status, error, webhook_id, next_at)
