"""Resubmit: a new batch of the lines of an ended batch that did not succeed.

``lines`` picks them from the original's error file: ``failed`` (every line in it: non-2xx
answers, ``batch_expired``, ``batch_cancelled``, lease failures...), ``expired`` or ``cancelled``
(only those codes). The new batch reads a new input file (purpose ``batch``) holding exactly those
requests, runs with the same endpoint, queue and window, and says ``metadata.resubmit_of``. So the
two batches' output files hold every ``custom_id`` of the original once.
"""

from __future__ import annotations

import json
from typing import Any

from bellaq import files
from bellaq.batches import service
from bellaq.batches.output import result_lines
from bellaq.batches.validation import MAX_METADATA
from bellaq.errors import BadRequest
from bellaq.keys import Principal
from bellaq.models import Batch, File
from bellaq.models.batches import FINAL_STATUSES
from bellaq.services import services
from bellaq.validation import choice_field

CHOICES = ("failed", "expired", "cancelled")
CODES = {"expired": "batch_expired", "cancelled": "batch_cancelled"}


def resubmit(principal: Principal, batch_id: str, body: dict[str, Any], queue_header: str | None) -> Batch:
    """Make and hand off the new batch; 400 when the original has not ended or has no such lines."""
    lines = choice_field(body, "lines", CHOICES, "failed")
    original = service.owned(principal, batch_id)
    if original.status not in FINAL_STATUSES:
        raise BadRequest(f"Batch '{original.id}' is {original.status}; only an ended batch (completed, failed, "
                         "expired or cancelled) can be resubmitted.", param="batch_id", code="batch_not_ended")
    queue = service.named_queue(original.endpoint, queue_header) if queue_header is not None else original.queue
    source = _write_input(original, lines)
    if source is None:
        raise BadRequest(f"Batch '{original.id}' has no {lines} lines to resubmit.", param="lines",
                         code="nothing_to_resubmit")
    metadata = json.loads(original.metadata_json) if original.metadata_json else {}
    metadata.pop("resubmit_of", None)
    metadata = dict(list(metadata.items())[:MAX_METADATA - 1])
    metadata["resubmit_of"] = original.id
    batch = service.new_batch(original.owner, original.endpoint, source.id, original.completion_window, metadata,
                              queue)
    service.hand_off(batch, source)
    return batch


def _write_input(original: Batch, lines: str) -> File | None:
    """The new input file of the chosen lines (not recorded yet), or None when there are none."""
    storage = services().storage
    file_id = files.new_file_id()
    key = files.storage_key(file_id)
    url = json.dumps(original.endpoint)
    count = size = 0
    with storage.open_writer(key) as out:
        for row, to_output, line in result_lines(original, with_body=True):
            if to_output or (lines in CODES and _code(line) != CODES[lines]):
                continue
            request = f'{{"custom_id":{json.dumps(row.custom_id)},"method":"POST","url":{url},"body":{row.data}}}\n'
            data = request.encode()
            out.write(data)
            count += 1
            size += len(data)
    if not count:
        storage.delete(key)
        return None
    return files.create_from_storage(original.owner, "batch", f"{original.id}_resubmit.jsonl", key, size, file_id)


def _code(line: str) -> str | None:
    """The error code of an error-file line (None for a request the upstream answered)."""
    error = json.loads(line)["error"]
    return error["code"] if error else None
