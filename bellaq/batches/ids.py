"""Ids of batches and of their tasks: a batch's tasks are one primary-key range, in line order."""

from __future__ import annotations

from bellaq.files import time_ordered_id

ID_DIGITS = 6  # base 36: up to 2,176,782,335 lines
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_batch_id() -> str:
    return time_ordered_id("batch_")


def task_id_for(batch_id: str, index: int) -> str:
    """The task id of the ``index``-th request (0-based) of a batch: ids sort in line order."""
    digits = ""
    for _ in range(ID_DIGITS):
        index, r = divmod(index, 36)
        digits = _B36[r] + digits
    return f"batch_req_{batch_id.removeprefix('batch_')}{digits}"


def line_index(task_id: str) -> int:
    """The 0-based request index a batch task id encodes."""
    return int(task_id[-ID_DIGITS:], 36)
