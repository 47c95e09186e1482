"""A store in an S3 bucket (AWS, Ceph RGW, MinIO, SeaweedFS, Swift s3api) via boto3."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from imagefs.config import S3Settings
from imagefs.errors import (ObjectNotFound, StoreAccessDenied, StoreError, StoreNotFound,
                            StoreUnavailable)
from imagefs.retry import retry
from imagefs.stores.base import ObjectInfo, ObjectWriter, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

_TEMP_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
               "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_PARTS_IN_FLIGHT = 4  # per upload: bounds its memory to 4 parts


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_temp_failure(exc: BaseException) -> bool:
    """Network trouble, 5xx, 408 and 429 are worth retrying; everything else is final."""
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError)):
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
        if code in _DENIED_CODES or _status(exc) == 403:
            return StoreAccessDenied(f"{what}: access denied ({code}); check the credentials")
        return StoreError(f"{what}: S3 error {code}: {exc}")
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError)):
        return StoreUnavailable(f"{what}: cannot reach the S3 endpoint: {exc}")
    return exc


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
                Bucket=self._store.bucket, Key=self._store._full(self._key))["UploadId"]
        number = len(self._parts) + 1
        self._slots.acquire()
        future = self._store.pool.submit(self._upload_part, number, body)
        future.add_done_callback(lambda _f: self._slots.release())
        self._parts.append(future)

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        answer = self._store._call(
            f"upload part {number} of {self._key}", self._store.client.upload_part,
            Bucket=self._store.bucket, Key=self._store._full(self._key),
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
            Bucket=self._store.bucket, Key=self._store._full(self._key),
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
    def __init__(self, bucket: str, prefix: str, settings: S3Settings) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        session = boto3.session.Session(profile_name=settings.profile) if settings.profile \
            else boto3.session.Session()
        config = botocore.config.Config(
            s3={"addressing_style": settings.addressing_style},
            # Retries happen in imagefs.retry, the one place with a deadline.
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=settings.max_connections,
            connect_timeout=5, read_timeout=30)
        self.client = session.client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key, config=config)
        self.pool = ThreadPoolExecutor(max_workers=max(settings.max_connections // 2, 1),
                                       thread_name_prefix="s3-part")

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[..., T], *, deadline: float = 60.0,
              **kwargs: Any) -> T:
        try:
            return retry(is_temp_failure, deadline=deadline)(fn)(**kwargs)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{what}: S3 endpoint {self.client.meta.endpoint_url} "
                                   f"is unavailable ({exc.__cause__})") from exc
        except Exception as exc:
            raise _translate(exc, what) from exc

    def check(self) -> None:
        self._call(f"bucket {self.bucket}", self.client.list_objects_v2, deadline=10.0,
                   Bucket=self.bucket, Prefix=self._full("manifests/"), MaxKeys=1)

    def get(self, key: str) -> bytes:
        def fetch() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        return self._call(key, fetch)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        def fetch() -> bytes:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._full(key),
                                            Range=f"bytes={start}-{start + length - 1}")
            return answer["Body"].read()
        data = self._call(key, fetch)
        if len(data) != length:
            raise StoreError(f"{key}: wanted {length} bytes at {start}, got {len(data)}")
        return data

    def put(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._full(key),
                   Body=data)

    def open_writer(self, key: str) -> ObjectWriter:
        return _MultipartWriter(self, key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._full(prefix)
        strip = len(self._full(""))
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"list {prefix}", self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], item["Size"], item["ETag"])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
