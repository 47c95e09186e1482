"""The fault proxy itself: transparent when idle, and each fault does what it says to boto3.

Runs against a real SeaweedFS (one per module) with boto3 clients set up like
imagefs's, except that botocore's own retry is off (total_max_attempts=1) so a
fault reaches the caller; test_imagefs_retry_config_absorbs_one_fault shows why.
The last tests use a local http.server to reach HTTP framing SeaweedFS and
boto3 never produce (chunked bodies with trailers, 204, 304, close-delimited).
"""

from __future__ import annotations

import http.client
import http.server
import io
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
import pytest
from botocore.client import BaseClient
from botocore.config import Config

from faultproxy import Fault, FaultProxy, wait_until
from seaweedfs import SeaweedServer

MiB = 1 << 20
BUCKET = "faults"
TIMEOUT = 1.0  # the clients' connect and read timeouts


def _bit_difference(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("faultproxy-seaweedfs"))
    server.start()
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop(grace=0)  # throwaway data; weed ignores SIGTERM anyway


@pytest.fixture(scope="module")
def blob(s3: SeaweedServer) -> bytes:
    """1 MiB written directly with one PUT, so a full GET carries its CRC32."""
    data = random.Random(1).randbytes(MiB)
    s3.client().put_object(Bucket=BUCKET, Key="blob", Body=data)
    return data


def _address(s3: SeaweedServer) -> tuple[str, int]:
    endpoint = urlsplit(s3.endpoint)
    assert endpoint.hostname and endpoint.port
    return endpoint.hostname, endpoint.port


@pytest.fixture
def proxy(s3: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(*_address(s3), seed=7) as p:
        yield p


@pytest.fixture(autouse=True)
def _no_proxy_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A bug in the proxy shows up as a logged traceback; fail the test on it."""
    yield
    errors = [r for r in caplog.records
              if r.name == "faultproxy" and r.levelno >= logging.ERROR]
    assert not errors, f"the proxy logged errors: {[r.getMessage() for r in errors]}"


def _client(s3: SeaweedServer, proxy: FaultProxy, *, attempts: int = 1,
            read_timeout: float = TIMEOUT, **extra: object) -> BaseClient:
    """Like imagefs's client: `attempts` in all, no retries hidden inside botocore."""
    retries = {"total_max_attempts": attempts, "mode": "standard"}
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries=retries,
                    connect_timeout=TIMEOUT, read_timeout=read_timeout, **extra)
    return boto3.session.Session().client(
        "s3", endpoint_url=proxy.endpoint_url, region_name=s3.region,
        aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key, config=config)


def _stored(s3: SeaweedServer, key: str) -> bytes | None:
    """The object as the server has it, read without the proxy; None if absent."""
    direct = s3.client()
    try:
        return direct.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except direct.exceptions.NoSuchKey:
        return None


def _timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - start


# Pass-through


def test_passthrough_put_get_range_list_multipart(s3: SeaweedServer, proxy: FaultProxy) -> None:
    client = _client(s3, proxy)
    data = os.urandom(3 * MiB)
    client.put_object(Bucket=BUCKET, Key="pass/single", Body=data)
    assert client.get_object(Bucket=BUCKET, Key="pass/single")["Body"].read() == data
    ranged = client.get_object(Bucket=BUCKET, Key="pass/single", Range="bytes=1000-1999999")
    assert ranged["Body"].read() == data[1000:2000000]
    assert client.head_object(Bucket=BUCKET, Key="pass/single")["ContentLength"] == len(data)

    parts = [os.urandom(5 * MiB), os.urandom(MiB)]
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="pass/multi")["UploadId"]
    etags = [client.upload_part(Bucket=BUCKET, Key="pass/multi", UploadId=upload, PartNumber=n,
                                Body=part)["ETag"] for n, part in enumerate(parts, 1)]
    client.complete_multipart_upload(
        Bucket=BUCKET, Key="pass/multi", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]})
    assert _stored(s3, "pass/multi") == b"".join(parts)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="pass/")
    assert [o["Key"] for o in listed["Contents"]] == ["pass/multi", "pass/single"]
    client.delete_object(Bucket=BUCKET, Key="pass/multi")  # a 204
    assert client.get_object(Bucket=BUCKET, Key="pass/single")["Body"].read() == data

    stats = proxy.stats
    assert stats.connections == 1  # keep-alive survived HEAD, 204 and 100 Continue
    assert stats.requests == len(stats.history) == 11
    assert not stats.faults and all(seen.fault is None for seen in stats.history)
    assert stats.bytes_to_server > len(data) + sum(map(len, parts))
    assert stats.bytes_to_client > 2 * len(data) + 2000000


