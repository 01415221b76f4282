"""File storage: one interface, a local-directory backend (default) and an S3-compatible one.

Everything streams: uploads are written in 64 KiB pieces (S3: 8 MiB multipart parts), downloads
are read in chunks, and nothing ever holds a whole file in memory. A write becomes visible only
when it is complete (temporary file + atomic rename locally, a completed multipart upload on S3);
a failed or too large write leaves nothing behind.

Keys are relative, ``/``-separated paths such as ``files/file-abc`` or ``batches/b1/out.0``.
A missing key raises :class:`FileNotFoundError` from ``open``, ``iter_bytes``, ``size`` and as a
source of ``concat``, on every backend.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from .config import Settings

CHUNK_SIZE = 64 * 1024
S3_PART_SIZE = 8 * 1024 * 1024  # S3 needs parts >= 5 MiB (except the last one)
_TMP_DIR = ".tmp"


class FileTooLarge(Exception):
    """A write went past its ``max_bytes`` limit; nothing was stored."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"file is larger than the limit of {limit} bytes; send a file of at most {limit} bytes"
        )


@runtime_checkable
class Storage(Protocol):
    """What every storage backend offers."""

    def save_stream(self, key: str, stream: BinaryIO | Iterable[bytes], max_bytes: int | None = None) -> int:
        """Store ``stream`` under ``key`` in chunks; return the byte count (FileTooLarge past max_bytes)."""
        ...

    def open_writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Writable stream committed on successful exit of the ``with`` block, discarded on error."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Readable, line-iterable binary stream of the object."""
        ...

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The object's bytes in chunks (for streamed downloads)."""
        ...

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; no error if it is missing."""
        ...

    def concat(self, dest_key: str, source_keys: Sequence[str]) -> int:
        """Write the sources one after another into ``dest_key``; return its size."""
        ...


# --------------------------------------------------------------------------- helpers


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string such as 'files/file-abc'")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"storage key {key!r} contains a NUL or backslash; use '/'-separated names")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise ValueError(f"storage key {key!r} is absolute; use a relative key such as 'files/file-abc'")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"storage key {key!r} has an empty, '.' or '..' segment; use plain names joined by '/'"
            )
        if part.startswith("."):
            raise ValueError(f"storage key {key!r} has a segment starting with '.', which is reserved")
    return key


def _iter_source(stream: BinaryIO | Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Chunks of a binary stream (anything with ``read``) or of an iterable of bytes."""
    read = getattr(stream, "read", None)
    if callable(read):
        while True:
            chunk = read(chunk_size)
            if not chunk:
                return
            if isinstance(chunk, str):
                raise TypeError("save_stream needs a binary stream, got a text stream")
            yield chunk
    else:
        for chunk in stream:  # type: ignore[union-attr]
            if isinstance(chunk, str):
                raise TypeError("save_stream needs an iterable of bytes, got str")
            if chunk:
                yield chunk


def _copy_limited(stream: BinaryIO | Iterable[bytes], out: BinaryIO, max_bytes: int | None) -> int:
    total = 0
    for chunk in _iter_source(stream):
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise FileTooLarge(max_bytes)
        out.write(chunk)
    return total


# --------------------------------------------------------------------------- local directory


class LocalStorage:
    """Files in a directory tree; ``a/b/c`` is stored at ``<root>/a/b/c``.

    Writes go to ``<root>/.tmp/`` first and are moved into place with an atomic rename, so a
    reader never sees a half-written file. Keys may not contain ``..``, start with ``/`` or have a
    segment starting with ``.`` (ValueError).
    """

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        if not str(root):
            raise ValueError("LocalStorage needs a directory; set BELLAQ_FILES_DIR")
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / _TMP_DIR

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Absolute path of ``key`` (validated)."""
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key {key!r} points outside the storage directory")
        return path

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        dest = self.path(key)
        self._tmp.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        f = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
        try:
            yield f  # type: ignore[misc]
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            f.close()
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def save_stream(self, key: str, stream: BinaryIO | Iterable[bytes], max_bytes: int | None = None) -> int:
        """Store ``stream`` under ``key`` in 64 KiB chunks; return the byte count.

        Raises FileTooLarge as soon as more than ``max_bytes`` arrive; nothing is left behind.
        """
        with self._atomic(key) as out:
            return _copy_limited(stream, out, max_bytes)

    def open_writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Writable stream committed atomically on successful exit, discarded on exception."""
        return self._atomic(key)

    def open(self, key: str) -> BinaryIO:
        """Buffered binary reader of ``key`` (iterate it for lines)."""
        return open(self.path(key), "rb", buffering=CHUNK_SIZE)  # noqa: SIM115

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks of ``key``; FileNotFoundError is raised at once, not on the first ``next``."""
        f = self.open(key)

        def gen() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return gen()

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes."""
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Delete ``key``; no error if missing."""
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def concat(self, dest_key: str, source_keys: Sequence[str]) -> int:
        """Stream the sources into ``dest_key`` (atomically); return its size."""
        return _concat(self, dest_key, source_keys)

    def purge_temp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by a killed process; return how many were removed."""
        if not self._tmp.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than
        for entry in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed


