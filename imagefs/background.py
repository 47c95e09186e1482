"""Background tasks that never take the mount down.

A FUSE daemon whose background task raises would unwind its nursery and unmount, taking
every running VM's disk with it. So each task runs under `keep_running` or `periodic`:
a failure is logged with its traceback, waited out with the package's one backoff
policy, and the task starts again. Only cancellation (unmount) ends them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from imagefs.errors import ImagefsError
from imagefs.retry import Backoff

log = logging.getLogger(__name__)
RESTART = Backoff(first=1.0, most=60.0)


async def keep_running(name: str, task: Callable[[], Awaitable[None]],
                       backoff: Backoff = RESTART) -> None:
    """Run a long-lived loop; restart it whenever it fails (or returns)."""
    attempt = 0
    while True:
        try:
            await task()
            log.error("%s stopped on its own; restarting it", name)
        except Exception:
            log.exception("%s failed; restarting it in about %.0fs", name,
                          backoff.ceiling(attempt))
        await trio.sleep(backoff.delay(attempt))
        attempt += 1


async def periodic(name: str, interval: float | Callable[[], float],
                   step: Callable[[], Awaitable[None]], backoff: Backoff = RESTART) -> None:
    """Run `step` every `interval` seconds; after failures, wait longer (backoff).

    A callable `interval` is asked each round, so a reload can change it.
    """
    failures = 0
    while True:
        every = interval() if callable(interval) else interval
        await trio.sleep(every if not failures else max(every, backoff.delay(failures)))
        try:
            await step()
        except ImagefsError as exc:  # expected trouble (store down...): one line, no trace
            if not failures:
                log.warning("%s failed: %s; will keep trying", name, exc)
            failures += 1
            continue
        except Exception:
            log.exception("%s failed unexpectedly; will keep trying", name)
            failures += 1
            continue
        if failures:
            log.warning("%s works again after %d failed attempts", name, failures)
        failures = 0
