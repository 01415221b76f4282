"""Callback URL guard (SSRF): which callback URLs are accepted, and where a delivery may connect.

One strict parser (:func:`parse_callback_url`) decides the scheme, host, port and request target,
and refuses every URL that two parsers could read two ways: userinfo (``user@host``), a backslash,
whitespace, control or non-ASCII characters, a percent sign in the authority, a host that ends in a
number but is not a plain dotted quad (``2130706433``, ``0177.0.0.1``, ``0x7f.0.0.1``, ``127.1``),
an empty host or label, an empty port, a fragment, and schemes other than http/https. A trailing
dot is dropped from the host (``example.com.`` is ``example.com`` everywhere: checks, allowlist,
``Host`` header, TLS name).

:func:`resolve` then looks the host up once and checks every address it resolves to: loopback,
link-local (cloud metadata), private, shared (CGNAT), multicast, reserved and unspecified
addresses are refused, for IPv4 and IPv6, including IPv4 carried inside IPv6 (mapped, compatible,
6to4, Teredo, NAT64). The delivery connects to one of the addresses it returns
(:mod:`workers.pinned_http`), so a name cannot resolve to one address for the check and another
for the connection. The operator allows private targets wholesale (``allow_private``) or by
allowlist entry: a host name, ``host:port``, an IP or a CIDR network.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048  # the width of tasks.callback_url
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_DECIMAL_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")
_FIX = "use a public http(s) URL, or ask the operator to allow this host (BELLAQ_CALLBACK_ALLOWLIST)"


class UnsafeURL(ValueError):
    """The callback URL is malformed or points somewhere it must not."""


@dataclass(frozen=True)
class CallbackURL:
    """A callback URL as the one parser reads it."""

    scheme: str  # "http" or "https"
    host: str  # lower case, no trailing dot; an IP literal in canonical form, IPv6 without brackets
    port: int
    target: str  # the request target: path and query, never empty
    ip: IPAddress | None  # the host when it is an IP literal

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the host, with the port when it is not the scheme's default."""
        shown = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return shown if self.port == DEFAULT_PORTS[self.scheme] else f"{shown}:{self.port}"


@dataclass(frozen=True)
class Destination:
    """A checked callback URL and the addresses a delivery may connect to (in resolver order)."""

    url: CallbackURL
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class Policy:
    """What the operator allows besides public addresses (from one allowlist parser)."""

    allow_private: bool = False
    names: frozenset[str] = frozenset()  # "host" or "host:port", normalised as URLs' hosts are
    networks: tuple[IPNetwork, ...] = ()

    def allows_name(self, url: CallbackURL) -> bool:
        return url.host in self.names or _host_port(url.host, url.ip, url.port) in self.names

    def allows_address(self, ip: IPAddress) -> bool:
        inner = embedded_ipv4(ip)
        return any(ip in net or inner in net for net in self.networks)


def _host_port(host: str, ip: IPAddress | None, port: int) -> str:
    return f"[{host}]:{port}" if isinstance(ip, ipaddress.IPv6Address) else f"{host}:{port}"


# ------------------------------------------------------------------------------------ parsing

