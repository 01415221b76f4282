"""The pinned HTTP client of callback delivery: it connects only to checked addresses, keeps TLS
name verification while connecting by IP, and never follows a redirect."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from urllib3.exceptions import HTTPError, SSLError

from bellaq import urlguard
from bellaq.urlguard import Destination, parse_callback_url, policy, resolve
from tests.receivers import Receiver, self_signed, tls_context
from workers.pinned_http import PinnedClient

HEADERS = {"content-type": "application/json"}


def pinned(url: str, *ips: str) -> Destination:
    return Destination(parse_callback_url(url), tuple(ipaddress.ip_address(ip) for ip in ips))


@pytest.fixture
def client() -> Iterator[PinnedClient]:
    c = PinnedClient(maxsize=4, timeout=5)
    yield c
    c.clear()


@pytest.fixture
def forbidden() -> Iterator[Receiver]:
    """A server that must never be contacted."""
    with Receiver() as r:
        yield r


class Rebinding:
    """A resolver that answers ``first`` for ``name`` once, then ``later``; other names resolve
    normally (IP literals included, so connections by address still work)."""

    def __init__(self, name: str, first: str, later: str) -> None:
        self.name, self.answers, self.later = name, [first], later
        self.lookups = 0
        self.real = socket.getaddrinfo

    def __call__(self, host, port, *args, **kwargs):  # noqa: ANN001, ANN204 - socket.getaddrinfo's signature
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        self.lookups += 1
        ip = self.answers.pop(0) if self.answers else self.later
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]


def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(monkeypatch, client, forbidden):
    """DNS rebinding: the name resolves to an allowed address for the check and to a forbidden
    one afterwards. The POST reaches the checked address; the forbidden server hears nothing."""
    with Receiver(host="127.0.0.2", port=forbidden.port) as checked:
        resolver = Rebinding("rebind.test", first="127.0.0.2", later="127.0.0.1")
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        dest = resolve(f"http://rebind.test:{forbidden.port}/hook", policy(allowlist="127.0.0.2"))
        assert client.post(dest, b"{}", HEADERS) == 200
        assert client.post(dest, b"{}", HEADERS) == 200  # a pooled connection: still the checked address
        assert len(checked.calls) == 2 and checked.calls[0][0]["host"] == f"rebind.test:{forbidden.port}"
        assert forbidden.calls == []
        assert resolver.lookups == 1
        # checked now, the name gives the forbidden address: refused before any connection
        with pytest.raises(urlguard.UnsafeURL, match="loopback"):
            resolve(f"http://rebind.test:{forbidden.port}/hook", policy(allowlist="127.0.0.2"))
        assert forbidden.calls == []


def test_the_next_checked_address_is_tried_when_connecting_fails(client, forbidden):
    with Receiver(host="127.0.0.2", port=forbidden.port) as second:
        # nothing listens on 127.0.0.3 at that port: refused, then the next checked address
        dest = pinned(f"http://multi.test:{forbidden.port}/hook", "127.0.0.3", "127.0.0.2")
        assert client.post(dest, b"{}", HEADERS) == 200
        assert len(second.calls) == 1 and forbidden.calls == []


def test_no_answer_raises(client, forbidden):
    port = forbidden.port
    forbidden.close()
    with pytest.raises(HTTPError):
        client.post(pinned(f"http://gone.test:{port}/hook", "127.0.0.1"), b"{}", HEADERS)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_returned_not_followed(client, forbidden, status):
    with Receiver(statuses=[status], location=forbidden.url) as redirecting:
        dest = pinned(redirecting.url, "127.0.0.1")
        assert client.post(dest, b'{"a": 1}', HEADERS) == status
        assert len(redirecting.calls) == 1
        assert forbidden.calls == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "callback.test")


def test_https_by_pinned_address_still_verifies_the_name(certificate):
    cert, key = certificate
    with Receiver(tls=tls_context(cert, key)) as server:
        trusting = PinnedClient(maxsize=2, timeout=5, ca_certs=str(cert))
        good = pinned(f"https://callback.test:{server.port}/hook", "127.0.0.1")
        assert trusting.post(good, b"{}", HEADERS) == 200
        assert server.sni == ["callback.test"]  # SNI names the host, not the address
        assert server.calls[0][0]["host"] == f"callback.test:{server.port}"

        # the same address under another name: the certificate does not match, nothing is sent
        wrong = pinned(f"https://other.test:{server.port}/hook", "127.0.0.1")
        with pytest.raises(SSLError):
            trusting.post(wrong, b"{}", HEADERS)
        # the address itself is not a name the certificate holds either
        with pytest.raises(SSLError):
            trusting.post(pinned(f"https://127.0.0.1:{server.port}/hook", "127.0.0.1"), b"{}", HEADERS)
        # and a certificate nobody trusts is refused
        with pytest.raises(SSLError):
            PinnedClient(maxsize=2, timeout=5).post(good, b"{}", HEADERS)
        assert len(server.calls) == 1
        trusting.clear()


def test_environment_proxies_are_not_used(monkeypatch, client, forbidden):
    """A proxy would resolve the name itself; the pinned client never uses one."""
    monkeypatch.setenv("HTTP_PROXY", forbidden.url)
    monkeypatch.setenv("http_proxy", forbidden.url)
    with Receiver(host="127.0.0.2", port=forbidden.port) as target:
        assert client.post(pinned(f"http://p.test:{forbidden.port}/hook", "127.0.0.2"), b"{}", HEADERS) == 200
        assert len(target.calls) == 1 and forbidden.calls == []
