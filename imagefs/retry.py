"""The one retry layer: jittered exponential backoff under an overall deadline."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from imagefs.errors import StoreUnavailable

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


def retry(is_temp_failure: Callable[[BaseException], bool], deadline: float = 60.0,
          first_delay: float = 0.1, max_delay: float = 5.0,
          sleep: Callable[[float], None] = time.sleep
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
            delay = first_delay
            attempt = 1
            while True:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if not is_temp_failure(exc):
                        raise
                    elapsed = time.monotonic() - start
                    if elapsed + delay > deadline:
                        raise StoreUnavailable(
                            f"{fn.__name__} still failing after {attempt} attempts in "
                            f"{elapsed:.0f}s: {exc}") from exc
                    log.info("%s failed (%s), attempt %d; retrying in %.1fs",
                                fn.__name__, exc, attempt, delay)
                    sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, max_delay)
                    attempt += 1

        return wrapper

    return decorate
