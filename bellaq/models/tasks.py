"""Tasks: one request to one endpoint, from a put or from one line of a batch."""

from __future__ import annotations

import json
from enum import Enum

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from bellaq.callback_status import CallbackStatus
from bellaq.extensions import db
from bellaq.models.types import LongText


class TaskStatus(str, Enum):
    """The status of a task: a ``str``, so it compares, stores and serialises as one."""

    WAITING = "waiting"
    QUEUED = "queued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


OPEN_STATUSES = (TaskStatus.WAITING, TaskStatus.QUEUED)
END_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED)
RESPONSE_MODES = ("callback", "blocking", "streaming")


class Task(db.Model):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_batch_status", "batch_id", "status"),
        Index("ix_tasks_status_start", "status", "start_time"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    batch_id: Mapped[str] = mapped_column(String(40), default="")
    custom_id: Mapped[str | None] = mapped_column(String(512), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(256))
    queue: Mapped[str] = mapped_column(String(64))
    level: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[str] = mapped_column(LongText)
    result: Mapped[str | None] = mapped_column(LongText, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.WAITING.value)
    response_mode: Mapped[str] = mapped_column(String(16), default="callback")
    callback_url: Mapped[str] = mapped_column(String(2048), default="")
    callback_status: Mapped[str | None] = mapped_column(String(255), nullable=True)
    timeout: Mapped[int] = mapped_column(Integer, default=300)
    instance_id: Mapped[str] = mapped_column(String(64), default="")
    start_time: Mapped[int] = mapped_column(BigInteger)
    expire_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    running_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)

    def to_dict(self) -> dict:
        return {
            "task_id": self.id,
            "batch_id": self.batch_id or "",
            "endpoint": self.endpoint,
            "queue": self.queue,
            "level": self.level,
            "data": json.loads(self.data),
            "result": json.loads(self.result) if self.result else None,
            "status": self.status,
            "response_mode": self.response_mode,
            "callback_url": self.callback_url or "",
            **CallbackStatus.parse(self.callback_status).fields(),
            "instance_id": self.instance_id or "",
            "timeout": self.timeout,
            "start_time": self.start_time,
            "expire_time": self.expire_time,
            "completed_time": self.completed_time,
            "running_time": self.running_time,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
        }
