"""``bellaq batch``: submit a JSONL file as a batch, follow it live, resubmit what failed, fetch the results.

Talks HTTP to a running service with ``requests`` (``--base-url``, default ``$BELLAQ_BASE_URL`` or
http://127.0.0.1:8080/v1; ``--api-key``, default ``$BELLAQ_API_KEY``) and follows a batch through
its event stream (``GET /v1/batches/{id}/events``), so it needs nothing beyond bellaq itself.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
FINAL = ("completed", "failed", "expired", "cancelled")
LINES = ("failed", "expired", "cancelled")
RECONNECTS = 5  # a dropped event stream is opened again this many times in a row


class Unreachable(click.ClickException):
    """No answer from the service (as opposed to an error answer)."""


class Api:
    """The calls of the Files and Batch API the command makes. Those that create something send an
    ``Idempotency-Key``, so every call is retried safely on a connection error, 429 or 5xx."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        if not api_key:
            raise click.UsageError("No API key: pass --api-key or set BELLAQ_API_KEY (a key with role user).")
        self.base = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        retry = Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                      raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def call(self, method: str, path: str, stream: bool = False, timeout: tuple[float, float] = (10, 300),
             **kwargs: Any) -> requests.Response:
        """One request; an error answer or no answer becomes a message, not a traceback."""
        try:
            response = self.session.request(method, self.base + path, stream=stream, timeout=timeout, **kwargs)
        except requests.RequestException as err:
            raise Unreachable(f"cannot reach the service: {err}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise click.ClickException(f"{response.status_code}: {message}")
        return response

    def post(self, path: str, **kwargs: Any) -> dict:
        headers = {"Idempotency-Key": str(uuid.uuid4()), **kwargs.pop("headers", {})}
        return self.call("POST", path, headers=headers, **kwargs).json()

    def batch(self, batch_id: str) -> dict:
        return self.call("GET", f"/batches/{batch_id}").json()

    def events(self, batch_id: str) -> Iterator[dict]:
        """The batch's events as they come (server-sent events; comments are keep-alives)."""
        response = self.call("GET", f"/batches/{batch_id}/events", stream=True, timeout=(10, 60))
        with response:
            data: list[str] = []
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def download(self, file_id: str, target: Path) -> int:
        """Stream a file's content to ``target``; returns its size."""
        size = 0
        tmp = target.with_name(target.name + ".part")
        with self.call("GET", f"/files/{file_id}/content", stream=True) as response, tmp.open("wb") as out:
            for chunk in response.iter_content(1 << 16):
                out.write(chunk)
                size += len(chunk)
        tmp.replace(target)
        return size


def _connection(func: Any) -> Any:
    func = click.option("--api-key", envvar="BELLAQ_API_KEY", default=None,
                        help="A user key (default: $BELLAQ_API_KEY).")(func)
    func = click.option("--base-url", envvar="BELLAQ_BASE_URL", default=DEFAULT_BASE_URL, show_default=True,
                        help="The service's /v1 URL (default: $BELLAQ_BASE_URL).")(func)
    return func


@click.group("batch")
def batch_group() -> None:
    """OpenAI-compatible batches: submit a JSONL file, follow it, resubmit what failed, download results."""


@batch_group.command("submit")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default="/v1/chat/completions", show_default=True,
              help="The endpoint every line calls (its 'url').")
@click.option("--queue", default=None, help="Run on this registered queue (header X-BELLA-QUEUE-NAME).")
@click.option("--window", "completion_window", default="24h", show_default=True,
              help="Completion window: 24h, <n>m, <n>h or <n>d.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Metadata pair (repeatable).")
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar and download its results.")
@_connection
def submit(path: Path, endpoint: str, queue: str | None, completion_window: str, metadata: tuple[str, ...],
           wait: bool, base_url: str, api_key: str | None) -> None:
    """Upload PATH (JSONL, one request a line) and create a batch over it."""
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    api = Api(base_url, api_key)
    with path.open("rb") as f:
        uploaded = api.post("/files", files={"file": (path.name, f)}, data={"purpose": "batch"})
    body = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": completion_window,
            "metadata": pairs or None}
    batch = api.post("/batches", json=body, headers={"X-BELLA-QUEUE-NAME": queue} if queue else {})
    click.echo(f"batch {batch['id']} created from {path.name} ({uploaded['bytes']} bytes, file {uploaded['id']})",
               err=True)
    if not wait:
        click.echo(batch["id"])
        return
    batch = _follow_to_end(api, batch["id"])
    for file_id, suffix in ((batch["output_file_id"], "output"), (batch["error_file_id"], "errors")):
        if file_id:
            target = path.with_name(f"{path.stem}.{suffix}.jsonl")
            size = api.download(file_id, target)
            click.echo(f"{suffix}: {target} ({size} bytes)", err=True)
    _exit_with(batch)


