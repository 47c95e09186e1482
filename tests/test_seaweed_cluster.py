"""The multi-process SeaweedFS cluster harness: replication, and reads while a volume server dies."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from seaweed_cluster import SeaweedCluster

MiB = 1 << 20
# One attempt and bounded waits, so a failure shows as an exception, never as a hang or
# as success hidden by a retry.
_ONE_SHOT = Config(connect_timeout=5, read_timeout=15, retries={"total_max_attempts": 1})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed-cluster")) as c:
        yield c


@pytest.fixture
def s3(cluster: SeaweedCluster) -> Iterator[SeaweedCluster]:
    """The cluster, with every volume server running again after the test."""
    yield cluster
    for i, pid in enumerate(cluster.volume_pids):
        if pid is None:
            cluster.restart_volume(i)


def _bucket(s3: SeaweedCluster) -> str:
    name = f"c-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    return name


def _objects(client: BaseClient, bucket: str, count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    objects = {f"small/{n:03d}": rng.randbytes(rng.randrange(1, 64 * 1024)) for n in range(count)}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return objects


def _get(client: BaseClient, bucket: str, key: str, byte_range: str | None = None) -> bytes:
    extra = {"Range": byte_range} if byte_range else {}
    body: bytes = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    return body


def _replica_servers(s3: SeaweedCluster, bucket: str, key: str) -> list[list[int]]:
    return [s3.volume_locations(vid) for vid in s3.object_volume_ids(bucket, key)]


def test_round_trip_with_authentication(s3: SeaweedCluster) -> None:
    bucket = _bucket(s3)
    client = s3.client(config=_ONE_SHOT)
    before = s3.s3_counters(bucket)
    client.put_object(Bucket=bucket, Key="dir/key", Body=b"hello cluster")
    assert _get(client, bucket, "dir/key") == b"hello cluster"
    assert _get(client, bucket, "dir/key", "bytes=6-12") == b"cluster"
    assert client.head_object(Bucket=bucket, Key="dir/key")["ContentLength"] == 13
    after = s3.s3_counters(bucket)
    assert after["put_requests"] - before["put_requests"] == 1
    assert after["get_bytes"] - before["get_bytes"] == 13 + 7
    assert after["errors"] == before["errors"]

    with pytest.raises(ClientError) as wrong:
        s3.client(secret_key="wrong", config=_ONE_SHOT).get_object(Bucket=bucket, Key="dir/key")
    assert wrong.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert set(s3.environ()) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(path.stat().st_size > 0 for path in s3.log_paths.values())
    assert len({pid for pid in s3.volume_pids if pid is not None}) == s3.volume_count


def test_every_object_is_stored_twice(s3: SeaweedCluster) -> None:
    bucket = _bucket(s3)
    client = s3.client(config=_ONE_SHOT)
    objects = _objects(client, bucket, 5, seed=1)
    client.put_object(Bucket=bucket, Key="chunked", Body=os.urandom(9 * MiB))  # 3 filer chunks
    volume_ids: set[int] = set()
    for key in [*objects, "chunked"]:
        vids = s3.object_volume_ids(bucket, key)
        assert vids, key
        volume_ids.update(vids)
    for vid in volume_ids:
        holders = s3.volume_locations(vid)
        assert len(holders) == 2, (vid, holders)  # -defaultReplication=001
        # The master's view matches the disks: the volume file exists on exactly those
        # two servers, and the synchronous replica has the same size.
        on_disk = [i for i in range(s3.volume_count)
                   if (s3.volume_dir(i) / f"{bucket}_{vid}.dat").exists()]
        assert on_disk == holders
        sizes = {(s3.volume_dir(i) / f"{bucket}_{vid}.dat").stat().st_size for i in holders}
        assert len(sizes) == 1, sizes


@dataclass
class _Readers:
    """Threads doing 1 MiB ranged GETs of one object at random offsets, checking every byte."""

    s3: SeaweedCluster
    bucket: str
    key: str
    body: bytes
    threads: int = 2
    ok: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
            assert not worker.is_alive(), "a ranged GET hung"

    def wait_for(self, reads: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < reads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.ok >= reads, (self.ok, self.errors)

    def _run(self, n: int) -> None:
        client = self.s3.client(config=_ONE_SHOT)
        rng = random.Random(n)
        while not self._stop.is_set():
            start = rng.randrange(len(self.body) - MiB)
            try:
                got = _get(client, self.bucket, self.key, f"bytes={start}-{start + MiB - 1}")
            except Exception as e:  # noqa: BLE001 - the test asserts it is a clean S3 error
                with self._lock:
                    self.errors.append(e)
                continue
            with self._lock:
                if got == self.body[start:start + MiB]:
                    self.ok += 1
                else:
                    self.mismatches.append(f"{len(got)} bytes at {start}")


def test_reads_survive_a_dead_replica_and_its_restart(s3: SeaweedCluster) -> None:
    bucket = _bucket(s3)
    client = s3.client(config=_ONE_SHOT)
    objects = _objects(client, bucket, 10, seed=2)
    big = os.urandom(16 * MiB)
    client.put_object(Bucket=bucket, Key="big", Body=big)
    objects["big"] = big
    [holders] = {tuple(h) for h in _replica_servers(s3, bucket, "big")}  # one volume per bucket
    victim, survivor = holders

    # Kill a server holding a replica while ranged GETs of the big object run, and while
    # whole-object GETs are half read: each GET returns the right bytes or fails with an
    # S3/transport error, and ranged GETs keep working after the kill.
    streams = [client.get_object(Bucket=bucket, Key="big")["Body"] for _ in range(2)]
    heads = [stream.read(MiB) for stream in streams]
    with _Readers(s3, bucket, "big", big) as readers:
        readers.wait_for(4)
        s3.kill_volume(victim)  # returns once the master has dropped it
        assert s3.volume_pids[victim] is None
        readers.wait_for(readers.ok + 8)
    assert readers.mismatches == []
    assert all(isinstance(e, (BotoCoreError, ClientError)) for e in readers.errors), readers.errors
    for stream, head in zip(streams, heads):
        try:
            assert head + stream.read() == big
        except BotoCoreError:
            pass  # a clean failure: botocore noticed the short or broken body

    # Everything written before the kill reads back from the one replica left.
    assert _replica_servers(s3, bucket, "big") == [[survivor]]
    for key, body in objects.items():
        assert _get(client, bucket, key) == body, key
    # Writes go on: the master grows a new volume on the two servers left.
    client.put_object(Bucket=bucket, Key="during", Body=b"written with a server down")
    assert all(len(h) == 2 and victim not in h for h in _replica_servers(s3, bucket, "during"))

    # The restarted server reports its volumes again; with the other replica killed, it
    # alone serves the objects it held.
    s3.restart_volume(victim)
    assert s3.volume_pids[victim] is not None
    assert _replica_servers(s3, bucket, "big") == [sorted(holders)]
    s3.kill_volume(survivor)
    for key, body in objects.items():
        assert _get(client, bucket, key) == body, key
    for start in range(0, len(big), 3 * MiB + 12345):  # ranges crossing 4 MiB chunk ends
        assert _get(client, bucket, "big", f"bytes={start}-{start + MiB - 1}") == \
            big[start:start + MiB]
    s3.restart_volume(survivor)
    assert _get(client, bucket, "during") == b"written with a server down"
