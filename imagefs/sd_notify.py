"""sd_notify(3): tell systemd (`Type=notify`) when the mount is ready, reloading, stopping.

The protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the unix
socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). systemd
documents it as stable and meant to be reimplemented, so these lines replace a
dependency: systemd-python needs libsystemd's headers and a compiler to install, and
sdnotify is these same lines, unmaintained. Without `$NOTIFY_SOCKET` (not started by
systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(*fields: str) -> None:
    """Send `READY=1`, `STATUS=...` and the like; never raises (systemd may be gone)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    message = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, target)
    except OSError as exc:
        log.warning("cannot tell systemd %s at %s: %s", fields[0], address, exc.strerror)


def reloading() -> None:
    """`RELOADING=1` with the timestamp `Type=notify-reload` (systemd 253+) requires."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
           "STATUS=reloading the config")
