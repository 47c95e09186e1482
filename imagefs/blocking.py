"""Blocking calls made from trio: worker threads under a limiter and a deadline.

A store can stall forever (an S3 endpoint that accepts and never answers, a hard NFS
mount). The FUSE caller must still get an answer in time, so a call that outlives its
deadline is abandoned: the caller gets StoreUnavailable (EIO) and the thread is left to
finish or hang on its own, counted in `stuck` until it returns. Never use this for work
that touches LMDB: an abandoned thread could still be inside it at unmount.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from imagefs.errors import StoreUnavailable

T = TypeVar("T")


class _Call:
    __slots__ = ("started", "finished", "abandoned")

    def __init__(self) -> None:
        self.started = self.finished = self.abandoned = False


class BlockingCalls:
    """Worker-thread calls to one resource (a store), with accounting of stuck threads."""

    def __init__(self, limit: int) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        self._lock = threading.Lock()
        self.stuck = 0      # abandoned threads that have not returned yet
        self.abandoned = 0  # threads ever abandoned
        self.timeouts = 0   # calls that answered StoreUnavailable for their deadline

    async def run(self, fn: Callable[..., T], *args: object, timeout: float | None = None,
                  what: str = "store call") -> T:
        """fn(*args) in a worker thread; StoreUnavailable if it takes over `timeout` s."""
        call = _Call()

        def work() -> T:
            with self._lock:
                call.started = True
            try:
                return fn(*args)
            finally:
                with self._lock:
                    call.finished = True
                    if call.abandoned:
                        self.stuck -= 1

        deadline = trio.fail_after(timeout) if timeout is not None else \
            contextlib.nullcontext()
        try:
            with deadline:
                return await trio.to_thread.run_sync(work, limiter=self.limiter,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            self.timeouts += 1
            raise StoreUnavailable(f"{what}: the store did not answer within "
                                   f"{timeout:g}s") from None
        finally:
            with self._lock:
                if call.started and not call.finished and not call.abandoned:
                    call.abandoned = True
                    self.stuck += 1
                    self.abandoned += 1