def parse_callback_url(url: str) -> CallbackURL:
    """Read ``url`` strictly; raise UnsafeURL for anything two parsers could read two ways."""
    if not isinstance(url, str) or not url:
        raise UnsafeURL("callback_url is empty; send an absolute http(s) URL such as https://example.com/hook")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"callback_url is longer than {MAX_URL_LENGTH} characters; send a shorter http(s) URL")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise UnsafeURL("callback_url contains whitespace, control or non-ASCII characters; send a plain "
                        "http(s) URL (percent-encode the path, write international domain names as xn--)")
    if "\\" in url:
        raise UnsafeURL("callback_url contains a backslash, which URL parsers read differently; "
                        "send a plain http(s) URL (percent-encode it as %5C in the path)")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        shown = scheme + "://" if sep and scheme else "(none)"
        raise UnsafeURL(f"callback_url scheme {shown} is not allowed; use http:// or https://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, target = rest[:end], rest[end:]
    if "#" in target:
        raise UnsafeURL("callback_url has a #fragment, which is never sent; remove it")
    if "@" in authority:
        raise UnsafeURL("callback_url has userinfo (user@host), which is not allowed; "
                        "send a plain http(s) URL and authenticate with the webhook signature")
    host, ip, port = parse_authority(authority, scheme)
    if not target.startswith("/"):
        target = "/" + target
    return CallbackURL(scheme=scheme, host=host, port=port, target=target, ip=ip)


def parse_authority(authority: str, scheme: str = "http") -> tuple[str, IPAddress | None, int]:
    """``host[:port]`` -> (normalised host, the IP if it is a literal, port). Raises UnsafeURL."""
    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise UnsafeURL("callback_url has an unclosed [ in its host; write IPv6 addresses as [2001:db8::1]")
        if "%" in literal:
            raise UnsafeURL("callback_url host has an IPv6 zone id; link-local addresses are not allowed, " + _FIX)
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(literal)
        except ValueError:
            raise UnsafeURL(f"callback_url host [{literal}] is not a valid IPv6 address") from None
        host = str(ip)
        port_part = after
    else:
        host, colon, port_text = authority.partition(":")
        port_part = colon + port_text
        host, ip = _parse_host(host.lower())
    if not port_part:
        return host, ip, DEFAULT_PORTS[scheme]
    digits = port_part[1:]
    if not port_part.startswith(":") or not _PORT.fullmatch(digits):
        raise UnsafeURL(f"callback_url port {port_part[1:] or '(empty)'!r} is not a valid URL port; "
                        "write it as :1 to :65535, or leave it out")
    port = int(digits)
    if port == 0:
        raise UnsafeURL("callback_url has port 0; use a real port or none")
    if port > 65535:
        raise UnsafeURL(f"callback_url port {port} is not a valid URL port; use 1 to 65535")
    return host, ip, port


def _parse_host(host: str) -> tuple[str, IPAddress | None]:
    if "%" in host:
        raise UnsafeURL("callback_url host contains a percent sign; write the host name plainly")
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise UnsafeURL("callback_url has no host; send an absolute URL such as https://example.com/hook")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeURL(f"callback_url host {host!r} is not a valid host name (letters, digits, '-' and '_' "
                        "in dot-separated labels of 1 to 63 characters)")
    # Browsers read a host whose last label is a number as an IPv4 address in any base; resolvers
    # may not. Only the plain dotted quad means the same to every parser.
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return host, None
    if len(labels) != 4 or not all(_DECIMAL_OCTET.fullmatch(label) and int(label) < 256 for label in labels):
        raise UnsafeURL(f"callback_url host {host!r} is a non-canonical IP address form; "
                        "write IPv4 addresses as four decimal numbers, such as 203.0.113.7")
    return host, ipaddress.IPv4Address(host)


@functools.lru_cache(maxsize=16)
def parse_allowlist(raw: str) -> Policy:
    """The allowlist setting (entries separated by commas or spaces) as a Policy without
    ``allow_private``. Entries: a host name or ``host:port`` (read like a URL's authority), an IP,
    or a CIDR network. An entry that is none of these is ignored, with a warning."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in raw.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        try:
            host, ip, port = parse_authority(entry.lower())
        except UnsafeURL:
            log.warning("ignoring callback allowlist entry %r: not a host, host:port, IP or CIDR network", entry)
            continue
        has_port = entry.rfind(":") > entry.rfind("]")
        names.add(_host_port(host, ip, port) if has_port else host)
    return Policy(names=frozenset(names), networks=tuple(networks))


def policy(allow_private: bool = False, allowlist: Iterable[str] | str = "") -> Policy:
    """The policy of the settings ``BELLAQ_CALLBACK_ALLOW_PRIVATE`` and ``BELLAQ_CALLBACK_ALLOWLIST``
    (the allowlist as the raw setting, or as a list of its entries)."""
    raw = allowlist if isinstance(allowlist, str) else ",".join(allowlist)
    base = parse_allowlist(raw)
    return Policy(allow_private=allow_private, names=base.names, networks=base.networks)


# ---------------------------------------------------------------------------------- addresses

def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address carried inside an IPv6 one (mapped, compatible, translated, 6to4, Teredo,
    NAT64), else ``ip``."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a safe callback target (e.g. ``"a loopback address"``), or None if it is.

    An IPv6 address that carries an IPv4 one is judged by the IPv4 address it carries.
    """
    ip = embedded_ipv4(ip)
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _lookup(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        except ValueError:
            continue
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def resolve(url: str | CallbackURL, rules: Policy) -> Destination:
    """Parse ``url``, resolve its host once and check every address; raise UnsafeURL if any is
    refused. The delivery connects only to the returned addresses."""
    parsed = url if isinstance(url, CallbackURL) else parse_callback_url(url)
    addresses = [parsed.ip] if parsed.ip is not None else _lookup(parsed.host, parsed.port)
    if not addresses:
        raise UnsafeURL(f"cannot resolve callback_url host {parsed.host!r}; use a host name that resolves in DNS")
    if rules.allow_private or rules.allows_name(parsed):
        return Destination(parsed, tuple(addresses))
    for ip in addresses:
        problem = address_problem(ip)
        if problem is not None and not rules.allows_address(ip):
            # Never the address a name resolved to: a user must not learn the internal network.
            what = f"{parsed.host} is" if parsed.ip is not None else f"{parsed.host!r} resolves to"
            raise UnsafeURL(f"callback_url host {what} {problem}, which is not allowed; {_FIX}")
    return Destination(parsed, tuple(addresses))


def check_callback_url(url: str, allow_private: bool = False, allowlist: Iterable[str] | str = "") -> None:
    """Raise UnsafeURL unless ``url`` is a safe callback target (the check a put makes).

    A host named in the allowlist (as ``host`` or ``host:port``) is accepted without resolving it;
    otherwise the host must resolve, and every address must be public, allowed by an allowlisted
    IP/CIDR entry, or ``allow_private`` must be set.
    """
    rules = policy(allow_private, allowlist)
    parsed = parse_callback_url(url)
    if rules.allows_name(parsed):
        return
    resolve(parsed, rules)
