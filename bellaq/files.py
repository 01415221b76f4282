"""The file service (OpenAI Files API): streamed uploads, listing, reading and deleting.

An upload is parsed as it arrives (werkzeug's sans-IO multipart decoder) and the ``file`` part
goes straight to the storage backend in chunks: no temporary copy, no whole file in memory.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, MultipartDecoder, NeedData
from werkzeug.sansio.multipart import File as FilePart

from bellaq.clock import now_s
from bellaq.errors import BadRequest, NotFound, TooLarge
from bellaq.extensions import db
from bellaq.keys import Principal
from bellaq.models import File
from bellaq.models.files import UPLOAD_PURPOSES
from bellaq.services import services
from bellaq.storage import CHUNK_SIZE, FileTooLarge

MAX_FIELD_BYTES = 4096
MAX_PARTS = 16
MAX_PENDING = 64 * 1024
MAX_BOUNDARY = 200
MAX_FILENAME = 255


def time_ordered_id(prefix: str) -> str:
    """``prefix`` + 12 hex digits of the ms clock + 12 random hex digits: sorts by creation time."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def new_file_id() -> str:
    return time_ordered_id("file-")


def storage_key(file_id: str) -> str:
    return f"files/{file_id}"


# ------------------------------------------------------------------------------------------ upload

def _events(stream: BinaryIO, boundary: bytes) -> Iterator[Field | FilePart | Data]:
    """The multipart events of ``stream`` (fields, file parts, data), read in chunks.

    Parts are counted here rather than by the decoder, whose own limit answers a misleading 413.
    """
    decoder = MultipartDecoder(boundary)
    parts = 0
    while True:
        chunk = stream.read(CHUNK_SIZE)
        decoder.receive_data(chunk or None)
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData):
                break
            if isinstance(event, Epilogue):
                return
            if isinstance(event, Field | FilePart):
                parts += 1
                if parts > MAX_PARTS:
                    raise BadRequest(f"The form has more than {MAX_PARTS} parts; send a 'file' part and a "
                                     "'purpose' field.", code="too_many_parts")
                if not event.name:
                    raise BadRequest("A form part has no name; name the parts 'file' and 'purpose'.",
                                     code="invalid_multipart")
            yield event  # type: ignore[misc]
        if len(decoder.buffer) > MAX_PENDING:
            # Still looking for a boundary or the end of a part's headers: refuse rather than buffer.
            raise BadRequest(f"The multipart body has a preamble or part headers longer than {MAX_PENDING} bytes.",
                             code="invalid_multipart")
        if not chunk:
            raise BadRequest("The multipart body ended before its closing boundary; send the whole form.",
                             code="invalid_multipart")


def _part_data(events: Iterator[Field | FilePart | Data]) -> Iterator[bytes]:
    """The data of the part just started, chunk by chunk."""
    for event in events:
        if not isinstance(event, Data):  # pragma: no cover - the decoder always sends Data first
            raise BadRequest("Malformed multipart body.", code="invalid_multipart")
        if event.data:
            yield event.data
        if not event.more_data:
            return


def check_purpose(purpose: str | None) -> str:
    if purpose is None or purpose == "":
        raise BadRequest("Missing required field 'purpose'; use purpose=batch.", param="purpose",
                         code="missing_field")
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(f"Purpose '{purpose[:64]}' is not accepted here; use one of: {', '.join(UPLOAD_PURPOSES)}.",
                         param="purpose", code="invalid_purpose")
    return purpose


