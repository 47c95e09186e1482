"""A store in an S3 bucket (AWS, Ceph RGW, MinIO, SeaweedFS, Swift s3api) via boto3."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import urllib3.exceptions

from imagefs.config import S3Settings
from imagefs.errors import (ObjectChanged, ObjectNotFound, StoreAccessDenied, StoreError,
                            StoreNotFound, StoreUnavailable)
from imagefs.retry import retry
from imagefs.stores.base import ObjectInfo, ObjectWriter, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

# BadDigest and the SHA256 mismatch: a body damaged on the way in (boto3 sends a CRC32 and
# a SHA-256 of every body, and servers check them): sending it again is the cure.
_TEMP_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
               "Throttling", "ThrottlingException", "RequestTimeTooSkewed", "BadDigest",
               "XAmzContentSHA256Mismatch"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
# 412 when the condition fails; AWS answers 409 when a concurrent conditional write wins.
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_PARTS_IN_FLIGHT = 4  # per upload: bounds its memory to 4 parts
_UPLOAD_DEADLINE = 120.0  # a part or a multipart commit: background work, no caller waits
_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
_BODY_PIECE = 1 << 20


class _BodyCorrupted(Exception):
    """A body that does not match its ETag: damaged in transit, worth fetching again."""


# The answer was lost or damaged on the way: the request is worth sending again.
# Bodies are read from urllib3 directly (see _read_body), so its errors count too.
_TRANSPORT_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                     botocore.exceptions.ResponseStreamingError,
                     botocore.exceptions.IncompleteReadError,
                     botocore.parsers.ResponseParserError, urllib3.exceptions.HTTPError,
                     ConnectionError, _BodyCorrupted)


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_temp_failure(exc: BaseException) -> bool:
    """Network trouble, 5xx, 408 and 429 are worth retrying; everything else is final."""
    if isinstance(exc, _TRANSPORT_ERRORS):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = _status(exc)
        return code in _TEMP_CODES or status >= 500 or status in (408, 429)
    return False


def _translate(exc: Exception, what: str) -> Exception:
    """boto3's exceptions -> ours, with a message an operator can act on."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreAccessDenied("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY, a profile, or [s3] in the config")
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StoreNotFound(f"{what}: the bucket does not exist")
        if code in _MISSING_KEY_CODES:
            return ObjectNotFound(f"{what}: no such object")
        if code in _CONFLICT_CODES or _status(exc) in (409, 412):
            return ObjectChanged(f"{what}: changed by someone else meanwhile ({code})")
        if code in _DENIED_CODES or _status(exc) == 403:
            return StoreAccessDenied(f"{what}: access denied ({code}); check the credentials")
        return StoreError(f"{what}: S3 error {code}: {exc}")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return StoreUnavailable(f"{what}: cannot reach the S3 endpoint: {exc}")
    return exc


def _read_body(answer: dict[str, Any], expected: int, give_up_at: float, what: str) -> bytes:
    """The whole body, or StoreUnavailable once `give_up_at` passes.

    A trickling server never trips a socket timeout, so the body is read a piece at a
    time (read1: whatever the socket has) and the clock checked between pieces.
    """
    body = answer["Body"]
    raw = body._raw_stream  # botocore's StreamingBody.read(n) blocks until n bytes
    parts = []
    got = 0
    while got < expected:
        piece = raw.read1(min(_BODY_PIECE, expected - got))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
        if got < expected and time.monotonic() > give_up_at:
            body.close()
            raise StoreUnavailable(f"{what}: the store sends too slowly ({got} of "
                                   f"{expected} bytes before the deadline)")
    if got != expected:
        body.close()
        raise botocore.exceptions.IncompleteReadError(actual_bytes=got,
                                                      expected_bytes=expected)
    return b"".join(parts)


