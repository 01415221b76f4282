"""Batches (OpenAI Batch API): one input file, many tasks, two result files. One module per step
of a batch's life:

- :mod:`.service`: create (recorded ``validating`` and handed to the workers, or not at all),
  read, list, cancel, and the Batch object the API shows; :mod:`.resubmit`: a new batch of the
  lines of an ended one that did not succeed.
- :mod:`.validation`: reading input lines and the whole-file rules; windows and metadata.
- :mod:`.ingest`: validate the input file, then make every line a task, chunk by chunk
  (:mod:`.ids`: a batch's task ids, one primary-key range in line order).
- :mod:`.progress`: the Redis record that says when the last line ended and when a batch
  changed (its one writer).
- :mod:`.ending`: a cancel or the expiry ends the unfinished tasks; :mod:`.sweep` restarts what
  a lost message, a lost Redis record or a dead worker left behind.
- :mod:`.output`: finalisation, claimed once in SQL: the output and error files, in shards.
- :mod:`.events`: the live ``text/event-stream`` of a batch's changes.

The Celery side (``workers/batches.py``) runs ingest, ending and finalisation in the background.
"""
