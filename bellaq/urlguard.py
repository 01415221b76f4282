"""Callback URL safety check (SSRF guard).

A callback URL is accepted only if it is ``http``/``https`` with a host, and every address the
host resolves to is a public one: loopback, link-local (cloud metadata), private, shared (CGNAT),
multicast, reserved and unspecified addresses are refused, for IPv4 and IPv6, including IPv4
embedded in IPv6 (``::ffff:a.b.c.d``, 6to4, Teredo, NAT64). The operator can allow private
targets wholesale (``allow_private``) or by allowlist entry: a hostname, ``host:port``, an IP or a
CIDR network.

The check resolves names at the time it is called; the deliverer should call it again right
before each delivery attempt, since DNS answers can change.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_FIX = "use a public http(s) URL, or ask the operator to allow this host (BELLAQ_CALLBACK_ALLOWLIST)"


class UnsafeURL(ValueError):
    """The callback URL is malformed or points somewhere it must not."""


def parse_allowlist(allowlist: Iterable[str] | str) -> tuple[set[str], list[IPNetwork]]:
    """Split allowlist entries into (hostnames / host:port strings, IP networks).

    A string is split on commas and whitespace, so a raw setting can be passed as is.
    """
    if isinstance(allowlist, str):
        allowlist = allowlist.replace(",", " ").split()
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in allowlist:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry)
    return names, networks


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address carried inside an IPv6 one (mapped, 6to4, Teredo, NAT64), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a safe callback target (e.g. ``"a loopback address"``), or None if it is."""
    inner = _embedded_ipv4(ip)
    for candidate in (inner, ip) if inner is not ip else (ip,):
        if candidate.is_unspecified:
            return "an unspecified address"
        if candidate.is_loopback:
            return "a loopback address"
        if candidate.is_link_local:
            return "a link-local address"
        if candidate.is_multicast:
            return "a multicast address"
        if candidate.is_private:
            return "a private address"
    if inner.is_reserved:
        return "a reserved address"
    if not inner.is_global:
        return "a non-public address"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_matches(names: set[str], host: str, port: int) -> bool:
    if not names:
        return False
    shown = f"[{host}]" if ":" in host else host
    return host in names or f"{shown}:{port}" in names


def check_callback_url(url: str, allow_private: bool = False, allowlist: Iterable[str] | str = ()) -> None:
    """Raise UnsafeURL unless ``url`` is a safe callback target.

    Allowed are http/https URLs whose host resolves only to public addresses; a host listed in
    ``allowlist`` (as ``host`` or ``host:port``) is accepted without resolving it, and private
    addresses inside an allowlisted IP/CIDR entry are accepted. ``allow_private`` accepts any
    address (the host must still resolve).
    """
    if not isinstance(url, str) or not url:
        raise UnsafeURL(
            "callback_url is empty; send an absolute http(s) URL such as https://example.com/hook"
        )
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeURL("callback_url contains whitespace or control characters; send a plain http(s) URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"callback_url is not a valid URL ({exc}); send an absolute http(s) URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeURL(
            f"callback_url scheme {scheme + '://' if scheme else '(none)'} is not allowed; use http:// or https://"
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeURL("callback_url has no host; send an absolute URL such as https://example.com/hook")
    if "%" in host:
        raise UnsafeURL(
            "callback_url host has an IPv6 zone id; link-local addresses are not allowed, " + _FIX
        )
    if port == 0:
        raise UnsafeURL("callback_url has port 0; use a real port or none")
    port = port or _DEFAULT_PORTS[scheme]

    names, networks = parse_allowlist(allowlist)
    if _host_matches(names, host, port):
        return

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    if not addresses:
        raise UnsafeURL(f"cannot resolve callback_url host {host!r}; use a host name that resolves in DNS")
    if allow_private:
        return
    for ip in addresses:
        problem = address_problem(ip)
        if problem is None:
            continue
        inner = _embedded_ipv4(ip)
        if any(ip in net or inner in net for net in networks):
            continue
        shown = host if _literal(host) == ip else f"{host!r} (resolves to {ip})"
        raise UnsafeURL(f"callback_url host {shown} is {problem}, which is not allowed; {_FIX}")
