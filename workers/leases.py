"""Heartbeat leases of built-in workers.

A consumer takes its tasks with a short lease (``BELLAQ_WORKER_LEASE``, 30 s) naming this
process as holder, and registers them here; one renewer per worker process (a thread, a greenlet
under gevent) extends every lease it holds every ``BELLAQ_WORKER_LEASE_RENEW`` seconds, in one
round trip (one ``extend`` script call per queue level, pipelined). While the process lives its
tasks keep their leases, up to their hard bound of ``process_timeout`` after the take; once it
dies nobody renews them and beat's reaper puts them back within about one lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable

from redis.exceptions import RedisError

from bellaq.queue_engine import QueueEngine

log = logging.getLogger(__name__)


class LeaseRenewer:
    """The leases one process holds, and the loop that renews them."""

    def __init__(self, engine: QueueEngine, lease_s: float, every_s: float, holder: str) -> None:
        self.engine = engine
        self.lease_ms = max(1, round(lease_s * 1000))
        self.every_s = max(0.05, every_s)
        self.holder = holder
        self._held: dict[tuple[str, int], set[str]] = {}
        self._where: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, tasks: Iterable[dict]) -> None:
        """Renew these taken tasks (dicts with ``task_id``, ``queue``, ``level``) from now on."""
        with self._lock:
            for task in tasks:
                where = (task["queue"], int(task["level"]))
                self._held.setdefault(where, set()).add(task["task_id"])
                self._where[task["task_id"]] = where
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="bellaq-leases", daemon=True)
                self._thread.start()

    def release(self, task_ids: Iterable[str]) -> None:
        """Stop renewing these tasks (completed, or given up)."""
        with self._lock:
            for task_id in task_ids:
                where = self._where.pop(task_id, None)
                if where is not None:
                    ids = self._held.get(where)
                    if ids is not None:
                        ids.discard(task_id)
                        if not ids:
                            del self._held[where]

    def held(self) -> dict[tuple[str, int], list[str]]:
        with self._lock:
            return {where: sorted(ids) for where, ids in self._held.items()}

    def renew(self) -> int:
        """Extend every held lease once; leases this process no longer holds (completed,
        cancelled, reaped, taken by another) are dropped. Returns how many were renewed."""
        held = self.held()
        if not held:
            return 0
        got = self.engine.extend_many(held, self.lease_ms, self.holder)
        gone = [task_id for ext in got.values() for task_id in (*ext.not_leased, *ext.wrong_holder)]
        if gone:
            self.release(gone)
        return sum(len(ext.renewed) for ext in got.values())

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except RedisError as err:
                log.warning("could not renew %d leases: %s", len(self._where), err)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("lease renewal failed")


_renewer: LeaseRenewer | None = None
_pid = 0
_guard = threading.Lock()


def renewer() -> LeaseRenewer:
    """This process's renewer for the current app's engine (a forked child gets its own)."""
    global _renewer, _pid
    from bellaq.services import services

    svc = services()
    with _guard:
        if _renewer is None or _pid != os.getpid() or _renewer.engine is not svc.engine:
            if _renewer is not None:
                _renewer.stop()
            holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            _renewer = LeaseRenewer(svc.engine, svc.settings.worker_lease, svc.settings.worker_lease_renew, holder)
            _pid = os.getpid()
        return _renewer
