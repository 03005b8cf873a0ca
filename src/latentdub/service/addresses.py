"""Which network addresses the service may send requests to (webhooks): public unicast only.

The one home of the address rules. :func:`refusal` says why an address is not public (or None);
:func:`public_addresses` resolves a host name and refuses it if *any* of its addresses is not
public, so that the caller can then connect to one of exactly the addresses checked here (a
second resolution by the HTTP client could answer differently: DNS rebinding).

Python's ``ipaddress.is_global`` alone is not enough (3.11 calls ``::7f00:1``, ``2002:7f00:1::``,
``64:ff9b::7f00:1`` and ``fec0::1`` global), so the ranges are listed here, IPv6 is allowed only
inside global unicast ``2000::/3`` (plus IPv4-mapped and NAT64, judged by their IPv4), and every
IPv4 address embedded in an IPv6 one (mapped, NAT64, 6to4, Teredo) must be public itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from latentdub.errors import InputError

IPAddress = IPv4Address | IPv6Address

# IANA special-purpose IPv4 ranges that are not globally reachable (RFC 6890 and updates).
_BLOCKED_V4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified / this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved / broadcast"),
    )
)

_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_MAPPED = IPv6Network("::ffff:0:0/96")
_NAT64 = IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the IPv4 address
_SIXTOFOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")

# Outside 2000::/3 everything is refused; these only name the reason.
_NAMED_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)

# Inside 2000::/3 but not globally reachable.
_BLOCKED_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "IETF protocol assignment (Teredo, benchmarking, ORCHID)"),
        ("3fff::/20", "documentation"),
    )
)


class UnresolvableHost(InputError):
    """A host name did not resolve (no address, or a resolver error): may be temporary."""


class NonPublicAddress(InputError):
    """A host resolved to an address that is not public: the request must not be sent."""

    def __init__(self, host: str, address: IPAddress, reason: str) -> None:
        super().__init__(f"the host {host!r} resolves to {address}, which is not public ({reason})")
        self.host, self.address, self.reason = host, address, reason


def _refusal_v4(address: IPv4Address) -> str | None:
    for net, why in _BLOCKED_V4:
        if address in net:
            return why
    if not address.is_global or address.is_multicast:  # anything Python knows that the table lacks
        return "non-global"
    return None


def _embedded(address: IPv6Address) -> list[tuple[IPv4Address, str]]:
    """The IPv4 addresses a 6to4 or Teredo address carries, each with the form's name."""
    found: list[tuple[IPv4Address, str]] = []
    if address in _SIXTOFOUR and address.sixtofour is not None:
        found.append((address.sixtofour, "6to4"))
    if address in _TEREDO and address.teredo is not None:
        server, client = address.teredo
        found += [(server, "Teredo server"), (client, "Teredo client")]
    return found


def _refusal_v6(address: IPv6Address) -> str | None:
    address = IPv6Address(int(address))  # drop a scope id: it changes nothing about the range
    if address in _MAPPED or address in _NAT64:  # these reach the IPv4 address in the last 32 bits
        embedded = IPv4Address(int(address) & 0xFFFFFFFF)
        why = _refusal_v4(embedded)
        kind = "IPv4-mapped" if address in _MAPPED else "NAT64"
        return None if why is None else f"{kind} {why} ({embedded})"
    if address not in _GLOBAL_UNICAST_V6:
        return next((why for net, why in _NAMED_V6 if address in net), "reserved")
    for embedded, kind in _embedded(address):
        why = _refusal_v4(embedded)
        if why is not None:
            return f"{kind} {why} ({embedded})"
    for net, why in _BLOCKED_V6:
        if address in net:
            return why
    if not address.is_global:
        return "non-global"
    return None


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not public (``"loopback"``, ``"NAT64 private (10.0.0.1)"``, …); None if it is."""
    if isinstance(address, IPv6Address):
        return _refusal_v6(address)
    return _refusal_v4(address)


def is_public(address: IPAddress) -> bool:
    return refusal(address) is None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every TCP address of ``host`` (a name or an address literal), in the resolver's order, once each."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as err:
        raise UnresolvableHost(f"the host {host!r} does not resolve ({err})") from None
    found: list[IPAddress] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise UnresolvableHost(f"the host {host!r} has no IPv4 or IPv6 address")
    return found


def public_addresses(
    host: str, port: int, *, resolver: Callable[[str, int], Sequence[IPAddress]] | None = None
) -> list[IPAddress]:
    """The addresses of ``host``, all checked public; :class:`NonPublicAddress` if any one is not.

    One non-public answer refuses the host: a name that mixes public and private addresses is
    either misconfigured or an attempt to reach the private one.
    """
    addresses = list((resolver or resolve)(host, port))
    for address in addresses:
        why = refusal(address)
        if why is not None:
            raise NonPublicAddress(host, address, why)
    return addresses
