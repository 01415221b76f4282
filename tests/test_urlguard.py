"""Callback URL guard: table-driven, using only literal IPs and ``localhost`` (no DNS needed)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import pytest
from urllib3.util import parse_url

from bellaq import urlguard
from bellaq.urlguard import UnsafeURL, check_callback_url, parse_allowlist, parse_callback_url, policy, resolve

REFUSED = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.8.9.10:8080/hook", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://LOCALHOST.:9000/hook", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://100.64.0.1/hook", "non-public"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::]/hook", "unspecified"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[fc00::1]/hook", "private"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[::ffff:10.0.0.1]/hook", "private"),
    ("http://[::ffff:169.254.169.254]/hook", "link-local"),
    ("http://[2002:7f00:1::]/hook", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("http://[64:ff9b::a00:1]/hook", "private"),  # NAT64 wrapping 10.0.0.1
    ("http://[::127.0.0.1]/hook", "loopback"),  # IPv4-compatible
    ("http://[::ffff:7f00:1]/hook", "loopback"),  # mapped, written in hex
    ("http://[0:0:0:0:0:ffff:127.0.0.1]/hook", "loopback"),
    ("http://[::ffff:0:7f00:1]/hook", "loopback"),  # IPv4-translated
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", "loopback"),  # Teredo, client 127.0.0.1
    ("http://[64:ff9b:1::a00:1]/hook", "reserved"),  # local-use NAT64
    ("http://[fec0::1]/hook", "private"),  # site-local
    ("http://127.0.0.1./hook", "loopback"),  # a trailing dot changes nothing
    ("http://255.255.255.255/hook", "private"),
    ("http://240.0.0.1/hook", "private"),
    ("http://198.18.0.1/hook", "private"),  # benchmarking
]

MALFORMED = [
    ("ftp://8.8.8.8/x", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://8.8.8.8/", "scheme"),
    ("8.8.8.8/hook", "scheme"),
    ("//8.8.8.8/hook", "scheme"),
    ("", "empty"),
    ("http://", "no host"),
    ("http:///hook", "no host"),
    ("https://:443/hook", "no host"),
    ("http://8.8.8.8:99999/", "not a valid URL port"),
    ("http://8.8.8.8:0/", "port 0"),
    ("http://8.8.8.8:/", "not a valid URL port"),
    ("http://8.8.8.8:+80/", "not a valid URL port"),
    ("http://8.8.8.8:80:80/", "not a valid URL port"),
    ("http://8.8.8.8/a b", "whitespace"),
    ("http://8.8.8.8/\r\nX-Injected: 1", "whitespace"),
    ("http://8.8.8.8/\x00", "control"),
    ("http://8.8.8.8/\x7f", "control"),
    ("http://ex\u00e4mple.com/", "non-ASCII"),
    ("http://8.8.8.8/\u2028", "non-ASCII"),
    ("http://[fe80::1%25eth0]/", "zone id"),
    # parsers disagree on these: refused whatever they point at
    ("http://evil.example\\@8.8.8.8/", "backslash"),
    ("http://8.8.8.8\\.evil.example/", "backslash"),
    ("http://8.8.8.8/a\\b", "backslash"),
    ("https://user:pw@8.8.8.8/hook", "userinfo"),
    ("https://user@8.8.8.8/hook", "userinfo"),
    ("https://@8.8.8.8/hook", "userinfo"),
    ("http://8.8.8.8@127.0.0.1/", "userinfo"),
    ("http://2130706433/hook", "non-canonical"),  # 127.0.0.1 as one number
    ("http://0177.0.0.1/hook", "non-canonical"),  # octal
    ("http://0x7f.0.0.1/hook", "non-canonical"),  # hex
    ("http://0x7f000001/hook", "non-canonical"),
    ("http://127.1/hook", "non-canonical"),  # shortened
    ("http://127.0.1/hook", "non-canonical"),
    ("http://127.000.000.001/hook", "non-canonical"),
    ("http://1.2.3.4.5/hook", "non-canonical"),
    ("http://256.1.1.1/hook", "non-canonical"),
    ("http://example.0x10/hook", "non-canonical"),  # ends in a number: an IPv4 address to browsers
    ("http://%31%32%37.0.0.1/hook", "percent"),
    ("http://127.0.0.1%2f@x/hook", "userinfo"),
    ("http://example.com%00.evil/", "percent"),
    ("http://example..com/", "not a valid host name"),
    ("http://example.com../", "not a valid host name"),
    ("http://./", "no host"),
    ("http://.example.com/", "not a valid host name"),
    ("http://ex*ample.com/", "not a valid host name"),
    ("http://[::1/", "unclosed"),
    ("http://[127.0.0.1]/", "not a valid IPv6"),
    ("http://[v1.fe80::a]/", "not a valid IPv6"),
    ("http://8.8.8.8/#frag", "fragment"),
    ("http:8.8.8.8/hook", "scheme"),
    ("http:/8.8.8.8/hook", "scheme"),
    ("javascript://8.8.8.8/%0aalert(1)", "scheme"),
    ("http+unix://8.8.8.8/", "scheme"),
    ("https://" + "a" * 64 + ".example/h", "not a valid host name"),
    ("https://example.com/" + "a" * 2048, "longer than"),
]

ACCEPTED = [
    "https://8.8.8.8/hook",
    "http://1.1.1.1:8080/a/b?c=d",
    "HTTPS://93.184.216.34/",
    "https://93.184.216.34.:443/",
    "https://8.8.8.8?x=1",
    "https://8.8.8.8/a%5Cb@c",  # '@' and an encoded backslash in the path are the path's
    "https://[2606:4700:4700::1111]/hook",
    "https://[2606:4700:4700:0:0:0:0:1111]:8443/hook",
    "https://[::ffff:8.8.8.8]/hook",
    "https://[2002:808:808::1]/hook",
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason) as info:
        check_callback_url(url)
    assert "http" in str(info.value)  # says what would be right


@pytest.mark.parametrize("url", [u for u, _ in REFUSED])
def test_allow_private_accepts_all(url: str) -> None:
    check_callback_url(url, allow_private=True)


@pytest.mark.parametrize(("url", "reason"), MALFORMED)
def test_malformed(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        check_callback_url(url, allow_private=True)


@pytest.mark.parametrize("url", ACCEPTED)
def test_public_accepted(url: str) -> None:
    check_callback_url(url)


@pytest.mark.parametrize("url", ACCEPTED)
def test_accepted_urls_read_the_same_by_other_parsers(url: str) -> None:
    """What the guard accepts, urllib3 and the standard library read the same way."""
    ours = parse_callback_url(url)

    def same_host(host: str | None) -> bool:
        host = (host or "").strip("[]").rstrip(".").lower()
        return ipaddress.ip_address(host) == ours.ip if ours.ip else host == ours.host

    theirs = parse_url(url)
    assert same_host(theirs.host)
    assert (theirs.port or urlguard.DEFAULT_PORTS[ours.scheme]) == ours.port
    split = urlsplit(url)
    assert same_host(split.hostname)
    assert (split.port or urlguard.DEFAULT_PORTS[ours.scheme]) == ours.port


@pytest.mark.parametrize(("url", "host", "port", "target", "host_header"), [
    ("HTTPS://Example.COM./a?b=1", "example.com", 443, "/a?b=1", "example.com"),
    ("http://example.com:8080", "example.com", 8080, "/", "example.com:8080"),
    ("http://example.com?x", "example.com", 80, "/?x", "example.com"),
    ("https://[2606:4700:4700:0:0:0:0:1111]:8443/h", "2606:4700:4700::1111", 8443, "/h",
     "[2606:4700:4700::1111]:8443"),
    ("http://8.8.8.8.:80/", "8.8.8.8", 80, "/", "8.8.8.8"),
])
def test_parsed_parts(url: str, host: str, port: int, target: str, host_header: str) -> None:
    parsed = parse_callback_url(url)
    assert (parsed.host, parsed.port, parsed.target, parsed.host_header) == (host, port, target, host_header)


def test_unsafe_url_is_value_error() -> None:
    assert issubclass(UnsafeURL, ValueError)


@pytest.mark.parametrize(
    ("url", "allowlist", "ok"),
    [
        ("http://127.0.0.1:9000/h", ["127.0.0.0/8"], True),
        ("http://127.0.0.1:9000/h", ["127.0.0.1"], True),
        ("http://127.0.0.1:9000/h", ["10.0.0.0/8"], False),
        ("http://10.2.3.4/h", ["10.0.0.0/8"], True),
        ("http://10.2.3.4/h", ["10.2.3.0/24", "192.168.0.0/16"], True),
        ("http://10.2.3.4/h", ["10.2.4.0/24"], False),
        ("http://localhost:9000/h", ["localhost"], True),
        ("http://localhost:9000/h", ["LocalHost"], True),
        ("http://localhost:9000/h", ["localhost:9000"], True),
        ("http://localhost:9001/h", ["localhost:9000"], False),
        ("http://localhost/h", ["localhost:80"], True),
        ("https://localhost/h", ["localhost:443"], True),
        ("http://localhost:9000/h", ["127.0.0.0/8"], True),
        ("http://localhost:9000/h", ["otherhost"], False),
        ("http://[::1]:9000/h", ["::1"], True),
        ("http://[::1]:9000/h", ["::1/128"], True),
        ("http://[::1]:9000/h", ["[::1]:9000"], True),
        ("http://[::1]:9000/h", ["[::1]:9001"], False),
        ("http://[::ffff:127.0.0.1]/h", ["127.0.0.0/8"], True),
        ("http://169.254.169.254/h", ["127.0.0.0/8"], False),
        ("http://127.0.0.1/h", "10.0.0.0/8, 127.0.0.1  localhost", True),  # raw setting string
        ("http://localhost./h", ["LOCALHOST."], True),  # trailing dots on either side
        ("http://[::1]/h", ["[::1]:80"], True),
        ("http://localhost@127.0.0.1/h", ["localhost"], False),  # userinfo is refused first
        ("http://2130706433/h", ["127.0.0.0/8"], False),  # so are non-canonical forms
    ],
)
def test_allowlist(url: str, allowlist: list[str] | str, ok: bool) -> None:
    if ok:
        check_callback_url(url, allowlist=allowlist)
    else:
        with pytest.raises(UnsafeURL):
            check_callback_url(url, allowlist=allowlist)


def test_allowlist_does_not_allow_bad_scheme() -> None:
    with pytest.raises(UnsafeURL, match="scheme"):
        check_callback_url("ftp://localhost/x", allowlist=["localhost"])


def test_parse_allowlist() -> None:
    rules = parse_allowlist("Example.COM., 10.0.0.0/8 ::1,h:81,[::1]:9000,,http://bad/, a@b")
    assert rules.names == {"example.com", "h:81", "[::1]:9000"}
    assert [str(n) for n in rules.networks] == ["10.0.0.0/8", "::1/128"]
    assert not rules.allow_private


def test_one_allowlist_parser_for_a_setting_and_its_entries() -> None:
    raw = "10.0.0.0/8, example.com  h:81"
    assert policy(False, raw) == policy(False, [s for s in raw.split(",") if s.strip()])


def _fake_resolver(answers: dict[str, list[str]]):
    def fake(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for ip in answers[host]:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return out

    return fake


def test_any_private_address_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolving to a public and a private address is refused (DNS-rebinding style)."""
    monkeypatch.setattr(
        urlguard.socket,
        "getaddrinfo",
        _fake_resolver({"mixed.test": ["8.8.8.8", "10.0.0.5"], "pub.test": ["8.8.8.8", "2606:4700::1"]}),
    )
    with pytest.raises(UnsafeURL, match=r"'mixed.test' resolves to a private address") as info:
        check_callback_url("https://mixed.test/h")
    assert "10.0.0.5" not in str(info.value)  # the internal address is never told
    check_callback_url("https://pub.test/h")
    check_callback_url("https://mixed.test/h", allowlist=["mixed.test"])
    check_callback_url("https://mixed.test/h", allowlist=["10.0.0.0/24"])


def test_unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlguard.socket, "getaddrinfo", _fake_resolver({}))
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_callback_url("https://nowhere.invalid/h")
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_callback_url("https://nowhere.invalid/h", allow_private=True)
    # an allowlisted name is trusted without resolving it
    check_callback_url("https://nowhere.invalid/h", allowlist=["nowhere.invalid"])


def test_resolve_returns_every_checked_address_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlguard.socket, "getaddrinfo",
                        _fake_resolver({"pub.test": ["8.8.8.8", "2606:4700::1", "8.8.8.8"]}))
    dest = resolve("https://pub.test:8443/h", policy())
    assert [str(ip) for ip in dest.addresses] == ["8.8.8.8", "2606:4700::1"]
    assert dest.url.host == "pub.test" and dest.url.port == 8443


def test_literal_ip_is_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlguard.socket, "getaddrinfo", _fake_resolver({}))
    assert [str(ip) for ip in resolve("https://8.8.8.8/h", policy()).addresses] == ["8.8.8.8"]
