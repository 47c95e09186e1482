"""Store contract, proven on a file:// directory and on a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import time

import pytest

from imagefs.config import S3Settings
from imagefs.errors import ObjectNotFound, StoreAccessDenied, StoreError, StoreNotFound
from imagefs.stores import open_store

MiB = 1 << 20


def _open(handle, **s3_overrides):
    settings = S3Settings(endpoint_url=handle.env.get("AWS_ENDPOINT_URL"),
                          access_key_id=handle.env.get("AWS_ACCESS_KEY_ID"),
                          secret_access_key=handle.env.get("AWS_SECRET_ACCESS_KEY"),
                          region=handle.env.get("AWS_DEFAULT_REGION"), **s3_overrides)
    return open_store(handle.url, settings)


def test_put_get_range_list_delete(store):
    s = _open(store)
    s.check()
    s.put("manifests/a.msgpack", b"alpha")
    s.put("manifests/b.msgpack", b"beta")
    s.put("data/a", bytes(range(256)) * 10)
    assert s.get("manifests/a.msgpack") == b"alpha"
    assert s.get_range("data/a", 10, 20) == bytes(range(10, 30))
    listed = {o.key: o for o in s.list("manifests/")}
    assert set(listed) == {"manifests/a.msgpack", "manifests/b.msgpack"}
    assert all(abs(o.modified - time.time()) < 300 for o in listed.values())  # sweep ages
    etag = listed["manifests/a.msgpack"].etag
    s.put("manifests/a.msgpack", b"alpha-2")
    assert {o.key: o.etag for o in s.list("manifests/")}["manifests/a.msgpack"] != etag
    s.delete("manifests/a.msgpack")
    s.delete("manifests/a.msgpack")  # deleting twice is fine
    with pytest.raises(ObjectNotFound):
        s.get("manifests/a.msgpack")
    with pytest.raises(StoreError):
        s.get_range("data/a", 2550, 100)  # past the end: never a short answer


def test_large_writer_is_invisible_until_commit(store):
    s = _open(store, part_size=5 * MiB)
    data = os.urandom(13 * MiB)
    writer = s.open_writer("data/big")
    for pos in range(0, len(data), 3 * MiB):
        writer.write(data[pos:pos + 3 * MiB])
    with pytest.raises(ObjectNotFound):
        s.get_range("data/big", 0, 1)
    writer.commit()
    assert s.get("data/big") == data
    assert s.get_range("data/big", 12 * MiB, MiB) == data[12 * MiB:]


def test_aborted_writer_leaves_nothing(store):
    s = _open(store, part_size=5 * MiB)
    writer = s.open_writer("data/gone")
    writer.write(os.urandom(11 * MiB))
    writer.abort()
    with pytest.raises(ObjectNotFound):
        s.get("data/gone")
    assert [o.key for o in s.list("data/")] == []


def test_s3_wrong_credentials_and_missing_bucket(s3_store):
    with pytest.raises(StoreAccessDenied, match="check the credentials"):
        s = open_store(s3_store.url, S3Settings(
            endpoint_url=s3_store.env["AWS_ENDPOINT_URL"],
            access_key_id=s3_store.env["AWS_ACCESS_KEY_ID"], secret_access_key="wrong",
            region="us-east-1"))
        s.check()
    missing = open_store("s3://no-such-bucket-xyz/p", S3Settings(
        endpoint_url=s3_store.env["AWS_ENDPOINT_URL"],
        access_key_id=s3_store.env["AWS_ACCESS_KEY_ID"],
        secret_access_key=s3_store.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1"))
    with pytest.raises(StoreNotFound, match="bucket does not exist"):
        missing.check()


def test_file_store_refuses_unsafe_keys(file_store):
    s = _open(file_store)
    with pytest.raises(StoreError):
        s.get("../etc/passwd")