def test_passthrough_throughput(s3: SeaweedServer, proxy: FaultProxy) -> None:
    size = 256 * MiB
    s3.client().put_object(Bucket=BUCKET, Key="big", Body=random.Random(2).randbytes(16 * MiB) * 16)
    client = _client(s3, proxy, read_timeout=30)

    def fetch() -> None:
        body = client.get_object(Bucket=BUCKET, Key="big", Range="bytes=0-")["Body"]
        assert sum(len(piece) for piece in body.iter_chunks(MiB)) == size

    plain = _timed(fetch)
    proxy.add(Fault("delay", seconds=0.01))
    delayed = _timed(fetch)
    direct_client = s3.client(config=Config(read_timeout=30))
    start = time.monotonic()
    body = direct_client.get_object(Bucket=BUCKET, Key="big", Range="bytes=0-")["Body"]
    assert sum(len(piece) for piece in body.iter_chunks(MiB)) == size
    direct = time.monotonic() - start
    print(f"\n256 MiB GET: through the proxy {size / MiB / plain:.0f} MiB/s, with a 10 ms "
          f"delay rule {size / MiB / delayed:.0f} MiB/s, direct {size / MiB / direct:.0f} MiB/s")
    assert size / MiB / plain > 100


# Faults on reads


def test_stall_times_out_and_count_one_passes_after(s3: SeaweedServer, proxy: FaultProxy,
                                                    blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("stall", method="GET", count=1))
    start = time.monotonic()
    with pytest.raises(bce.ReadTimeoutError):
        client.get_object(Bucket=BUCKET, Key="blob")
    assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 1
    assert client.get_object(Bucket=BUCKET, Key="blob")["Body"].read() == blob
    assert proxy.stats.faults == {"stall": 1}


def test_stall_body_on_ranged_reads_only(s3: SeaweedServer, proxy: FaultProxy,
                                         blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("stall_body", method="GET", ranged=True, count=1))
    proxy.add(Fault("stall_body", method="GET", ranged=True, count=1, offset=6000))
    assert client.get_object(Bucket=BUCKET, Key="blob")["Body"].read() == blob
    answer = client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=0-9999")
    assert answer["ContentLength"] == 10000  # the head got through, no byte of the body
    start = time.monotonic()
    with pytest.raises(bce.ReadTimeoutError):
        answer["Body"].read()
    assert time.monotonic() - start < TIMEOUT + 1
    body = client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=0-9999")["Body"]
    assert body.read(6000) == blob[:6000]
    with pytest.raises(bce.ReadTimeoutError):
        body.read()
    assert [seen.fault for seen in proxy.stats.history] == [None, "stall_body", "stall_body"]


def test_trickle_is_slow_but_correct(s3: SeaweedServer, proxy: FaultProxy,
                                     blob: bytes) -> None:
    """30 bytes at 20 B/s take 1.5 s, longer than the read timeout: it is per recv()."""
    client = _client(s3, proxy)
    proxy.add(Fault("trickle", rate=20, count=1))
    start = time.monotonic()
    got = client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=100-129")["Body"].read()
    assert got == blob[100:130]
    assert 1.4 < time.monotonic() - start < 3


def test_reset_midway_is_a_connection_error(s3: SeaweedServer, proxy: FaultProxy,
                                            blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("reset", method="GET", count=1))
    with pytest.raises((bce.ResponseStreamingError, bce.ConnectionError)):
        client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=0-")["Body"].read()
    assert client.get_object(Bucket=BUCKET, Key="blob")["Body"].read() == blob


def test_truncate_is_a_short_body(s3: SeaweedServer, proxy: FaultProxy, blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("truncate", method="GET", count=1, offset=1000))
    with pytest.raises((bce.IncompleteReadError, bce.ResponseStreamingError)) as short:
        client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=0-")["Body"].read()
    assert f"1000 bytes read, {len(blob) - 1000} more expected" in str(short.value)
    assert client.get_object(Bucket=BUCKET, Key="blob")["Body"].read() == blob


def test_flip_changes_exactly_the_flipped_bits(s3: SeaweedServer, proxy: FaultProxy,
                                               blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("flip", bits=3, count=1))
    got = client.get_object(Bucket=BUCKET, Key="blob", Range="bytes=0-999")["Body"].read()
    assert _bit_difference(got, blob[:1000]) == 3
    assert got[:500] == blob[:500] and got[501:] == blob[501:1000]  # the middle byte
    # A whole object from one PUT carries its CRC32, and botocore checks it.
    proxy.add(Fault("flip", count=1))
    with pytest.raises(bce.FlexibleChecksumError):
        client.get_object(Bucket=BUCKET, Key="blob")["Body"].read()


