"""Running the daemon in the background: `imagefs mount` returns once the mount is ready.

The daemon is this same command again with --foreground, in a new session; it reports
on a pipe ("OK", or "ERR <why>"), so the parent can exit 0 or print the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

from imagefs.sd_notify import notify


def spawn_daemon() -> int:
    """Re-run ourselves in the foreground in a new session; wait for its ready report."""
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "imagefs", *sys.argv[1:], "--foreground",
            "--ready-fd", str(write_fd)]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        child = subprocess.Popen(argv, stdin=devnull_in, stdout=devnull_out,
                                 stderr=subprocess.PIPE, pass_fds=(write_fd,),
                                 start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode(errors="replace").strip()
    if report == "OK":
        assert child.stderr is not None
        child.stderr.close()
        return 0
    child.wait(timeout=30)
    assert child.stderr is not None
    err = child.stderr.read().decode(errors="replace").strip()
    message = report[4:] if report.startswith("ERR ") else (err.splitlines() or
                                                            ["daemon exited early"])[-1]
    print(f"imagefs: error: {message.removeprefix('imagefs: error: ')}", file=sys.stderr)
    return 1


def failed(ready_fd: int | None, message: str) -> None:
    """Why the mount did not come up, for the waiting parent and for systemctl status."""
    report_ready(ready_fd, f"ERR {message}")
    notify(f"STATUS=cannot mount: {message}")


def report_ready(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)
    except OSError:
        pass
