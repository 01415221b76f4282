"""SQL models: the source of truth. Redis only mirrors what SQL holds."""

from bellaq.models.batches import Batch
from bellaq.models.files import File
from bellaq.models.idempotency import IdempotencyRecord
from bellaq.models.keys import ApiKey, Owner
from bellaq.models.queues import Queue
from bellaq.models.tasks import Task
from bellaq.models.types import LongText

__all__ = ["ApiKey", "Batch", "File", "IdempotencyRecord", "LongText", "Owner", "Queue", "Task"]