# Faults on writes


def test_stall_on_put_never_reaches_the_server(s3: SeaweedServer, proxy: FaultProxy) -> None:
    """boto3 waits up to 1 s for 100 Continue before it sends the body anyway."""
    client = _client(s3, proxy)
    proxy.add(Fault("stall", method="PUT", count=1))
    start = time.monotonic()
    with pytest.raises(bce.ReadTimeoutError):
        client.put_object(Bucket=BUCKET, Key="stalled", Body=b"x" * 1000)
    assert time.monotonic() - start < 1 + TIMEOUT + 1
    assert _stored(s3, "stalled") is None


def test_lost_acknowledgement(s3: SeaweedServer, proxy: FaultProxy) -> None:
    """A PUT's answer has no body, so truncate drops the answer: stored, but unacknowledged."""
    client = _client(s3, proxy)
    proxy.add(Fault("truncate", method="PUT", count=1))
    with pytest.raises(bce.ConnectionClosedError):
        client.put_object(Bucket=BUCKET, Key="unacked", Body=b"stored anyway")
    assert _stored(s3, "unacked") == b"stored anyway"


def test_corrupted_uploads_are_refused(s3: SeaweedServer, proxy: FaultProxy) -> None:
    """boto3 sends x-amz-checksum-crc32 with every PUT and part; SeaweedFS checks it."""
    client = _client(s3, proxy)
    data = os.urandom(MiB)
    proxy.add(Fault("flip_request", method="PUT", count=2))
    with pytest.raises(bce.ClientError) as put:
        client.put_object(Bucket=BUCKET, Key="flipped", Body=data)
    assert put.value.response["Error"]["Code"] == "BadDigest"
    assert _stored(s3, "flipped") is None
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="flipped")["UploadId"]
    with pytest.raises(bce.ClientError) as part:
        client.upload_part(Bucket=BUCKET, Key="flipped", UploadId=upload, PartNumber=1,
                           Body=data)
    assert part.value.response["Error"]["Code"] == "BadDigest"
    client.abort_multipart_upload(Bucket=BUCKET, Key="flipped", UploadId=upload)


def test_seaweedfs_ignores_the_signed_payload_hash(s3: SeaweedServer,
                                                   proxy: FaultProxy) -> None:
    """Without a checksum header, a body corrupted on the way is stored as it arrived."""
    client = _client(s3, proxy, request_checksum_calculation="when_required")
    data = os.urandom(MiB)
    proxy.add(Fault("flip_request", method="PUT", count=1))
    client.put_object(Bucket=BUCKET, Key="silently-flipped", Body=data)
    stored = _stored(s3, "silently-flipped")
    assert stored is not None and _bit_difference(stored, data) == 1


def test_reset_during_upload_stores_nothing(s3: SeaweedServer, proxy: FaultProxy) -> None:
    client = _client(s3, proxy)
    data = os.urandom(MiB)
    proxy.add(Fault("reset_request", method="PUT", count=1))
    with pytest.raises((bce.ConnectionError, bce.HTTPClientError)):  # what imagefs retries
        client.put_object(Bucket=BUCKET, Key="half", Body=data)
    assert _stored(s3, "half") is None
    client.put_object(Bucket=BUCKET, Key="half", Body=data)  # the retry publishes it whole
    assert _stored(s3, "half") == data


# Error answers, refusal, rule selection


def test_status_answers_parse_as_s3_errors(s3: SeaweedServer, proxy: FaultProxy,
                                           blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("status", status=503, match="list-type=2", count=1))
    with pytest.raises(bce.ClientError) as listing:
        client.list_objects_v2(Bucket=BUCKET)
    assert listing.value.response["Error"]["Code"] == "SlowDown"
    assert listing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert listing.value.response["ResponseMetadata"]["RequestId"]

    proxy.add(Fault("status", status=500, method="PUT", count=1))  # with Expect: 100-continue
    with pytest.raises(bce.ClientError) as put:
        client.put_object(Bucket=BUCKET, Key="status", Body=b"abc")
    assert put.value.response["Error"]["Code"] == "InternalError"
    client.put_object(Bucket=BUCKET, Key="status", Body=b"abc")

    proxy.add(Fault("status", status=503, method="POST", match="uploadId=", count=1))
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="status")["UploadId"]
    etag = client.upload_part(Bucket=BUCKET, Key="status", UploadId=upload, PartNumber=1,
                              Body=b"part")["ETag"]
    complete = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    with pytest.raises(bce.ClientError):
        client.complete_multipart_upload(Bucket=BUCKET, Key="status", UploadId=upload,
                                         MultipartUpload=complete)
    client.complete_multipart_upload(Bucket=BUCKET, Key="status", UploadId=upload,
                                     MultipartUpload=complete)
    assert _stored(s3, "status") == b"part"
    assert client.get_object(Bucket=BUCKET, Key="blob")["Body"].read() == blob
    assert proxy.stats.faults == {"status": 3}


