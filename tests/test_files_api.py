"""The Files API (SPEC 1) with the official SDK in strict mode, raw HTTP, limits and tenancy."""

from __future__ import annotations

import io
import os
import tracemalloc

import openai
import pytest
import requests

from bellaq import create_app
from bellaq.db import init_db
from tests.batch_fixtures import sdk, upload
from tests.conftest import LiveServer, running_app


def stored_objects(settings) -> list[str]:
    root = settings.files_dir
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "/.tmp" not in d]


def test_sdk_round_trip_is_byte_exact(live_server, user, tmp_path):
    client = sdk(live_server.url, user)
    payload = b'{"custom_id": "a"}\r\n' + bytes(range(256)) * 300 + b"\n\xff\xfe end"
    path = tmp_path / "input.jsonl"
    path.write_bytes(payload)
    with path.open("rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(payload) and created.filename == "input.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    assert isinstance(created.created_at, int) and created.created_at < 10**11  # seconds, not ms
    assert created.expires_at is None

    got = client.files.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    assert client.files.content(created.id).content == payload
    listed = client.files.list()
    assert [f.id for f in listed.data] == [created.id]
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    assert client.files.list().data == []


def test_list_pages_newest_first_with_correct_has_more(live_server, user, client):
    ids = [upload(client, user, f"{i}\n".encode(), f"f{i}.jsonl")["id"] for i in range(5)]
    api = sdk(live_server.url, user)
    page = api.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2]
    assert page.has_more is True
    assert [f.id for f in api.files.list(limit=2)] == ids[::-1]  # auto-paging ends
    raw = client.get("/v1/files?limit=5", headers=user).json
    assert raw["object"] == "list" and raw["has_more"] is False
    assert (raw["first_id"], raw["last_id"]) == (ids[-1], ids[0])
    asc = client.get("/v1/files?order=asc&limit=3", headers=user).json
    assert [f["id"] for f in asc["data"]] == ids[:3] and asc["has_more"] is True
    after = client.get(f"/v1/files?order=asc&after={ids[2]}", headers=user).json
    assert [f["id"] for f in after["data"]] == ids[3:]
    assert client.get("/v1/files?purpose=batch_output", headers=user).json["data"] == []
    empty = client.get("/v1/files?purpose=batch&after=file-0", headers=user).json
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize("purpose", ["fine-tune", "batch_output", "nonsense"])
def test_other_purposes_are_refused(client, user, purpose, settings):
    resp = client.post("/v1/files", headers=user, content_type="multipart/form-data",
                       data={"purpose": purpose, "file": (io.BytesIO(b"x\n"), "a.jsonl")})
    assert resp.status_code == 400
    assert resp.json["error"]["param"] == "purpose" and "batch" in resp.json["error"]["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert stored_objects(settings) == []


def test_purpose_after_the_file_part_is_read_and_checked(client, user, settings):
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"late.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\nhello\n\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}--\r\n").encode()
    resp = client.post("/v1/files", headers=user, data=body,
                       content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status_code == 200, resp.json
    assert (resp.json["filename"], resp.json["bytes"]) == ("late.jsonl", 6)
    bad = body.replace(b"\r\n\r\nbatch\r\n", b"\r\n\r\nwrong\r\n")
    resp = client.post("/v1/files", headers=user, data=bad, content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status_code == 400 and resp.json["error"]["param"] == "purpose"
    assert len(stored_objects(settings)) == 1  # the refused upload left nothing behind


@pytest.mark.parametrize("case", ["no_file", "no_purpose", "json_body", "truncated"])
def test_malformed_uploads_are_400(client, user, case):
    if case == "no_file":
        resp = client.post("/v1/files", headers=user, content_type="multipart/form-data", data={"purpose": "batch"})
    elif case == "no_purpose":
        resp = client.post("/v1/files", headers=user, content_type="multipart/form-data",
                           data={"file": (io.BytesIO(b"x"), "a.jsonl")})
    elif case == "json_body":
        resp = client.post("/v1/files", headers=user, json={"purpose": "batch"})
    else:
        body = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
        resp = client.post("/v1/files", headers=user, data=body, content_type="multipart/form-data; boundary=B")
    assert resp.status_code == 400, resp.data
    assert resp.json["error"]["message"] and resp.headers["x-should-retry"] == "false"


@pytest.fixture
def small_app(settings):
    with running_app(settings.replace(file_max_bytes=1000)) as app:
        yield app


def test_too_large_upload_is_413_and_leaves_nothing(small_app, make_key, settings):
    from bellaq.keys import create_key

    with small_app.app_context():
        _row, raw = create_key("u", "user")
    headers = {"Authorization": f"Bearer {raw}"}
    client = small_app.test_client()
    resp = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(b"x" * 5000), "big.jsonl")})
    assert resp.status_code == 413
    assert resp.json["error"]["code"] == "file_too_large" and "1000" in resp.json["error"]["message"]
    assert resp.headers["x-should-retry"] == "false"
    huge = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(b"x" * 200_000), "huge.jsonl")})
    assert huge.status_code == 413 and huge.json["error"]["code"] == "file_too_large"
    ok = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                     data={"purpose": "batch", "file": (io.BytesIO(b"x" * 1000), "fits.jsonl")})
    assert ok.status_code == 200
    assert len(stored_objects(settings)) == 1


