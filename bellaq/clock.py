"""Time helpers: tasks speak milliseconds, OpenAI objects speak seconds."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)


def now_s() -> int:
    return int(time.time())