def test_refuse_and_recover(s3: SeaweedServer, proxy: FaultProxy) -> None:
    client = _client(s3, proxy)
    client.head_bucket(Bucket=BUCKET)  # an open, pooled connection
    refusal = proxy.add(Fault("refuse", drop=True))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    with pytest.raises(bce.EndpointConnectionError):
        client.head_bucket(Bucket=BUCKET)
    proxy.remove(refusal)
    client.head_bucket(Bucket=BUCKET)
    proxy.drop_connections()  # the client notices and opens another
    client.head_bucket(Bucket=BUCKET)
    assert proxy.stats.connections == 3 and proxy.stats.faults == {"refuse": 1}


def test_first_match_count_and_seeded_probability(s3: SeaweedServer, proxy: FaultProxy,
                                                  blob: bytes) -> None:
    client = _client(s3, proxy)
    proxy.add(Fault("status", status=500, method="HEAD", count=2))
    proxy.add(Fault("status", status=503, method="HEAD", count=1))
    codes = []
    for _ in range(4):
        try:
            client.head_object(Bucket=BUCKET, Key="blob")
            codes.append(200)
        except bce.ClientError as e:
            codes.append(e.response["ResponseMetadata"]["HTTPStatusCode"])
    assert codes == [500, 500, 503, 200]

    def pattern(p: FaultProxy) -> list[bool]:
        p.add(Fault("status", status=503, probability=0.5, where=lambda r: r.method == "HEAD"))
        c = _client(s3, p)
        outcome = []
        for _ in range(20):
            try:
                c.head_object(Bucket=BUCKET, Key="blob")
                outcome.append(False)
            except bce.ClientError:
                outcome.append(True)
        return outcome

    proxy.clear()
    proxy.reset_stats()
    first = pattern(proxy)
    assert proxy.stats.requests == 20
    with FaultProxy(proxy.upstream_host, proxy.upstream_port, seed=7) as twin:
        assert pattern(twin) == first
    assert 0 < sum(first) < 20