def _concat(storage: Storage, dest_key: str, source_keys: Sequence[str]) -> int:
    total = 0
    with storage.open_writer(dest_key) as out:
        for src in source_keys:
            for chunk in storage.iter_bytes(src):
                out.write(chunk)
                total += len(chunk)
    return total


# --------------------------------------------------------------------------- S3


class _S3Writer(io.RawIOBase):
    """Write-only stream that uploads to S3 in parts of ``part_size`` bytes.

    Small objects (below one part) are sent with one ``put_object``; larger ones as a multipart
    upload. Memory use is one part. :meth:`commit` completes the upload, :meth:`abort` drops it.
    """

    def __init__(self, client: Any, bucket: str, key: str, part_size: int = S3_PART_SIZE) -> None:
        super().__init__()
        self._client = client
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed S3 writer")
        data = memoryview(b).cast("B")
        n = len(data)
        self._buf += data
        self.bytes_written += n
        while len(self._buf) >= self._part_size:
            part = bytes(self._buf[: self._part_size])
            del self._buf[: self._part_size]
            self._upload_part(part)
        return n

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            resp = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def commit(self) -> None:
        """Make the object visible."""
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buf))
        else:
            if self._buf:
                self._upload_part(bytes(self._buf))
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._buf = bytearray()
        self.close()

    def abort(self) -> None:
        """Drop everything written so far."""
        self._buf = bytearray()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None
        self.close()


class _S3Raw(io.RawIOBase):
    """Raw stream over a botocore ``StreamingBody`` so it can sit in an ``io.BufferedReader``."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self._body.read(len(view))
        n = len(data)
        view[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class S3Storage:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph, R2, ...).

    Configured by a URL ``s3://bucket/prefix?endpoint_url=http://host:9000&region=us-east-1``
    (query parameters optional; ``addressing_style=path|virtual`` also accepted). Credentials come
    from the usual ``AWS_*`` environment variables / boto3 configuration.
    """

    _PARAMS = ("endpoint_url", "region", "region_name", "addressing_style")

    def __init__(self, url: str, client: Any = None, part_size: int = S3_PART_SIZE) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(
                f"S3 storage URL {url!r} is not valid; use s3://bucket/prefix?endpoint_url=...&region=..."
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - set(self._PARAMS))
        if unknown:
            raise ValueError(
                f"S3 storage URL has unknown parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(self._PARAMS)}"
            )
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 part_size must be at least 5 MiB")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.part_size = part_size
        if client is None:
            import boto3
            from botocore.config import Config

            config = None
            if query.get("addressing_style"):
                config = Config(s3={"addressing_style": query["addressing_style"]})
            client = boto3.client(
                "s3",
                endpoint_url=query.get("endpoint_url") or None,
                region_name=query.get("region") or query.get("region_name") or None,
                config=config,
            )
        self.client = client

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def object_key(self, key: str) -> str:
        """The S3 object key of ``key`` (validated, with the prefix)."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        response = getattr(exc, "response", None)
        if not isinstance(response, dict):
            return False
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("404", "NoSuchKey", "NotFound") or status == 404

    def _get(self, key: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
        except ClientError as exc:
            if self._is_missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from None
            raise

    @contextlib.contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        writer = _S3Writer(self.client, self.bucket, self.object_key(key), self.part_size)
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        try:
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def save_stream(self, key: str, stream: BinaryIO | Iterable[bytes], max_bytes: int | None = None) -> int:
        """Upload ``stream`` (multipart, one part in memory at a time); return the byte count.

        Raises FileTooLarge as soon as more than ``max_bytes`` arrive; the upload is aborted.
        """
        with self._writer(key) as out:
            return _copy_limited(stream, out, max_bytes)

    def open_writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Writable stream; the object appears on successful exit, the upload is aborted on error."""
        return self._writer(key)

    def open(self, key: str) -> BinaryIO:
        """Buffered, line-iterable reader over the object's streaming body."""
        return io.BufferedReader(_S3Raw(self._get(key)), buffer_size=CHUNK_SIZE)  # type: ignore[return-value]

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks of the object; FileNotFoundError is raised at once."""
        body = self._get(key)

        def gen() -> Iterator[bytes]:
            try:
                while chunk := body.read(chunk_size):
                    yield chunk
            finally:
                body.close()

        return gen()

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if self._is_missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from None
            raise
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete the object; no error if missing."""
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if not self._is_missing(exc):
                raise

    def concat(self, dest_key: str, source_keys: Sequence[str]) -> int:
        """Stream the sources into one new object ``dest_key``; return its size."""
        return _concat(self, dest_key, source_keys)


def storage_from_settings(settings: Settings) -> Storage:
    """S3 storage if ``files_s3_url`` is set, else a local directory at ``files_dir``."""
    if settings.files_s3_url:
        return S3Storage(settings.files_s3_url)
    files_dir = settings.files_dir or str(Path(settings.instance_dir) / "files")
    return LocalStorage(files_dir)
