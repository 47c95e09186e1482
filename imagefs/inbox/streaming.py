"""Upload an inbox file while it is still being written, as long as it is written in order.

`cp`, `rsync` and most copies write a file front to back; staging it (inspect, hash,
upload) alongside the writes means that once the file settles only the manifest is left
to write. Any write out of order, a shrinking truncate or an unlink abandons the stream,
and the commit then makes its usual full pass over the spool file. Correctness never
depends on the stream: it only ever reads bytes that were written in order.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from imagefs.errors import InvalidValue
from imagefs.pipeline import StagedData, discard, stage_data
from imagefs.stores import Store

log = logging.getLogger(__name__)


class StreamAbandoned(Exception):
    """The file stopped being written in order; the commit will do a full pass."""


class GrowingFile:
    """A reader over a spool file that blocks until the writer has gone further."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._position = 0
        self._in_order = 0  # bytes [0, _in_order) were written front to back
        self._final = False
        self._abandoned = False
        self._cond = threading.Condition()

    def wrote(self, offset: int, length: int) -> None:
        with self._cond:
            if offset < self._position or offset > self._in_order:
                self._abandoned = True  # a rewrite of bytes already streamed, or a gap
            else:
                self._in_order = max(self._in_order, offset + length)
            self._cond.notify_all()

    def resized(self, size: int) -> None:
        with self._cond:
            if size != self._in_order:
                self._abandoned = True
                self._cond.notify_all()

    def finish(self, size: int) -> None:
        """The file settled at `size`: stream the rest and end."""
        with self._cond:
            if size != self._in_order:
                self._abandoned = True
            self._final = True
            self._cond.notify_all()

    def abandon(self) -> None:
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()

    def read(self, size: int) -> bytes:
        with self._cond:
            while not self._abandoned and not self._final and \
                    self._in_order - self._position < size:
                self._cond.wait()
            if self._abandoned:
                raise StreamAbandoned()
            start = self._position
            take = min(size, self._in_order - start)
            self._position += take  # a write landing here from now on abandons the stream
        return os.pread(self._fd, take, start) if take else b""

    def close(self) -> None:
        """Idempotent: the format inspector closes its source too."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamingStage:
    """One background thread staging one inbox file as it is written."""

    def __init__(self, store: Store, path: Path, image_id: str, block_size: int) -> None:
        self._store = store
        self._image_id = image_id
        self.source = GrowingFile(path)
        self._result: StagedData | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(block_size,),
                                        name=f"stream-{image_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self, block_size: int) -> None:
        try:
            self._result = stage_data(self._store, self.source, self._image_id, block_size)
        except BaseException as exc:
            self._result = exc
        finally:
            self.source.close()

    def result(self, size: int) -> StagedData | None:
        """Blocking: the staged data once `size` bytes are in, or None if abandoned.

        Raises what inspection raised (UnsafeImage...) if the stream completed.
        """
        self.source.finish(size)
        self._thread.join()
        if isinstance(self._result, StreamAbandoned):
            return None
        if isinstance(self._result, BaseException):
            if isinstance(self._result, Exception) and not _final_verdict(self._result):
                log.info("streamed upload of %s failed (%s); retrying with a full pass",
                         self._image_id, self._result)
                return None
            raise self._result
        return self._result

    def cancel(self) -> None:
        """Blocking: stop and remove whatever the stream put in the store."""
        self.source.abandon()
        self._thread.join()
        if isinstance(self._result, StagedData):
            discard(self._store, self._image_id)


def _final_verdict(exc: Exception) -> bool:
    """Inspection's refusals are final; store trouble is retried by the full pass."""
    return isinstance(exc, InvalidValue)
