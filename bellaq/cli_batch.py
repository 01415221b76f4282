"""``bellaq batch``: submit a JSONL file as a batch, follow it with a progress bar, fetch the results.

Talks HTTP to a running service with the official ``openai`` SDK (``--base-url``, default
``$BELLAQ_BASE_URL`` or http://127.0.0.1:8080/v1; ``--api-key``, default ``$BELLAQ_API_KEY``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
FINAL = ("completed", "failed", "expired", "cancelled")


def _client(base_url: str, api_key: str | None) -> Any:
    import openai

    if not api_key:
        raise click.UsageError("No API key: pass --api-key or set BELLAQ_API_KEY (a key with role user).")
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=5)


def _connection(func: Any) -> Any:
    func = click.option("--api-key", envvar="BELLAQ_API_KEY", default=None,
                        help="A user key (default: $BELLAQ_API_KEY).")(func)
    func = click.option("--base-url", envvar="BELLAQ_BASE_URL", default=DEFAULT_BASE_URL, show_default=True,
                        help="The service's /v1 URL (default: $BELLAQ_BASE_URL).")(func)
    return func


def _api_errors(func: Any) -> Any:
    """Show the service's error message instead of a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return func(*args, **kwargs)
        except openai.APIStatusError as err:
            message = err.body.get("message") if isinstance(err.body, dict) else None
            raise click.ClickException(f"{err.status_code}: {message or err.message}") from None
        except openai.APIConnectionError as err:
            raise click.ClickException(f"cannot reach the service: {err}") from None

    return wrapper


@click.group("batch")
def batch_group() -> None:
    """OpenAI-compatible batches: submit a JSONL file, follow it, download its results."""


@batch_group.command("submit")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default="/v1/chat/completions", show_default=True,
              help="The endpoint every line calls (its 'url').")
@click.option("--queue", default=None, help="Run on this registered queue (header X-BELLA-QUEUE-NAME).")
@click.option("--window", "completion_window", default="24h", show_default=True,
              help="Completion window: 24h, <n>m, <n>h or <n>d.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Metadata pair (repeatable).")
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar and download its results.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between polls with --wait.")
@_connection
@_api_errors
def submit(path: Path, endpoint: str, queue: str | None, completion_window: str, metadata: tuple[str, ...],
           wait: bool, interval: float, base_url: str, api_key: str | None) -> None:
    """Upload PATH (JSONL, one request a line) and create a batch over it."""
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    client = _client(base_url, api_key)
    with path.open("rb") as f:
        uploaded = client.files.create(file=(path.name, f), purpose="batch")
    headers = {"X-BELLA-QUEUE-NAME": queue} if queue else None
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window=completion_window,  # type: ignore[arg-type]
                                  metadata=pairs or None, extra_headers=headers)
    click.echo(f"batch {batch.id} created from {path.name} ({uploaded.bytes} bytes, file {uploaded.id})", err=True)
    if not wait:
        click.echo(batch.id)
        return
    try:
        batch = follow(client, batch.id, interval)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the batch goes on. Check it with: bellaq batch status {batch.id}", err=True)
        sys.exit(130)
    _report(batch)
    for file_id, suffix in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
        if file_id:
            target = path.with_name(f"{path.stem}.{suffix}.jsonl")
            size = download(client, file_id, target)
            click.echo(f"{suffix}: {target} ({size} bytes)", err=True)
    click.echo(batch.id)
    if batch.status != "completed":
        sys.exit(1)


@batch_group.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole Batch object.")
@_connection
@_api_errors
def status(batch_id: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Show a batch's status and request counts."""
    batch = _client(base_url, api_key).batches.retrieve(batch_id)
    if as_json:
        click.echo(json.dumps(batch.model_dump(), indent=2))
        return
    _report(batch)


@batch_group.command("cancel")
@click.argument("batch_id")
@_connection
@_api_errors
def cancel(batch_id: str, base_url: str, api_key: str | None) -> None:
    """Cancel a batch: unfinished requests end as batch_cancelled; finished results stay."""
    batch = _client(base_url, api_key).batches.cancel(batch_id)
    click.echo(f"{batch.id}: {batch.status}")


def _report(batch: Any) -> None:
    counts = batch.request_counts
    line = f"{batch.id}: {batch.status}"
    if counts is not None:
        line += f" - {counts.completed} completed, {counts.failed} failed, {counts.total} total"
    click.echo(line)
    if batch.errors and batch.errors.data:
        for error in batch.errors.data:
            where = f"line {error.line}: " if error.line else ""
            click.echo(f"  {where}{error.code}: {error.message}")
    for name in ("output_file_id", "error_file_id"):
        if getattr(batch, name):
            click.echo(f"  {name}: {getattr(batch, name)}")


def progress_line(status: str, completed: int, failed: int, total: int, rate: float | None, width: int) -> str:
    """One terminal line: a bar, completed/failed/total, the rate and the ETA."""
    done = completed + failed
    text = f" {done}/{total} ({completed} ok, {failed} failed)"
    if rate:
        text += f"  {rate:,.0f} req/s"
        if total > done:
            eta = int((total - done) / rate)
            text += f"  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    text += f"  {status}"
    bar_width = max(10, min(40, width - len(text) - 3))
    filled = int(bar_width * done / total) if total else 0
    return f"[{'#' * filled}{'.' * (bar_width - filled)}]{text}"[: max(20, width - 1)]


def follow(client: Any, batch_id: str, interval: float = 1.0) -> Any:
    """Poll until the batch ends, drawing the progress on one line (a line a change off a TTY)."""
    tty = sys.stderr.isatty()
    started: tuple[float, int] | None = None
    last = ""
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        completed, failed, total = (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)
        now = time.monotonic()
        if started is None and batch.status == "in_progress":
            started = (now, completed + failed)
        rate = None
        if started and now > started[0]:
            rate = (completed + failed - started[1]) / (now - started[0]) or None
        width = shutil.get_terminal_size((100, 20)).columns
        line = progress_line(batch.status, completed, failed, total, rate, width)
        if tty:
            click.echo("\r" + line.ljust(width - 1), nl=False, err=True)
        elif line.split("  ")[0] != last.split("  ")[0] or batch.status in FINAL:
            click.echo(line, err=True)
        last = line
        if batch.status in FINAL:
            if tty:
                click.echo("", err=True)
            return batch
        time.sleep(interval)


def download(client: Any, file_id: str, target: Path) -> int:
    """Stream a file's content to ``target``; returns its size."""
    size = 0
    tmp = target.with_name(target.name + ".part")
    with client.files.with_streaming_response.content(file_id) as response, tmp.open("wb") as out:
        for chunk in response.iter_bytes():
            out.write(chunk)
            size += len(chunk)
    tmp.replace(target)
    return size
