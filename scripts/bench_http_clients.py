"""CPU cost per call of the built-in worker's HTTP clients, beside a bare urllib3 pool.

    python scripts/bench_http_clients.py [--n 3000] [--threads 20] [--gevent] [--rounds 3]
                                         [--only upstream,urllib3,pinned,urllib3-sink]

The mock upstream (zero latency, gevent server) and a callback sink run in subprocesses; the
clients run in this process from ``--threads`` threads (greenlets with ``--gevent``, which
monkey-patches first, as a Celery gevent worker does). For each client: ``--n`` calls, the
process's CPU time (``time.process_time``: every thread of this process, not the servers) per
call, and the wall time. The clients run interleaved ``--rounds`` times and the median is shown,
so a machine whose speed drifts moves them alike.

* ``upstream``: ``workers.upstream.UpstreamClient.call`` (chat completion against the mock);
* ``urllib3``: the same POST through one ``urllib3.PoolManager`` (JSON encoded and decoded);
* ``pinned``: ``workers.pinned_http.PinnedClient.post`` to the sink (a pinned 127.0.0.1);
* ``urllib3-sink``: the same POST through a bare ``urllib3.HTTPConnectionPool``.

``--compare NAME`` also measures another module's ``UpstreamClient`` as ``upstream@NAME`` (an
older copy of ``workers/upstream.py`` on ``PYTHONPATH``, to compare before and after in one run).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import importlib  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import urllib3  # noqa: E402

from bellaq.urlguard import Destination, parse_callback_url  # noqa: E402
from scripts.benchlib import MockServer, Sink, print_rows  # noqa: E402
from workers.pinned_http import PinnedClient  # noqa: E402

CHAT = "/v1/chat/completions"
BODY = {"model": "mock-1", "messages": [{"role": "user", "content": "one two three four five"}]}
CALLBACK = json.dumps({"id": "task_x", "status": "succeeded", "result": {"status_code": 200}}).encode()
ALL = ("upstream", "urllib3", "pinned", "urllib3-sink")


def run(n: int, threads: int, call: Callable[[], int]) -> tuple[float, float, int]:
    """``n`` calls from ``threads`` threads: (CPU ms per call, wall s, calls not answered 200)."""
    left = [n]
    bad = [0]
    lock = threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            if call() != 200:
                with lock:
                    bad[0] += 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    cpu, wall = time.process_time(), time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return (time.process_time() - cpu) * 1000 / n, time.perf_counter() - wall, bad[0]


def clients(mock_url: str, sink_url: str, threads: int, compare: list[str]) -> dict[str, Callable[[], int]]:
    from workers.upstream import UpstreamClient

    upstream = UpstreamClient(mock_url, api_key="sk-bench", max_attempts=1, timeout=30)
    others = {name: importlib.import_module(name).UpstreamClient(mock_url, api_key="sk-bench", max_attempts=1,
                                                                  timeout=30) for name in compare}
    manager = urllib3.PoolManager(maxsize=threads, retries=False)
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": "Bearer sk-bench"}
    pinned = PinnedClient(maxsize=threads, timeout=30)
    dest = Destination(parse_callback_url(sink_url), (ipaddress.ip_address("127.0.0.1"),))
    sink_pool = urllib3.HTTPConnectionPool("127.0.0.1", dest.url.port, maxsize=threads, retries=False)
    hook_headers = {"content-type": "application/json", "webhook-id": "msg_x"}

    def bare() -> int:
        resp = manager.request("POST", mock_url + CHAT, body=json.dumps(BODY).encode(), headers=headers)
        json.loads(resp.data)
        return resp.status

    def bare_sink() -> int:
        resp = sink_pool.urlopen("POST", dest.url.target, body=CALLBACK, headers=hook_headers)
        return resp.status

    def via(client: Any) -> Callable[[], int]:
        return lambda: client.call(CHAT, BODY).status_code

    return {
        "upstream": via(upstream),
        **{f"upstream@{name}": via(client) for name, client in others.items()},
        "urllib3": bare,
        "pinned": lambda: pinned.post(dest, CALLBACK, hook_headers),
        "urllib3-sink": bare_sink,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gevent", action="store_true", help="monkey-patch with gevent (greenlets, not threads)")
    parser.add_argument("--only", default=",".join(ALL))
    parser.add_argument("--compare", action="append", default=[], metavar="MODULE")
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name]
    only[1:1] = [f"upstream@{name}" for name in args.compare]
    with tempfile.TemporaryDirectory() as tmp, MockServer(Path(tmp)) as mock, Sink(Path(tmp)) as sink:
        calls = clients(mock.base_url, sink.url, args.threads, args.compare)
        for name in only:  # warm up: connections opened, imports done
            run(min(200, args.n), args.threads, calls[name])
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in only}
        for _ in range(args.rounds):
            for name in only:
                samples[name].append(run(args.n, args.threads, calls[name]))
    rows = []
    for name in only:
        cpu = statistics.median(s[0] for s in samples[name])
        wall = statistics.median(s[1] for s in samples[name])
        rows.append([name, f"{cpu:.3f}", f"{args.n / wall:.0f}", sum(s[2] for s in samples[name])])
    mode = "gevent" if args.gevent else "threads"
    print(f"{args.n} calls x {args.rounds} rounds, {args.threads} {mode}")
    print_rows(["client", "cpu ms/call", "calls/s", "not 200"], rows)


if __name__ == "__main__":
    main()