class _MultipartWriter(ObjectWriter):
    """Uploads parts in parallel while the caller keeps writing; memory stays bounded."""

    def __init__(self, store: "S3Store", key: str) -> None:
        self._store = store
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        # At most this many parts in memory at once (in flight or queued).
        self._slots = threading.BoundedSemaphore(_PARTS_IN_FLIGHT)

    def _part_size(self) -> int:
        """Doubles every 1,000 parts, so S3's 10,000-part cap is never reached (~16 TiB)."""
        return self._store.settings.part_size << (len(self._parts) // 1000)

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= (part_size := self._part_size()):
            self._submit(bytes(self._buffer[:part_size]))
            del self._buffer[:part_size]

    def _submit(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._store._call(
                f"start upload of {self._key}", self._store.client.create_multipart_upload,
                deadline=_UPLOAD_DEADLINE, Bucket=self._store.bucket,
                Key=self._store._full(self._key))["UploadId"]
        number = len(self._parts) + 1
        self._slots.acquire()
        future = self._store.pool.submit(self._upload_part, number, body)
        future.add_done_callback(lambda _f: self._slots.release())
        self._parts.append(future)

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        answer = self._store._call(
            f"upload part {number} of {self._key}", self._store.client.upload_part,
            deadline=_UPLOAD_DEADLINE, Bucket=self._store.bucket, Key=self._store._full(self._key),
            UploadId=self._upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def commit(self) -> None:
        if self._upload_id is None:
            self._store.put(self._key, bytes(self._buffer))
            return
        if self._buffer:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        parts = [f.result() for f in self._parts]
        self._store._call(
            f"complete upload of {self._key}", self._store.client.complete_multipart_upload,
            deadline=_UPLOAD_DEADLINE, Bucket=self._store.bucket, Key=self._store._full(self._key),
            UploadId=self._upload_id, MultipartUpload={"Parts": parts})

    def abort(self) -> None:
        for future in self._parts:
            future.cancel()
        if self._upload_id is None:
            return
        try:
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._store._full(self._key),
                UploadId=self._upload_id)
        except Exception as exc:  # the bucket's lifecycle rules reclaim leftovers
            log.warning("could not abort multipart upload of %s: %s", self._key, exc)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, settings: S3Settings,
                 timeout: float = 60.0) -> None:
        """`timeout`: how long one call (all its retries) may take before StoreUnavailable."""
        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings
        self.timeout = timeout
        self._conditions: bool | None = None  # learnt on the first conditional write
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        session = boto3.session.Session(profile_name=settings.profile) if settings.profile \
            else boto3.session.Session()
        config = botocore.config.Config(
            s3={"addressing_style": settings.addressing_style},
            # Retries happen in imagefs.retry, the one place with a deadline.
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Bodies are verified here (block hashes, MD5 ETags), and read piecewise.
            response_checksum_validation="when_required",
            # Reads take up to max_connections; uploads, gestures and refreshes more.
            max_pool_connections=2 * settings.max_connections,
            # Half the call's deadline: a stalled connection leaves time for one retry.
            connect_timeout=min(5.0, max(timeout / 2, 1.0)),
            read_timeout=min(30.0, max(timeout / 2, 1.0)))
        self.client = session.client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key, config=config)
        self.pool = ThreadPoolExecutor(max_workers=max(settings.max_connections // 2, 1),
                                       thread_name_prefix="s3-part")

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[..., T], *, deadline: float | None = None,
              **kwargs: Any) -> T:
        try:
            return retry(is_temp_failure, deadline=deadline or self.timeout)(fn)(**kwargs)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{what}: S3 endpoint {self.client.meta.endpoint_url} "
                                   f"is unavailable ({exc.__cause__})") from exc
        except Exception as exc:
            raise _translate(exc, what) from exc

    def check(self) -> None:
        self._call(f"bucket {self.bucket}", self.client.list_objects_v2,
                   deadline=min(self.timeout, 10.0), Bucket=self.bucket,
                   Prefix=self._full("manifests/"), MaxKeys=1)

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Small objects (manifests, block tables) are checked against their MD5 ETag."""
        give_up_at = time.monotonic() + self.timeout

        def fetch() -> tuple[bytes, str]:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            data = _read_body(answer, answer["ContentLength"], give_up_at, key)
            etag = answer.get("ETag", "")
            plain = _PLAIN_MD5_ETAG.match(etag)
            if plain and hashlib.md5(data).hexdigest() != plain.group(1):
                raise _BodyCorrupted(f"{key}: the body does not match its ETag")
            return data, etag
        return self._call(key, fetch)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._full(key))
            return True
        except ObjectNotFound:
            return False

    def get_range(self, key: str, start: int, length: int) -> bytes:
        give_up_at = time.monotonic() + self.timeout

        def fetch() -> bytes:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._full(key),
                                            Range=f"bytes={start}-{start + length - 1}")
            if answer["ContentLength"] != length:
                answer["Body"].close()
                raise StoreError(f"{key}: wanted {length} bytes at {start}, the store has "
                                 f"{answer['ContentLength']}")
            return _read_body(answer, length, give_up_at, key)
        return self._call(key, fetch)

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        conditions: dict[str, Any] = {}
        if (if_match is not None or if_absent) and self.conditional_writes:
            conditions = {"IfMatch": if_match} if if_match is not None else \
                {"IfNoneMatch": "*"}
        try:
            answer = self._call(key, self.client.put_object, Bucket=self.bucket,
                                Key=self._full(key), Body=data, **conditions)
            return str(answer.get("ETag", ""))
        except ObjectNotFound:  # AWS's answer to If-Match on a key that is gone
            raise ObjectChanged(f"{key} was removed by someone else meanwhile") from None

    @property
    def conditional_writes(self) -> bool:
        """Probed once: a server that ignores If-Match would silently lose updates."""
        if self._conditions is None:
            self._conditions = self._probe_conditions()
            if not self._conditions:
                log.warning("%s ignores conditional writes (If-Match); two hosts changing "
                            "one image at the same moment may overwrite each other", self.url)
        return self._conditions

    def _probe_conditions(self) -> bool:
        key = f"probes/conditional-{uuid.uuid4().hex}"
        self.put(key, b"1")
        try:
            self._call(key, self.client.put_object, Bucket=self.bucket,
                       Key=self._full(key), Body=b"2", IfMatch='"0"')
            return False
        except ObjectChanged:
            return True
        except StoreError as exc:  # 501 NotImplemented and the like
            log.info("conditional write probe: %s", exc)
            return False
        finally:
            self.delete(key)

    def open_writer(self, key: str) -> ObjectWriter:
        return _MultipartWriter(self, key)

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        full = self._full(prefix)
        strip = len(self._full(""))
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if start_after is not None:
                kwargs["StartAfter"] = self._full(start_after)
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"list {prefix}", self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], item["Size"], item["ETag"],
                                 item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def create_bucket(self) -> None:
        """Create the bucket (`imagefs store init`); one that exists and answers us is fine."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region and self.settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            self._call(f"create bucket {self.bucket}", self.client.create_bucket, **kwargs)
        except ObjectChanged:  # 409: it exists already (ours, or raced); check() says whose
            self.check()
