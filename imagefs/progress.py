"""Progress bars for long CLI work, shown only when stderr is a terminal.

tqdm handles rate, ETA and terminal width; hand-rolling that is not worth the lines.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not sys.stderr.isatty(), leave=False) as bar:
        yield bar.update
