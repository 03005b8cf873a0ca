"""Webhook SSRF through DNS rebinding (issue 17 §2): every delivery attempt resolves the name, checks
every address and connects to the address it checked, keeping the Host header and the TLS name.

The resolver is a stub put in place of ``socket.getaddrinfo`` (the one the HTTP client uses too),
so a name can answer a public address when the job is submitted and 127.0.0.1 when it is delivered.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from latentdub.errors import InputError
from latentdub.service.db import open_database, session_factory
from latentdub.service.models import WebhookDelivery
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore
from latentdub.service.webhooks import check_webhook_target, check_webhook_url, deliver

SECRET = "whsec_ssrf_test"
PUBLIC = "93.184.216.34"  # example.org's long-time address: public, and never contacted here


class FakeDns:
    """``socket.getaddrinfo`` for made-up names: each name answers its planned lists in turn (the
    last one repeats); every other name goes to the real resolver. Lookups are counted per name."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.plans: dict[str, list[list[str]]] = {}
        self.lookups: dict[str, int] = {}

    def plan(self, name: str, *answers: list[str]) -> None:
        self.plans[name] = list(answers)
        self.lookups[name] = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.plans:
            return self.real(host, port, *args, **kwargs)
        self.lookups[name] += 1
        answers = self.plans[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        infos = []
        for text in addresses:
            if ipaddress.ip_address(text).version == 6:
                family, sockaddr = socket.AF_INET6, (text, int(port), 0, 0)
            else:
                family, sockaddr = socket.AF_INET, (text, int(port))
            infos.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The address check with 127.0.0.1 (only) counted as public: the local server plays a public one."""
    from latentdub.service import addresses

    real = addresses.refusal
    monkeypatch.setattr(addresses, "refusal", lambda a: None if str(a) == "127.0.0.1" else real(a))


class Server:
    """An HTTP(S) server on 127.0.0.1 that records every request (headers, path, TLS server name)."""

    def __init__(self, tls: ssl.SSLContext | None = None, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        self.server_names: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.requests.append({"headers": dict(self.headers), "path": self.path, "body": body})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    engine = open_database(f"sqlite:///{tmp_path / 'service.db'}")
    yield JobStore(engine)
    engine.dispose()


def _row(store: JobStore) -> WebhookDelivery:
    with session_factory(store.engine)() as session:
        return session.scalars(select(WebhookDelivery)).one()


# -- DNS rebinding: public at submit, loopback at delivery ----------------------------------------
def test_a_name_rebound_to_loopback_after_submit_is_not_posted_to(
    dns: FakeDns, store: JobStore, tmp_path: Path
) -> None:
    from latentdub.service.jobs import send_webhook

    settings = ServiceSettings(data_dir=tmp_path / "data", webhook_secret=SECRET,
                               webhook_backoff_s=0.0)
    with Server() as local:
        url = f"http://rebind.example:{local.port}/hook"
        dns.plan("rebind.example", [PUBLIC], ["127.0.0.1"])
        assert check_webhook_target(url) == url  # submit: public, accepted
        job, _ = store.create(options={}, webhook_url=url)
        send_webhook(job, store, settings)  # delivery: the name now answers 127.0.0.1
    assert local.requests == []  # nothing reached the local server
    row = _row(store)
    assert row.url == url and row.delivered_at is None
    assert row.attempts == 1 and row.next_attempt_at is None  # refused, and not retried
    assert row.last_status is None and row.last_error.startswith("refused")
    assert "127.0.0.1" in row.last_error
    assert dns.lookups["rebind.example"] == 2  # resolved again at delivery


def test_a_redelivery_after_a_restart_checks_the_address_again(
    dns: FakeDns, store: JobStore, tmp_path: Path
) -> None:
    from latentdub.service.jobs import redeliver_webhooks

    settings = ServiceSettings(data_dir=tmp_path / "data", webhook_secret=SECRET,
                               webhook_backoff_s=0.0)
    with Server() as local:
        url = f"http://rebind.example:{local.port}/hook"
        job, _ = store.create(options={}, webhook_url=url)
        log = store.webhook_delivery_log()  # an earlier run: one failed attempt, a retry planned
        log.started("hook-1", job.id, "job.succeeded", url)
        log.attempted("hook-1", attempts=1, status=503, error="HTTP 503", delivered_at=None,
                      next_attempt_at=dt.datetime.now(dt.UTC))
        dns.plan("rebind.example", ["127.0.0.1"])
        assert redeliver_webhooks(store, settings) == []
    assert local.requests == []
    row = _row(store)
    assert row.id == "hook-1" and row.attempts == 2 and row.delivered_at is None
    assert row.last_error.startswith("refused") and row.next_attempt_at is None


def test_a_name_with_one_private_address_among_public_ones_is_refused(dns: FakeDns) -> None:
    with Server() as local:
        url = f"http://mixed.example:{local.port}/hook"
        dns.plan("mixed.example", [PUBLIC, "127.0.0.1"])
        with pytest.raises(InputError, match="allow_private_webhooks"):
            check_webhook_target(url)
        result = deliver(url, "job.failed", {}, SECRET, retries=3, sleep=lambda s: None)
    assert not result.delivered and result.attempts == 1 and result.error.startswith("refused")
    assert local.requests == []


# -- the address rules ----------------------------------------------------------------------------
TEREDO_CLIENT_LOOPBACK = str(  # Teredo: 2001:0:server:flags:port:client, port and client bits inverted
    ipaddress.IPv6Address((0x2001_0000 << 96) | (int(ipaddress.IPv4Address("65.54.227.120")) << 64)
                          | (0x8000 << 48) | ((0xFFFF ^ 40000) << 32)
                          | (0xFFFFFFFF ^ int(ipaddress.IPv4Address("127.0.0.1"))))
)

REFUSED = [
    # IPv4
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.0.5", "169.254.169.254",
    "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1",
    "198.18.0.1", "192.0.2.1",
    # IPv6
    "::1", "::", "fe80::1", "fd00::1", "fc00::1", "ff02::1", "fec0::1", "2001:db8::1",
    # IPv4 embedded in IPv6
    "::7f00:1",  # IPv4-compatible ::127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible ::169.254.169.254
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:1::",  # 6to4 of 127.0.0.1, 169.254.169.254, 192.168.0.1
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe",  # NAT64: 127.0.0.1, 10.0.0.1, 169.254.169.254
    "64:ff9b:1::7f00:1", "64:ff9b:1::808:808",  # local-use NAT64: never public
    TEREDO_CLIENT_LOOPBACK,
]

ALLOWED = [
    PUBLIC, "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:81c::200e",
    "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1",  # 93.184.216.34, mapped / NAT64 / 6to4
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused_at_submit_and_at_delivery(dns: FakeDns, address: str) -> None:
    url = "https://target.example/hook"
    dns.plan("target.example", [address])
    with pytest.raises(InputError, match="allow_private_webhooks"):
        check_webhook_target(url)
    sleeps: list[float] = []
    result = deliver(url, "job.failed", {}, SECRET, retries=3, sleep=sleeps.append, timeout_s=2)
    assert not result.delivered and result.status is None and result.error.startswith("refused")
    assert result.attempts == 1 and sleeps == []


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_address_literals_are_refused(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(InputError, match="allow_private_webhooks"):
        check_webhook_target(f"http://{host}:8080/hook")


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass_the_check(dns: FakeDns, address: str) -> None:
    dns.plan("public.example", [address])
    assert check_webhook_target("https://public.example/hook") == "https://public.example/hook"


def test_malformed_urls_give_a_clean_input_error() -> None:
    for bad in ("http://[::1/", "http://[::1", "https://example.org:notaport/", "http://example.org:99999/"):
        with pytest.raises(InputError, match="webhook_url"):
            check_webhook_url(bad)
        with pytest.raises(InputError, match="webhook_url"):
            check_webhook_target(bad)


def test_malformed_webhook_url_is_a_422_from_the_api(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from latentdub.service.app import create_app
    from latentdub.service.auth import create_key

    def no_model() -> Any:
        raise RuntimeError("test: no model")

    app = create_app(ServiceSettings(data_dir=tmp_path / "data"), pipe_factory=no_model)
    with TestClient(app, raise_server_exceptions=False) as client:
        key, _ = create_key(app.state.store.engine, "ssrf")
        form = {"consent": '{"subject": "A", "granted_by": "A", "method": "form", "evidence": "d"}',
                "webhook_url": "http://[::1/", "video_asset_id": "x", "audio_asset_id": "y"}
        r = client.post("/api/v1/jobs", data=form, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_webhook_url" and err.get("field") == "webhook_url"
    assert "Traceback" not in r.text


# -- the connection goes to the checked address, with the name kept --------------------------------
def test_delivery_connects_to_the_checked_address_with_the_host_header(
    dns: FakeDns, allow_loopback: None
) -> None:
    with Server(status=503) as local:
        url = f"http://hooks.example:{local.port}/hook?x=1"
        dns.plan("hooks.example", ["127.0.0.1"])
        result = deliver(url, "job.succeeded", {"n": 1}, SECRET, retries=1, sleep=lambda s: None)
    assert not result.delivered and result.attempts == 2 and result.status == 503
    assert [r["headers"]["Host"] for r in local.requests] == [f"hooks.example:{local.port}"] * 2
    assert [r["path"] for r in local.requests] == ["/hook?x=1"] * 2
    assert dns.lookups["hooks.example"] == 2  # once per attempt, by the check; never by the client


def test_the_client_is_given_the_address_the_name_and_no_redirects(dns: FakeDns) -> None:
    import httpx

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://127.0.0.1/internal"})

    dns.plan("v6.example", ["2606:4700:4700::1111"])
    with httpx.Client(transport=httpx.MockTransport(answer), follow_redirects=True) as client:
        result = deliver("https://v6.example:8443/hook", "job.failed", {}, SECRET, client=client, retries=2,
                         sleep=lambda s: None)
    assert not result.delivered and result.status == 302 and result.attempts == 1  # final, not followed
    (request,) = seen
    assert request.url.host == "2606:4700:4700::1111" and request.url.port == 8443
    assert request.url.path == "/hook" and request.url.scheme == "https"
    assert request.headers["Host"] == "v6.example:8443"
    assert request.extensions["sni_hostname"] == "v6.example"


def _tls(tmp_path: Path, names: list[str], ips: list[str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``names`` / ``ips`` from a fresh CA, and a client
    context that trusts only that CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def test_https_delivery_sends_the_name_as_sni_and_verifies_the_certificate_for_it(
    dns: FakeDns, allow_loopback: None, tmp_path: Path
) -> None:
    import httpx

    server_tls, client_tls = _tls(tmp_path, ["hooks.example"], [])
    dns.plan("hooks.example", ["127.0.0.1"])
    with Server(tls=server_tls) as local, httpx.Client(verify=client_tls) as client:
        url = f"https://hooks.example:{local.port}/hook"
        result = deliver(url, "job.succeeded", {}, SECRET, client=client, retries=0)
    assert result.delivered and result.status == 200, result.error
    assert local.server_names == ["hooks.example"]
    assert [r["headers"]["Host"] for r in local.requests] == [f"hooks.example:{local.port}"]


def test_https_delivery_refuses_a_certificate_for_the_address_but_not_the_name(
    dns: FakeDns, allow_loopback: None, tmp_path: Path
) -> None:
    import httpx

    server_tls, client_tls = _tls(tmp_path, ["other.example"], ["127.0.0.1"])
    dns.plan("hooks.example", ["127.0.0.1"])
    with Server(tls=server_tls) as local, httpx.Client(verify=client_tls) as client:
        url = f"https://hooks.example:{local.port}/hook"
        result = deliver(url, "job.succeeded", {}, SECRET, client=client, retries=0)
    assert not result.delivered and result.status is None
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "")
    assert local.requests == []
