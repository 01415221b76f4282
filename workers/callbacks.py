"""Callback delivery: the finished task object POSTed to ``callback_url``, signed the Standard
Webhooks way with the owner's secret, retried with backoff on a non-2xx answer or none."""

from __future__ import annotations

import json
import logging
import random

import requests

from bellaq.extensions import db
from bellaq.keys import owner_secret
from bellaq.models import Task
from bellaq.services import services
from bellaq.urlguard import UnsafeURL, check_callback_url
from bellaq.webhooks import headers_for, new_msg_id
from workers.celery_app import CONTROL_QUEUE, celery

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 600.0
_session = requests.Session()


def schedule(tasks: list[Task]) -> None:
    """Task-end listener: one message delivers the first attempt of every ended callback task."""
    ids = [task.id for task in tasks if task.response_mode == "callback" and task.callback_url]
    if ids:
        deliver_many.apply_async((ids,), queue=CONTROL_QUEUE)


def backoff(attempt: int, base: float = 1.0) -> float:
    """Seconds before attempt ``attempt + 1``: exponential with full jitter, capped."""
    return random.uniform(0, min(BACKOFF_MAX_S, base * 2 ** attempt))


def _record(task_id: str, status: str) -> None:
    db.session.execute(db.update(Task).where(Task.id == task_id).values(callback_status=status[:255]))
    db.session.commit()


@celery.task(name="bellaq.deliver_callbacks", ignore_result=True)
def deliver_many(task_ids: list[str]) -> list[str]:
    """First delivery attempts of tasks that ended together; failures retry one by one."""
    return [attempt_delivery(task_id) for task_id in task_ids]


@celery.task(name="bellaq.deliver_callback", ignore_result=True)
def deliver(task_id: str, attempt: int = 1, msg_id: str | None = None) -> str:
    """A retry of one delivery."""
    return attempt_delivery(task_id, attempt, msg_id)


def attempt_delivery(task_id: str, attempt: int = 1, msg_id: str | None = None) -> str:
    """One delivery attempt; schedules the next one on failure until the attempts run out."""
    settings = services().settings
    task = db.session.get(Task, task_id)
    if task is None or not task.callback_url:
        return "gone"
    msg_id = msg_id or new_msg_id()
    try:
        # Checked at every attempt: what a name resolves to can change after the put.
        check_callback_url(task.callback_url, settings.callback_allow_private, settings.callback_allowlist)
    except UnsafeURL as err:
        _record(task_id, f"refused: {err}")
        return "refused"
    body = json.dumps(task.to_dict()).encode()
    headers = headers_for(owner_secret(task.owner), body, msg_id=msg_id)
    db.session.commit()
    try:
        resp = _session.post(task.callback_url, data=body, headers=headers, timeout=CALLBACK_TIMEOUT_S)
        reason = f"HTTP {resp.status_code}"
        delivered = 200 <= resp.status_code < 300
    except requests.RequestException as err:
        reason = f"{type(err).__name__}"
        delivered = False
    if delivered:
        _record(task_id, f"delivered ({reason}) after {attempt} attempt(s)")
        return "delivered"
    if attempt >= settings.callback_max_attempts:
        _record(task_id, f"failed after {attempt} attempt(s): {reason}")
        return "failed"
    _record(task_id, f"retrying: attempt {attempt} got {reason}")
    deliver.apply_async((task_id, attempt + 1, msg_id), queue=CONTROL_QUEUE,
                        countdown=backoff(attempt, settings.callback_backoff_base))
    return "retrying"