def test_faults_hit_their_request_among_concurrent_ones(s3: SeaweedServer, proxy: FaultProxy,
                                                         blob: bytes) -> None:
    client = _client(s3, proxy, max_pool_connections=8)
    proxy.add(Fault("status", status=503, where=lambda r: r.headers.get("range") == "bytes=0-99"))
    proxy.add(Fault("flip", where=lambda r: r.headers.get("range") == "bytes=100-199"))
    failures: list[str] = []
    starts: list[int] = []

    def read(worker: int) -> None:
        rng = random.Random(worker)
        for _ in range(15):
            start = rng.choice([0, 100, 200, rng.randrange(300, len(blob) - 100)])
            starts.append(start)
            try:
                got = client.get_object(Bucket=BUCKET, Key="blob",
                                        Range=f"bytes={start}-{start + 99}")["Body"].read()
                flipped = _bit_difference(got, blob[start:start + 100])
                if flipped != (1 if start == 100 else 0) or start == 0:
                    failures.append(f"{start}: {flipped} bits differ")
            except bce.ClientError as e:
                if start != 0 or e.response["Error"]["Code"] != "SlowDown":
                    failures.append(f"{start}: {e}")

    workers = [threading.Thread(target=read, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not failures
    stats = proxy.stats
    assert stats.requests == 120 and stats.connections > 1
    assert stats.faults == {"status": starts.count(0), "flip": starts.count(100)}


def test_delay_each_way(s3: SeaweedServer, proxy: FaultProxy) -> None:
    client = _client(s3, proxy)
    client.head_bucket(Bucket=BUCKET)
    rule = proxy.add(Fault("delay", seconds=0.3))
    assert 0.6 <= _timed(client.head_bucket, Bucket=BUCKET) < 1.2
    proxy.remove(rule)
    proxy.add(Fault("delay", seconds=0.3, side="request"))
    assert 0.3 <= _timed(client.head_bucket, Bucket=BUCKET) < 0.6


def test_close_is_prompt_with_held_connections(s3: SeaweedServer, blob: bytes) -> None:
    proxy = FaultProxy(*_address(s3))
    proxy.start()
    outcomes: list[BaseException | None] = []

    def call(fn: Callable[..., dict[str, Any]], **kwargs: object) -> None:
        try:
            answer = fn(Bucket=BUCKET, **kwargs)
            if "Body" in answer:
                answer["Body"].read()
            outcomes.append(None)
        except Exception as e:
            outcomes.append(e)

    try:
        proxy.add(Fault("stall", method="HEAD"))
        proxy.add(Fault("stall_body", method="GET"))
        client = _client(s3, proxy, read_timeout=30)
        callers = [threading.Thread(target=call, args=(fn,), kwargs={"Key": "blob"})
                   for fn in (client.head_object, client.get_object)]
        for caller in callers:
            caller.start()
        assert wait_until(lambda: len(proxy.stats.faults) == 2)
        start = time.monotonic()
        proxy.close()
        assert time.monotonic() - start < 2
        for caller in callers:
            caller.join(5)
        assert len(outcomes) == 2 and all(isinstance(o, bce.BotoCoreError) for o in outcomes)
        assert not [t for t in threading.enumerate() if t.name == "faultproxy"]
    finally:
        proxy.close()  # a second close is a no-op


# HTTP framing beyond what boto3 and SeaweedFS use


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Echoes PUT bodies back chunked, with a trailer; fixed answers for the rest."""

    protocol_version = "HTTP/1.1"  # keep-alive, and 100 Continue for Expect

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() != b"\r\n":
                pass
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Trailer", "X-Length")
        self.end_headers()
        for i in range(0, len(body), 1000):
            piece = body[i:i + 1000]
            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\nX-Length: %d\r\n\r\n" % len(body))

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()

    def do_GET(self) -> None:
        if self.path == "/close-delimited":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
            return
        self.send_response(204 if self.path == "/204" else 304)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def local() -> Iterator[FaultProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        with FaultProxy("127.0.0.1", server.server_address[1]) as p:
            yield p
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads, now that the proxy is gone
        serving.join(5)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str,
              body: object = None, headers: dict[str, str] | None = None,
              chunked: bool = False) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
    response = conn.getresponse()
    return response.status, response.read(), response


def test_framing_on_one_keep_alive_connection(local: FaultProxy) -> None:
    body = os.urandom(10000)
    conn = http.client.HTTPConnection("127.0.0.1", local.port, timeout=5)
    assert _exchange(conn, "HEAD", "/x")[:2] == (200, b"")
    status, echoed, response = _exchange(
        conn, "PUT", "/echo", iter([body[:3000], body[3000:]]),
        {"Expect": "100-continue", "Transfer-Encoding": "chunked"}, chunked=True)
    assert (status, echoed) == (200, body)
    assert _exchange(conn, "GET", "/204")[:2] == (204, b"")
    assert _exchange(conn, "GET", "/304")[:2] == (304, b"")
    assert _exchange(conn, "PUT", "/echo", body)[:2] == (200, body)
    local.add(Fault("flip", bits=5, offset=4321, where=lambda r: r.seq == 5))
    assert _bit_difference(_exchange(conn, "PUT", "/echo", body)[1], body) == 5
    local.add(Fault("flip_request", bits=2, count=1))
    assert _bit_difference(_exchange(conn, "PUT", "/echo", io.BytesIO(body),
                                     {"Transfer-Encoding": "chunked"}, chunked=True)[1],
                           body) == 2
    assert _exchange(conn, "GET", "/close-delimited")[:2] == (200, b"until the end")
    conn.close()
    stats = local.stats
    assert stats.connections == 1 and stats.requests == 8
    assert stats.faults == {"flip": 1, "flip_request": 1}


def test_truncated_chunked_body_keeps_its_framing(local: FaultProxy) -> None:
    local.add(Fault("truncate", offset=2500, count=1))
    with socket.create_connection(("127.0.0.1", local.port), timeout=5) as sock:
        sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n"
                     + b"x" * 10000)
        received = b""
        while piece := sock.recv(65536):
            received += piece
    body = received.partition(b"\r\n\r\n")[2]
    chunk = b"3e8;ext=1\r\n" + b"x" * 1000 + b"\r\n"
    assert body == 2 * chunk + chunk[:11 + 500]  # 2500 bytes of data, then FIN
