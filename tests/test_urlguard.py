"""Callback URL guard: table-driven, using only literal IPs and ``localhost`` (no DNS needed)."""

from __future__ import annotations

import socket

import pytest

from bellaq import urlguard
from bellaq.urlguard import UnsafeURL, check_callback_url, parse_allowlist

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
    ("http://2130706433/hook", "loopback"),  # 127.0.0.1 as one number
    ("http://0x7f.1/hook", "loopback"),
    ("https://user:pw@127.0.0.1/hook", "loopback"),
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
    ("http://8.8.8.8:99999/", "not a valid URL"),
    ("http://8.8.8.8:0/", "port 0"),
    ("http://8.8.8.8/a b", "whitespace"),
    ("http://8.8.8.8/\r\nX-Injected: 1", "whitespace"),
    ("http://[fe80::1%25eth0]/", "zone id"),
]

ACCEPTED = [
    "https://8.8.8.8/hook",
    "http://1.1.1.1:8080/a/b?c=d",
    "HTTPS://93.184.216.34/",
    "https://[2606:4700:4700::1111]/hook",
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
    names, nets = parse_allowlist(["Example.COM.", " ", "10.0.0.0/8", "::1", "h:81"])
    assert names == {"example.com", "h:81"}
    assert [str(n) for n in nets] == ["10.0.0.0/8", "::1/128"]


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
    with pytest.raises(UnsafeURL, match=r"'mixed.test' \(resolves to 10.0.0.5\) is a private address"):
        check_callback_url("https://mixed.test/h")
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


def test_invalid_idna_host_is_unsafe() -> None:
    with pytest.raises(UnsafeURL):
        check_callback_url("http://" + "a" * 64 + ".example/h")
