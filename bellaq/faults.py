"""Fault points for the fault drills: a process started with ``BELLAQ_FAULT_EXIT_AT=<point>``
exits at once (``os._exit``, as a ``kill -9`` would leave things) the first time it reaches
that point. Unset, a fault point costs one dictionary lookup."""

from __future__ import annotations

import os

EXIT_CODE = 70


def fault_point(name: str) -> None:
    """Exit here if this process was told to (``BELLAQ_FAULT_EXIT_AT`` names the point)."""
    if os.environ.get("BELLAQ_FAULT_EXIT_AT") == name:
        os._exit(EXIT_CODE)
