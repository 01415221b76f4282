"""How a task's callback delivery went, as stored in ``tasks.callback_status`` and shown to users.

Stored compactly as ``<state>:<attempts>:<http status or empty>`` (``retrying:2:503``,
``delivered:3:200``, ``failed:8:``); NULL until the first attempt is recorded. Users see only the
state, the attempt count and the HTTP status the receiver answered: never why a connection failed
or where it went, which would let them map internal hosts and ports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DELIVERED, RETRYING, FAILED = "delivered", "retrying", "failed"
STATES = (DELIVERED, RETRYING, FAILED)
FINAL_STATES = (DELIVERED, FAILED)


@dataclass(frozen=True)
class CallbackStatus:
    state: str | None = None  # None: no attempt recorded yet
    attempts: int = 0
    http_status: int | None = None  # None: no HTTP answer (connection failed, timed out, refused)

    def encode(self) -> str:
        return f"{self.state}:{self.attempts}:{self.http_status or ''}"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def fields(self) -> dict[str, object]:
        """The task object's fields."""
        return {"callback_status": self.state, "callback_attempts": self.attempts,
                "callback_http_status": self.http_status}

    @classmethod
    def parse(cls, raw: str | None) -> CallbackStatus:
        """Read a stored value; free text written by older versions shows only its state."""
        if not raw:
            return cls()
        word = re.match(r"[a-z]*", raw).group()  # type: ignore[union-attr]  (always matches)
        state = FAILED if word == "refused" else word
        if state not in STATES:
            return cls()
        parts = raw.split(":")
        if len(parts) != 3 or parts[0] != state or not parts[1].isdigit() or not (parts[2] == "" or parts[2].isdigit()):
            return cls(state)
        return cls(state, int(parts[1]), int(parts[2]) if parts[2] else None)
