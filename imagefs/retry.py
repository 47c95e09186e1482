"""The one retry policy: jittered exponential backoff, with an overall deadline for calls.

`Backoff` says how long to wait before attempt n; `retry` wraps a blocking store call
with it under a deadline; background tasks (imagefs.background) and the inbox's upload
attempts use the same `Backoff` with their own bounds, so there is one policy to tune.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from imagefs.errors import StoreUnavailable

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (0-based): first * 2**n, capped at `most`, jittered down."""

    first: float = 0.1
    most: float = 5.0

    def delay(self, attempt: int) -> float:
        return self.ceiling(attempt) * random.uniform(0.5, 1.0)

    def ceiling(self, attempt: int) -> float:
        """The delay without jitter: what to tell an operator."""
        return min(self.first * 2 ** min(attempt, 62), self.most)


def retry(is_temp_failure: Callable[[BaseException], bool], deadline: float = 60.0,
          backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep
          ) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Retry temporary failures of a blocking call until `deadline` seconds have passed.

    Runs inside worker threads (store calls are blocking), so sleeping here never stalls
    the event loop. When the deadline passes, the last failure becomes StoreUnavailable,
    so no caller ever waits without bound.
    """

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.monotonic()
            attempt = 0
            while True:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if not is_temp_failure(exc):
                        raise
                    elapsed = time.monotonic() - start
                    delay = backoff.delay(attempt)
                    if elapsed + delay > deadline:
                        raise StoreUnavailable(
                            f"{fn.__name__} still failing after {attempt + 1} attempts in "
                            f"{elapsed:.0f}s: {exc}") from exc
                    log.info("%s failed (%s), attempt %d; retrying in %.1fs",
                             fn.__name__, exc, attempt + 1, delay)
                    sleep(delay)
                    attempt += 1

        return wrapper

    return decorate
