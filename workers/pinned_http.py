"""HTTP POSTs that connect only to addresses the URL guard checked.

The connection goes to a checked IP (:class:`bellaq.urlguard.Destination`), never to a name the
HTTP library would resolve again, so DNS cannot answer one address for the check and another for
the connection. TLS still verifies the name: SNI and the certificate check use the URL's host.
Redirects are never followed, nothing is retried here, environment proxies are not used, and
at most ``MAX_BODY_BYTES`` of an answer are read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import certifi
from urllib3 import PoolManager, Timeout
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError
from urllib3.response import BaseHTTPResponse

from bellaq.urlguard import Destination

MAX_BODY_BYTES = 64 * 1024
MAX_ADDRESSES = 3  # addresses tried, in resolver order, when connecting fails


class PinnedClient:
    """A pool of connections per (checked address, port, scheme, TLS name).

    ``maxsize`` is the most connections kept per pool: size it for the number of POSTs the
    process makes at once, or urllib3 discards the surplus ("Connection pool is full").
    """

    def __init__(self, maxsize: int, timeout: float = 10.0, connect_timeout: float = 5.0,
                 ca_certs: str | None = None, max_pools: int = 256) -> None:
        self.timeout = timeout
        self._timeout = Timeout(connect=min(connect_timeout, timeout), read=timeout)
        self._pools = PoolManager(num_pools=max_pools, maxsize=maxsize, block=False, retries=False,
                                  cert_reqs="CERT_REQUIRED", ca_certs=ca_certs or certifi.where())

    def post(self, dest: Destination, body: bytes, headers: Mapping[str, str]) -> int:
        """POST ``body`` and return the HTTP status (a 3xx is returned, not followed).

        Raises ``urllib3.exceptions.HTTPError`` when no answer came.
        """
        url = dest.url
        tls = {"server_hostname": url.host, "assert_hostname": url.host} if url.scheme == "https" else None
        sent = {**headers, "Host": url.host_header}
        deadline = time.monotonic() + self.timeout
        error: HTTPError | None = None
        for ip in dest.addresses[:MAX_ADDRESSES]:
            pool = self._pools.connection_from_host(str(ip), url.port, url.scheme, pool_kwargs=tls)
            try:
                resp = pool.urlopen("POST", url.target, body=body, headers=sent, retries=False, redirect=False,
                                    assert_same_host=False, preload_content=False, timeout=self._timeout)
            except (NewConnectionError, ConnectTimeoutError) as err:
                error = err
                continue
            _finish(resp, deadline)
            return resp.status
        assert error is not None  # a Destination has at least one address
        raise error

    def clear(self) -> None:
        self._pools.clear()


def _finish(resp: BaseHTTPResponse, deadline: float) -> None:
    """Read the answer (bounded in size and time) so its connection can be reused, else drop it."""
    read = 0
    try:
        while read <= MAX_BODY_BYTES and time.monotonic() < deadline:
            chunk = resp.read(16 * 1024)
            if not chunk:
                resp.release_conn()
                return
            read += len(chunk)
    except HTTPError:
        pass
    resp.close()
    resp.release_conn()