def test_a_json_sized_limit_does_not_apply_to_uploads(settings, make_key):
    app = create_app(settings.replace(max_json_bytes=1000))
    init_db(app)
    with app.app_context():
        from bellaq.keys import create_key

        _row, raw = create_key("u", "user")
    resp = app.test_client().post("/v1/files", headers={"Authorization": f"Bearer {raw}"},
                                  content_type="multipart/form-data",
                                  data={"purpose": "batch", "file": (io.BytesIO(b"y" * 50_000), "a.jsonl")})
    assert resp.status_code == 200 and resp.json["bytes"] == 50_000
    app.extensions["bellaq.eventbus"].stop()


def test_idempotency_key_returns_the_first_file(live_server, user, client):
    api = sdk(live_server.url, user)
    first = api.files.create(file=("a.jsonl", b"one\n"), purpose="batch", extra_headers={"Idempotency-Key": "k1"})
    again = api.files.create(file=("a.jsonl", b"one\n"), purpose="batch", extra_headers={"Idempotency-Key": "k1"})
    assert again.id == first.id
    other = api.files.create(file=("a.jsonl", b"one\n"), purpose="batch", extra_headers={"Idempotency-Key": "k2"})
    assert other.id != first.id
    assert len(client.get("/v1/files", headers=user).json["data"]) == 2


def test_tenancy_another_owners_file_is_404(client, user, make_key):
    created = upload(client, user, b"mine\n")
    other = make_key("user")
    for method, path in (("get", ""), ("get", "/content"), ("delete", "")):
        resp = getattr(client, method)(f"/v1/files/{created['id']}{path}", headers=other)
        assert resp.status_code == 404 and resp.json["error"]["code"] == "file_not_found"
    assert client.get("/v1/files", headers=other).json["data"] == []
    assert client.get(f"/v1/files/{created['id']}", headers=user).status_code == 200
    # Keys of one owner share their files.
    owner = client.get(f"/v1/files/{created['id']}", headers=user)
    assert owner.status_code == 200


def test_keys_of_one_owner_share_files(client, make_key):
    a, b = make_key("user", owner="team-1"), make_key("user", owner="team-1")
    created = upload(client, a, b"shared\n")
    assert client.get(f"/v1/files/{created['id']}/content", headers=b).data == b"shared\n"


def test_roles_and_auth(client, worker):
    assert client.get("/v1/files").status_code == 401
    assert client.get("/v1/files", headers=worker).status_code == 403


def multipart_stream(f, boundary: str):
    """A multipart body generated chunk by chunk (sent chunked: no Content-Length)."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()
    while chunk := f.read(256 * 1024):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.slow
def test_a_large_upload_streams_with_flat_memory(app, user, tmp_path, settings):
    """A 64 MB upload through a real server: the process never holds the file (peak << size)."""
    size = 64 * 1024 * 1024
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        block = (b'{"custom_id": "x", "method": "POST"}\n' * 1800)[: 64 * 1024]
        for _ in range(size // len(block)):
            f.write(block)
    tracemalloc.start()
    try:
        with LiveServer(app) as server, path.open("rb") as f:
            resp = requests.post(server.url + "/v1/files", data=multipart_stream(f, "B0undary"), timeout=120,
                                 headers={**user, "Content-Type": "multipart/form-data; boundary=B0undary"})
            _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == size
    assert os.path.getsize(stored_objects(settings)[0]) == size
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size}-byte upload"
