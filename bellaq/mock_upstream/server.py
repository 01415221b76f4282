"""Ways to run the mock: :class:`MockUpstream` (a werkzeug server in a thread, for tests) and
:func:`serve` / :func:`main` (gevent's pywsgi, one greenlet per connection, for benchmarks and
``python -m bellaq.mock_upstream``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

from bellaq.mock_upstream.app import MockUpstreamApp, create_mock_app, get_mock_state
from bellaq.mock_upstream.state import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, MockState, RecordedRequest

# --------------------------------------------------------------------------- in-process server


def _knob(name: str) -> property:
    def fget(self: MockUpstream) -> Any:
        return getattr(self.state, name)

    def fset(self: MockUpstream, value: Any) -> None:
        setattr(self.state, name, value)

    return property(fget, fset, doc=f"Run-time knob ``{name}`` (settable while running).")


class MockUpstream:
    """The mock on 127.0.0.1 (free port) in a background thread; a context manager.

    ``knobs`` are the keyword arguments of :class:`MockState` (``latency``, ``rpm``, ...); an
    ``outage_seconds`` outage starts with :meth:`start`. ``base_url`` has no ``/v1``
    (``http://127.0.0.1:PORT``): endpoints such as ``/v1/chat/completions`` are appended to it.
    Recording of requests is on.
    """

    latency = _knob("latency")
    error_rate = _knob("error_rate")
    error_status = _knob("error_status")
    retry_after = _knob("retry_after")
    stream_chunk_delay = _knob("stream_chunk_delay")
    default_max_tokens = _knob("default_max_tokens")
    rpm = _knob("rpm")
    tpm = _knob("tpm")

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self._outage_seconds = float(knobs.pop("outage_seconds", 0.0))
        self.app = create_mock_app(record=True, **knobs)
        self.state = get_mock_state(self.app)
        self.host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> MockUpstream:
        """Start serving (idempotent)."""
        if self._server is not None:
            return self
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _QuietHandler(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = make_server(self.host, self._port, self.app, threaded=True, request_handler=_QuietHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mock-upstream",
            daemon=True,
        )
        self._thread.start()
        if self._outage_seconds > 0:
            self.start_outage(self._outage_seconds)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._server is None:
            raise RuntimeError("MockUpstream is not running")
        return int(self._server.server_port)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """``base_url + path``."""
        return self.base_url + path

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far."""
        return self.state.requests

    @property
    def request_count(self) -> int:
        """How many requests were received so far."""
        return self.state.request_count

    def script(self, statuses: Iterable[int], retry_after: float | None = None) -> None:
        """Answer the next requests with these statuses, in order (200 = normal), then normally."""
        self.state.script(statuses, retry_after)

    def start_outage(self, seconds: float, status: int | None = None, retry_after: float | None = None) -> None:
        """Answer every request of the next ``seconds`` with an error (see :meth:`MockState.start_outage`)."""
        self.state.start_outage(seconds, status, retry_after)

    def max_requests_in_window(self, window: float = DEFAULT_WINDOW) -> int:
        """The most served requests that arrived within any ``window`` seconds."""
        return self.state.max_requests_in_window(window)

    def max_tokens_in_window(self, window: float = DEFAULT_WINDOW) -> int:
        """The most tokens charged to served requests that arrived within any ``window`` seconds."""
        return self.state.max_tokens_in_window(window)

    def stats(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        """What ``GET /mock/stats`` answers."""
        return self.state.stats(window)

    def reset(self) -> None:
        """Restore the constructor's knobs; forget requests, counts and any remaining script; end
        any outage; start the limits over."""
        self.state.reset()


# --------------------------------------------------------------------------- gevent server


def _raise_nofile_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _exit_when_orphaned(parent_pid: int) -> None:
    """In a forked server process: exit once the parent is gone."""
    import gevent

    while os.getppid() == parent_pid:
        gevent.sleep(1.0)
    os._exit(0)


def _serve_on(listener: Any, state: MockState, signals: tuple[int, ...]) -> None:
    import gevent
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(listener, MockUpstreamApp(state), log=None)
    in_main_thread = threading.current_thread() is threading.main_thread()
    for signum in signals if in_main_thread else ():  # stop gracefully, no KeyboardInterrupt in the hub
        gevent.signal_handler(signum, lambda: gevent.spawn(server.stop, 1))
    server.serve_forever()


def nodelay_pywsgi() -> None:
    """Set TCP_NODELAY on every connection gevent's pywsgi accepts: without it a keep-alive
    answer sent as headers then body waits ~40 ms for the client's delayed ACK."""
    from gevent import pywsgi

    original = pywsgi.WSGIHandler.__init__

    def init(self: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        original(self, sock, *args, **kwargs)

    pywsgi.WSGIHandler.__init__ = init  # type: ignore[method-assign]


def serve(port: int, host: str = "127.0.0.1", backlog: int = 4096, processes: int = 1, **knobs: Any) -> None:
    """Serve the mock with gevent's pywsgi until interrupted (one greenlet per connection).

    ``knobs`` are the keyword arguments of :class:`MockState`. Sleeps use ``gevent.sleep``, so
    this works with or without monkey-patching. With ``processes > 1`` the listening socket is
    shared by that many forked processes (POSIX only); each has its own knobs, limits and
    counters, and the children stop when the parent does.
    """
    import signal

    import gevent
    from gevent import socket as gsocket

    _raise_nofile_limit()
    nodelay_pywsgi()
    family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
    listener = gsocket.socket(family, gsocket.SOCK_STREAM)
    listener.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    bound_host, bound_port = listener.getsockname()[:2]
    shown = ", ".join(f"{k}={v}" for k, v in knobs.items() if v is not None)
    print(f"bellaq mock upstream on http://{bound_host}:{bound_port} (pid {os.getpid()}, "
          f"processes={processes}{', ' if shown else ''}{shown})", file=sys.stderr, flush=True)
    seed = knobs.pop("seed", None)

    def make_state(index: int) -> MockState:
        return MockState(seed=None if seed is None else seed + index, sleep=gevent.sleep, **knobs)

    parent = os.getpid()
    children: list[int] = []
    for index in range(1, max(1, processes)):
        pid = gevent.fork()
        if pid == 0:
            code = 0
            try:
                gevent.spawn(_exit_when_orphaned, parent)
                _serve_on(listener, make_state(index), (signal.SIGINT,))
            except KeyboardInterrupt:
                pass
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    try:
        _serve_on(listener, make_state(0), (signal.SIGINT, signal.SIGTERM))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        listener.close()


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of :func:`main`."""
    p = argparse.ArgumentParser(prog="python -m bellaq.mock_upstream",
                                description="OpenAI-compatible mock model server.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18999, help="port to listen on (default 18999)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait before answering")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with an error")
    p.add_argument("--error-status", type=int, default=500,
                   help="status of those errors and of an outage (e.g. 429, 500)")
    p.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds on error answers")
    p.add_argument("--stream-chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute before answering 429")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute before answering 429")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"completion budget of a request without max_tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--outage-seconds", type=float, default=0.0,
                   help="answer every request of the first S seconds with --error-status and Retry-After")
    p.add_argument("--seed", type=int, default=None, help="random seed for error_rate")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    p.add_argument("--processes", type=int, default=1, help="server processes sharing the port (default 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: monkey-patch with gevent, then :func:`serve`."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    for name in ("rpm", "tpm", "default_max_tokens"):
        if args[name] is not None and args[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args["processes"] > 1 and (args["rpm"] or args["tpm"]):
        parser.error("--rpm and --tpm need --processes 1: each process would count its own limits")
    try:
        serve(args.pop("port"), **args)
    except KeyboardInterrupt:
        pass
