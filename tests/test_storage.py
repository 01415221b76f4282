"""Storage backends: LocalStorage thoroughly, S3Storage against moto's real HTTP server (if installed)."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bellaq.config import Settings
from bellaq.storage import (
    CHUNK_SIZE,
    FileTooLarge,
    LocalStorage,
    S3Storage,
    Storage,
    storage_from_settings,
)

MiB = 1024 * 1024


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _chunks(total: int, size: int = CHUNK_SIZE, seed: int = 0) -> Iterator[bytes]:
    """Deterministic, non-repeating-ish bytes, generated lazily."""
    block = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    sent = i = 0
    while sent < total:
        n = min(size, total - sent)
        chunk = bytes([i % 251]) + block[: n - 1] if n > 1 else bytes([i % 251])
        yield chunk
        sent += n
        i += 1


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "files")


# ----------------------------------------------------------------- behaviour common to backends


def _common_contract(st: Storage) -> None:
    payload = bytes(range(256)) * 1000 + b"\r\n\x00tail"
    assert st.save_stream("a/b/c.bin", io.BytesIO(payload)) == len(payload)
    assert st.exists("a/b/c.bin")
    assert st.size("a/b/c.bin") == len(payload)
    with st.open("a/b/c.bin") as f:
        assert f.read() == payload
    assert b"".join(st.iter_bytes("a/b/c.bin", chunk_size=1000)) == payload
    assert all(len(c) <= 1000 for c in st.iter_bytes("a/b/c.bin", chunk_size=1000))

    # iterable of bytes, including empty chunks and bytearrays
    assert st.save_stream("it", [b"ab", b"", bytearray(b"cd"), memoryview(b"ef")]) == 6
    with st.open("it") as f:
        assert f.read() == b"abcdef"

    # empty file
    assert st.save_stream("empty", iter([])) == 0
    assert st.exists("empty") and st.size("empty") == 0
    assert b"".join(st.iter_bytes("empty")) == b""

    # overwrite
    st.save_stream("it", [b"new"])
    assert st.size("it") == 3

    # lines
    lines = [f'{{"custom_id": "r{i}"}}\n'.encode() for i in range(5000)]
    st.save_stream("in.jsonl", iter(lines))
    with st.open("in.jsonl") as f:
        assert list(f) == lines
    with st.open("in.jsonl") as f:
        assert f.readline() == lines[0]
        assert next(iter(f)) == lines[1]

    # writer commit / discard
    with st.open_writer("out/w") as w:
        for line in lines[:100]:
            w.write(line)
        assert not st.exists("out/w")
    assert b"".join(st.iter_bytes("out/w")) == b"".join(lines[:100])
    with pytest.raises(RuntimeError):
        with st.open_writer("out/x") as w:
            w.write(b"half")
            raise RuntimeError("boom")
    assert not st.exists("out/x")
    # a failed rewrite keeps the old content
    with pytest.raises(RuntimeError):
        with st.open_writer("out/w") as w:
            w.write(b"replacement")
            raise RuntimeError("boom")
    assert b"".join(st.iter_bytes("out/w")) == b"".join(lines[:100])

    # concat
    st.save_stream("s/0", [b"zero\n"])
    st.save_stream("s/1", [b""])
    st.save_stream("s/2", [b"two\n", b"more\n"])
    assert st.concat("joined", ["s/0", "s/1", "s/2"]) == 14
    assert b"".join(st.iter_bytes("joined")) == b"zero\ntwo\nmore\n"
    assert st.concat("none", []) == 0
    assert st.size("none") == 0
    with pytest.raises(FileNotFoundError):
        st.concat("bad", ["s/0", "s/missing"])
    assert not st.exists("bad")

    # too large: nothing left behind, old object untouched
    with pytest.raises(FileTooLarge) as info:
        st.save_stream("big", io.BytesIO(b"x" * 10_001), max_bytes=10_000)
    assert info.value.limit == 10_000
    assert "10000" in str(info.value)
    assert not st.exists("big")
    assert st.save_stream("big", io.BytesIO(b"x" * 10_000), max_bytes=10_000) == 10_000
    with pytest.raises(FileTooLarge):
        st.save_stream("big", [b"y" * 6000, b"y" * 6000], max_bytes=10_000)
    assert b"".join(st.iter_bytes("big")) == b"x" * 10_000

    # missing keys
    assert not st.exists("nope")
    for call in (lambda: st.open("nope"), lambda: st.iter_bytes("nope"), lambda: st.size("nope")):
        with pytest.raises(FileNotFoundError):
            call()
    st.delete("nope")
    st.delete("a/b/c.bin")
    assert not st.exists("a/b/c.bin")
    st.delete("a/b/c.bin")

    # text is refused
    with pytest.raises(TypeError):
        st.save_stream("t", io.StringIO("text"))
    with pytest.raises(TypeError):
        st.save_stream("t", ["text"])  # type: ignore[list-item]
    assert not st.exists("t")

    # bad keys
    for bad in ("", "/abs", "a/../b", "..", "a//b", "a/./b", ".hidden", "a\\b", "C:/x"):
        with pytest.raises(ValueError):
            st.exists(bad)


def test_local_contract(local: LocalStorage) -> None:
    assert isinstance(local, Storage)
    _common_contract(local)


# ----------------------------------------------------------------- LocalStorage specifics


def test_local_layout_and_round_trip(local: LocalStorage) -> None:
    data = os.urandom(3 * MiB + 17)
    assert local.save_stream("files/file-abc", io.BytesIO(data)) == len(data)
    path = local.root / "files" / "file-abc"
    assert path.read_bytes() == data
    assert local.path("files/file-abc") == path
    assert (
        hashlib.sha256(b"".join(local.iter_bytes("files/file-abc"))).digest() == hashlib.sha256(data).digest()
    )


def test_too_large_leaves_no_file_and_no_temp(local: LocalStorage) -> None:
    with pytest.raises(FileTooLarge):
        local.save_stream("files/big", _chunks(5 * MiB), max_bytes=MiB)
    assert _files_under(local.root) == []


def test_too_large_stops_reading_early(local: LocalStorage) -> None:
    pulled = 0

    def gen() -> Iterator[bytes]:
        nonlocal pulled
        for chunk in _chunks(100 * MiB):
            pulled += len(chunk)
            yield chunk

    with pytest.raises(FileTooLarge):
        local.save_stream("big", gen(), max_bytes=MiB)
    assert pulled <= MiB + CHUNK_SIZE


def test_writer_discard_leaves_nothing(local: LocalStorage) -> None:
    with pytest.raises(KeyboardInterrupt):
        with local.open_writer("batch/out.0") as w:
            w.write(b"x" * 100_000)
            raise KeyboardInterrupt
    assert _files_under(local.root) == []


def test_no_temp_files_after_success(local: LocalStorage) -> None:
    local.save_stream("x/y", [b"1"])
    with local.open_writer("x/z") as w:
        w.write(b"2")
    local.concat("x/j", ["x/y", "x/z"])
    assert [p.relative_to(local.root).as_posix() for p in _files_under(local.root)] == ["x/j", "x/y", "x/z"]


def test_concat_into_one_of_its_sources(local: LocalStorage) -> None:
    local.save_stream("a", [b"A"])
    local.save_stream("b", [b"B"])
    assert local.concat("a", ["a", "b", "a"]) == 3
    assert local.path("a").read_bytes() == b"ABA"


def test_concat_large_shards(local: LocalStorage) -> None:
    digests = hashlib.sha256()
    keys = []
    for i in range(4):
        data = b"".join(_chunks(MiB + i, seed=i))
        digests.update(data)
        local.save_stream(f"shards/{i}", [data])
        keys.append(f"shards/{i}")
    assert local.concat("joined", keys) == 4 * MiB + 6
    assert hashlib.sha256(local.path("joined").read_bytes()).digest() == digests.digest()


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../escape", "/etc/passwd", "..", "a/..", "./a", "a//b", "", ".tmp/x", "a\x00b"],
)
def test_local_rejects_bad_keys(local: LocalStorage, key: str) -> None:
    for call in (
        lambda: local.save_stream(key, [b"x"]),
        lambda: local.open(key),
        lambda: local.exists(key),
        lambda: local.delete(key),
        lambda: local.size(key),
    ):
        with pytest.raises(ValueError):
            call()
    assert _files_under(local.root) == []


def test_local_rejects_symlink_escape(local: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (local.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        local.save_stream("link/x", [b"x"])
    assert list(outside.iterdir()) == []


def test_fifty_megabytes_with_flat_memory(local: LocalStorage) -> None:
    total = 50 * MiB
    block = os.urandom(CHUNK_SIZE)

    def gen() -> Iterator[bytes]:
        for i in range(total // CHUNK_SIZE):
            yield bytes([i % 256]) + block[1:]  # a fresh 64 KiB object each time

    tracemalloc.start()
    try:
        written = local.save_stream("files/fifty", gen(), max_bytes=200 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == total
    assert local.size("files/fifty") == total
    assert peak < 3 * MiB, f"peak {peak / MiB:.1f} MiB"

    tracemalloc.start()
    try:
        n = sum(len(c) for c in local.iter_bytes("files/fifty"))
        with local.open("files/fifty") as f:
            lines = sum(1 for _ in f)  # random bytes hold some newlines: iteration must stream
        local.concat("files/copy", ["files/fifty"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == total and lines > 0
    assert local.size("files/copy") == total
    assert peak < 3 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_purge_temp(local: LocalStorage) -> None:
    tmp = local.root / ".tmp"
    tmp.mkdir(exist_ok=True)
    stale = tmp / "dead.part"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    fresh = tmp / "live.part"
    fresh.write_bytes(b"y")
    assert local.purge_temp(older_than=3600) == 1
    assert not stale.exists() and fresh.exists()


def test_storage_from_settings(tmp_path: Path) -> None:
    st = storage_from_settings(Settings(instance_dir=tmp_path, files_dir=str(tmp_path / "fd")))
    assert isinstance(st, LocalStorage)
    assert st.root == (tmp_path / "fd").resolve()
    st = storage_from_settings(Settings(instance_dir=tmp_path, files_dir=""))
    assert isinstance(st, LocalStorage)
    assert st.root == (tmp_path / "files").resolve()


def test_s3_url_validation() -> None:
    for bad in ("http://bucket/x", "s3:///prefix", "s3://b/p?bogus=1"):
        with pytest.raises(ValueError):
            S3Storage(bad, client=object())
    st = S3Storage("s3://bkt/some/prefix/?region=us-east-1", client=object())
    assert (st.bucket, st.prefix) == ("bkt", "some/prefix")
    assert st.object_key("files/x") == "some/prefix/files/x"
    assert S3Storage("s3://bkt", client=object()).object_key("k") == "k"
    with pytest.raises(ValueError):
        st.object_key("../x")


def test_storage_from_settings_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3  # noqa: F401
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    st = storage_from_settings(
        Settings(
            instance_dir=tmp_path,
            files_dir=str(tmp_path),
            files_s3_url="s3://bkt/pre?endpoint_url=http://127.0.0.1:1&region=eu-west-1",
        )
    )
    assert isinstance(st, S3Storage)
    assert st.client.meta.region_name == "eu-west-1"
    assert st.client.meta.endpoint_url == "http://127.0.0.1:1"


# ----------------------------------------------------------------- S3 against moto's HTTP server


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    import boto3  # noqa: F401
    import moto.server as server_mod
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    import uuid

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bucket = f"bq-{uuid.uuid4().hex[:12]}"
    st = S3Storage(f"s3://{bucket}/pre/fix?endpoint_url={moto_endpoint}&region=us-east-1", part_size=5 * MiB)
    st.client.create_bucket(Bucket=bucket)
    return st


def _s3_leftovers(st: S3Storage) -> tuple[list[str], list[str]]:
    objects = st.client.list_objects_v2(Bucket=st.bucket).get("Contents", [])
    uploads = st.client.list_multipart_uploads(Bucket=st.bucket).get("Uploads", [])
    return sorted(o["Key"] for o in objects), [u["Key"] for u in uploads]


def test_s3_contract(s3: S3Storage) -> None:
    _common_contract(s3)
    keys, uploads = _s3_leftovers(s3)
    assert uploads == []
    assert all(k.startswith("pre/fix/") for k in keys)


def test_s3_multipart_round_trip(s3: S3Storage) -> None:
    total = 12 * MiB + 123  # three parts of 5 MiB
    digest = hashlib.sha256()
    for chunk in _chunks(total, seed=7):
        digest.update(chunk)
    assert s3.save_stream("files/big", _chunks(total, seed=7), max_bytes=20 * MiB) == total
    assert s3.size("files/big") == total
    got = hashlib.sha256()
    for chunk in s3.iter_bytes("files/big"):
        got.update(chunk)
    assert got.digest() == digest.digest()
    head = s3.client.head_object(Bucket=s3.bucket, Key="pre/fix/files/big")
    assert head["ETag"].strip('"').endswith("-3")  # really multipart
    assert _s3_leftovers(s3) == (["pre/fix/files/big"], [])


def test_s3_too_large_aborts_multipart(s3: S3Storage) -> None:
    with pytest.raises(FileTooLarge) as info:
        s3.save_stream("files/huge", _chunks(30 * MiB), max_bytes=11 * MiB)
    assert info.value.limit == 11 * MiB
    assert _s3_leftovers(s3) == ([], [])


def test_s3_writer_discard_aborts_multipart(s3: S3Storage) -> None:
    with pytest.raises(RuntimeError):
        with s3.open_writer("batch/out.0") as w:
            for chunk in _chunks(11 * MiB):
                w.write(chunk)
            raise RuntimeError("worker died")
    assert _s3_leftovers(s3) == ([], [])


def test_s3_open_iterates_lines_across_parts(s3: S3Storage) -> None:
    lines = [f'{{"custom_id": "req-{i}", "pad": "{"p" * (i % 300)}"}}\n'.encode() for i in range(40_000)]
    with s3.open_writer("in.jsonl") as w:
        for line in lines:
            w.write(line)
    assert s3.size("in.jsonl") == sum(map(len, lines)) > 5 * MiB
    with s3.open("in.jsonl") as f:
        for expected, got in zip(lines, f, strict=True):
            assert got == expected


def test_s3_concat_large_shards(s3: S3Storage) -> None:
    digest = hashlib.sha256()
    keys = []
    for i in range(3):
        data = b"".join(_chunks(3 * MiB + i, seed=i))
        digest.update(data)
        s3.save_stream(f"shards/{i}", [data])
        keys.append(f"shards/{i}")
    assert s3.concat("joined", keys) == 9 * MiB + 3
    got = hashlib.sha256(b"".join(s3.iter_bytes("joined"))).digest()
    assert got == digest.digest()