def upload(principal: Principal, get_stream: Callable[[], BinaryIO], content_type: str | None,
           content_length: int | None) -> File:
    """Store the ``file`` part of a multipart upload under a new id and record it; all or nothing.

    ``get_stream`` gives the body stream; it is called only once the declared size is known to fit.
    """
    settings = services().settings
    storage = services().storage
    limit = settings.file_max_bytes
    if content_length is not None and content_length > limit + 64 * 1024:
        raise TooLarge(f"The upload is {content_length} bytes; a file may be at most {limit} bytes.",
                       param="file", code="file_too_large")
    mimetype, options = parse_options_header(content_type or "")
    boundary = options.get("boundary", "")
    if mimetype != "multipart/form-data" or not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise BadRequest("Send multipart/form-data (with an ASCII boundary of at most "
                         f"{MAX_BOUNDARY} characters) holding a 'file' part and a 'purpose' field.",
                         code="invalid_content_type")
    file_id = new_file_id()
    key = storage_key(file_id)
    fields: dict[str, str] = {}
    stored: tuple[str, int] | None = None
    try:
        events = _events(get_stream(), boundary.encode("ascii"))
        for event in events:
            if isinstance(event, FilePart) and event.name == "file" and stored is None:
                if "purpose" in fields:
                    check_purpose(fields["purpose"])
                try:
                    size = storage.save_stream(key, _part_data(events), max_bytes=limit)
                except FileTooLarge:
                    raise TooLarge(f"The file is larger than the limit of {limit} bytes.", param="file",
                                   code="file_too_large") from None
                stored = (event.filename or "", size)
            elif isinstance(event, FilePart):
                for _ in _part_data(events):
                    pass
            elif isinstance(event, Field):
                value = b""
                for data in _part_data(events):
                    value += data
                    if len(value) > MAX_FIELD_BYTES:
                        raise BadRequest(f"Form field '{event.name[:64]}' is longer than {MAX_FIELD_BYTES} bytes.",
                                         param=event.name[:64], code="field_too_large")
                fields[event.name] = value.decode("utf-8", "replace")
    except RequestEntityTooLarge:
        _discard(key, stored)
        raise TooLarge(f"The upload is larger than the limit of {limit} bytes.", param="file",
                       code="file_too_large") from None
    except ValueError as err:
        _discard(key, stored)
        raise BadRequest(f"The multipart body is malformed ({err}).", code="invalid_multipart") from None
    except Exception:
        _discard(key, stored)
        raise
    try:
        purpose = check_purpose(fields.get("purpose"))
        if stored is None:
            raise BadRequest("Missing required part 'file' (the file's bytes, with a filename).", param="file",
                             code="missing_field")
        filename, size = stored
        row = File(
            id=file_id,
            owner=principal.owner,
            filename=os.path.basename(filename.replace("\\", "/"))[:MAX_FILENAME] or "upload",
            purpose=purpose,
            bytes=size,
            storage_key=key,
            created_at=now_s(),
            expires_at=None,
        )
        db.session.add(row)
        db.session.commit()
    except Exception:
        db.session.rollback()
        _discard(key, stored)
        raise
    return row


def _discard(key: str, stored: tuple[str, int] | None) -> None:
    if stored is not None:
        services().storage.delete(key)


def create_from_storage(owner: str, purpose: str, filename: str, key: str, size: int, file_id: str) -> File:
    """A File row for an object already written to storage (batch results); not committed."""
    row = File(id=file_id, owner=owner, filename=filename[:MAX_FILENAME], purpose=purpose, bytes=size,
               storage_key=key, created_at=now_s(), expires_at=None)
    db.session.add(row)
    return row


# ------------------------------------------------------------------------------------------ read

def find(owner: str, file_id: str) -> File | None:
    """The owner's live file, or None."""
    row = db.session.get(File, file_id)
    if row is None or row.deleted_at is not None or row.owner != owner:
        return None
    return row


def get(principal: Principal, file_id: str, param: str = "file_id") -> File:
    """The caller's file; another owner's file is simply not found."""
    row = find(principal.owner, file_id)
    if row is None:
        raise NotFound(f"No file with id '{file_id}'.", param=param, code="file_not_found")
    return row


def list_files(principal: Principal, purpose: str | None, limit: int, after: str | None,
               order: str = "desc") -> tuple[list[File], bool]:
    """A page of the caller's files and whether more follow (ids are time-ordered)."""
    query = db.select(File).where(File.owner == principal.owner, File.deleted_at.is_(None))
    if purpose:
        query = query.where(File.purpose == purpose)
    if order == "asc":
        if after:
            query = query.where(File.id > after)
        query = query.order_by(File.id.asc())
    else:
        if after:
            query = query.where(File.id < after)
        query = query.order_by(File.id.desc())
    rows = list(db.session.execute(query.limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def open_file(row: File) -> BinaryIO:
    """A line-iterable binary reader of the file's bytes."""
    return services().storage.open(row.storage_key)


def iter_content(row: File) -> Iterator[bytes]:
    """The file's bytes in chunks; a file whose bytes are gone is not found."""
    try:
        return services().storage.iter_bytes(row.storage_key)
    except FileNotFoundError:
        raise NotFound(f"The bytes of file '{row.id}' are gone from storage.", param="file_id",
                       code="file_not_found") from None


def delete(principal: Principal, file_id: str) -> File:
    """Forget the file and delete its bytes."""
    row = get(principal, file_id)
    row.deleted_at = now_s()
    db.session.commit()
    services().storage.delete(row.storage_key)
    return row
