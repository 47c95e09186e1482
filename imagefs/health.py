"""What the daemon remembers about how it is doing, for `imagefs status` and metrics.

Counters of reads, the cache and uploads live with the parts that count them; this holds
what belongs to no part: how the periodic catalog refresh last went, and the last few
warnings, errors and refusals — what an operator asks first, shown without a trip to
the log file (which the status names as well).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator

from imagefs.records import iso_time

RECENT = 10  # warnings, errors and refusals kept for `imagefs status`


class Outcomes:
    """When a piece of recurring work last succeeded, and how often it failed."""

    def __init__(self) -> None:
        self.succeeded = 0
        self.failed = 0
        self.last_success: float | None = None  # time.time()
        self.last_error: str | None = None  # why the latest failure failed

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count what the block does: an exception is a failure (and raised on)."""
        try:
            yield
        except Exception as exc:
            self.failed += 1
            self.last_error = f"{iso_time(int(time.time() * 1e6))} {exc}"
            raise
        self.succeeded += 1
        self.last_success = time.time()


class RecentErrors(logging.Handler):
    """The last warnings and errors logged, and refusals noted, as one line each.

    A logging handler, so whatever any part logs at WARNING or above is kept without
    that part knowing; tracebacks stay in the log. Appends come from any thread.
    """

    def __init__(self, kept: int = RECENT) -> None:
        super().__init__(logging.WARNING)
        self._lines: deque[str] = deque(maxlen=kept)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            when = iso_time(int(record.created * 1e6))
            message = " ".join(record.getMessage().splitlines())
            self.add(f"{when} {record.levelname} {message}")
        except Exception:  # a logging handler must never raise into the caller
            self.handleError(record)

    def add(self, line: str) -> None:
        self._lines.append(line)

    def lines(self) -> list[str]:
        """Oldest first."""
        return list(self._lines)
