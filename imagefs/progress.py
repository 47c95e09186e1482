"""Progress bars for long CLI work, shown only when stderr is a terminal.

tqdm handles rate, ETA and terminal width; hand-rolling that is not worth the lines.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

from tqdm import tqdm


def _bar(total: int, label: str, postfix: str | None = None) -> tqdm:
    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not sys.stderr.isatty(), leave=False, postfix=postfix)


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    with _bar(total, label) as bar:
        yield bar.update


class FilesBar:
    """Bytes and files done, counted from several upload threads at once."""

    def __init__(self, bar: tqdm, files: int) -> None:
        self._bar = bar
        self._files = files
        self._done = 0
        self._lock = threading.Lock()

    def advance(self, size: int) -> None:
        with self._lock:
            self._bar.update(size)

    def file_done(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"{self._done}/{self._files} files")


@contextlib.contextmanager
def files_bar(total: int, files: int, label: str) -> Iterator[FilesBar]:
    """A byte bar that also shows how many of `files` are done."""
    with _bar(total, label, f"0/{files} files") as bar:
        yield FilesBar(bar, files)