@batch_group.command("watch")
@click.argument("batch_id")
@_connection
def watch(batch_id: str, base_url: str, api_key: str | None) -> None:
    """Follow a batch live with a progress bar until it ends (exit 0 only when it completed)."""
    _exit_with(_follow_to_end(Api(base_url, api_key), batch_id))


@batch_group.command("resubmit")
@click.argument("batch_id")
@click.option("--lines", type=click.Choice(LINES), default="failed", show_default=True,
              help="Which lines of the ended batch: every line of its error file, or only expired or cancelled ones.")
@click.option("--queue", default=None, help="Run on this registered queue instead of the original's.")
@click.option("--wait", is_flag=True, help="Follow the new batch with a progress bar until it ends.")
@_connection
def resubmit(batch_id: str, lines: str, queue: str | None, wait: bool, base_url: str, api_key: str | None) -> None:
    """Run again, as a new batch, the lines of an ended batch that did not succeed."""
    api = Api(base_url, api_key)
    batch = api.post(f"/batches/{batch_id}/resubmit", json={"lines": lines},
                     headers={"X-BELLA-QUEUE-NAME": queue} if queue else {})
    click.echo(f"batch {batch['id']} resubmits the {lines} lines of {batch_id}", err=True)
    if not wait:
        click.echo(batch["id"])
        return
    _exit_with(_follow_to_end(api, batch["id"]))


@batch_group.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole Batch object.")
@_connection
def status(batch_id: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Show a batch's status and request counts."""
    batch = Api(base_url, api_key).batch(batch_id)
    if as_json:
        click.echo(json.dumps(batch, indent=2))
        return
    _report(batch)


@batch_group.command("cancel")
@click.argument("batch_id")
@_connection
def cancel(batch_id: str, base_url: str, api_key: str | None) -> None:
    """Cancel a batch: unfinished requests end as batch_cancelled; finished results stay."""
    batch = Api(base_url, api_key).post(f"/batches/{batch_id}/cancel")
    click.echo(f"{batch['id']}: {batch['status']}")


def _follow_to_end(api: Api, batch_id: str) -> dict:
    try:
        return follow(api, batch_id)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the batch goes on. Check it with: bellaq batch status {batch_id}", err=True)
        sys.exit(130)


def _exit_with(batch: dict) -> None:
    """Report the ended batch; exit 0 when it completed, 1 for failed, expired or cancelled."""
    _report(batch)
    click.echo(batch["id"])
    if batch["status"] != "completed":
        sys.exit(1)


def _report(batch: dict) -> None:
    counts = batch.get("request_counts") or {}
    line = f"{batch['id']}: {batch['status']}"
    if counts:
        line += f" - {counts['completed']} completed, {counts['failed']} failed, {counts['total']} total"
    click.echo(line)
    for error in (batch.get("errors") or {}).get("data") or []:
        where = f"line {error['line']}: " if error.get("line") else ""
        click.echo(f"  {where}{error['code']}: {error['message']}")
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            click.echo(f"  {name}: {batch[name]}")


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


class _Bar:
    """The progress bar: redrawn in place on a terminal, a line per change of counts otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started: tuple[float, int] | None = None
        self.last = ""

    def show(self, event: dict) -> None:
        counts = event.get("request_counts") or {}
        completed, failed, total = counts.get("completed", 0), counts.get("failed", 0), counts.get("total", 0)
        now = time.monotonic()
        if self.started is None and event["status"] == "in_progress":
            self.started = (now, completed + failed)
        rate = None
        if self.started and now > self.started[0]:
            rate = (completed + failed - self.started[1]) / (now - self.started[0]) or None
        width = shutil.get_terminal_size((100, 20)).columns
        line = progress_line(event["status"], completed, failed, total, rate, width)
        if self.tty:
            click.echo("\r" + line.ljust(width - 1), nl=False, err=True)
        elif line.split("  ")[0] != self.last.split("  ")[0] or event["status"] in FINAL:
            click.echo(line, err=True)
        self.last = line
        if self.tty and event["status"] in FINAL:
            click.echo("", err=True)


def follow(api: Api, batch_id: str) -> dict:
    """Follow the batch's event stream until its final event (the whole Batch object), drawing the
    progress; a dropped stream is opened again (it starts with the current state)."""
    bar = _Bar()
    failures = 0
    while True:
        try:
            for event in api.events(batch_id):
                failures = 0
                bar.show(event)
                if event["status"] in FINAL:
                    return event
            problem: object = "the stream closed before the batch ended"
        except (requests.RequestException, Unreachable) as err:
            problem = err
        failures += 1
        if failures > RECONNECTS:
            raise click.ClickException(f"lost the event stream of {batch_id}: {problem}")
        time.sleep(min(0.5 * 2 ** failures, 10))
