"""The Lua scripts of the queue engine (``bellaq/lua/``, package data) and their includes."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

SCRIPTS = (
    "enqueue",
    "take_fifo",
    "take_round_robin",
    "take_active_passive",
    "take_sequential",
    "complete",
    "cancel",
    "delay",
    "extend",
    "rerun",
    "requeue_expired",
    "clear",
    "stats",
    "set_limits",
    "pause",
    "limit_stats",
)
_INCLUDE_RE = re.compile(r"^--\s*@include\s+([A-Za-z0-9_.-]+\.lua)\s*$", re.MULTILINE)


def _lua_dir() -> Any:
    try:
        return files("bellaq") / "lua"
    except (TypeError, ModuleNotFoundError):  # pragma: no cover - namespace package fallback
        return Path(__file__).resolve().parents[1] / "lua"


@cache
def load_lua(name: str) -> str:
    """Text of ``bellaq/lua/<name>`` with its ``-- @include X.lua`` lines expanded."""
    text = (_lua_dir() / name).read_text(encoding="utf-8")
    return _INCLUDE_RE.sub(lambda m: load_lua(m.group(1)), text)
