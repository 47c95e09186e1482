"""Run many file operations as one unix user, in one process: the access matrix's hands.

    setpriv --reuid=alice --regid=alice --init-groups python3 tests/as_user.py < ops.json

Reads a JSON list of [op, path, *args] from stdin; prints a JSON list of outcomes, one
per op: "ok", a listing (sorted names) for "ls", or the errno's name ("ENOENT"...).
Standard library only, so the system's python3 runs it for any user.
"""

from __future__ import annotations

import errno
import json
import os
import sys


def _run(op: str, path: str, *args: str) -> object:
    if op == "ls":
        return sorted(os.listdir(path))
    if op == "stat":
        os.stat(path)
    elif op == "read":
        with open(path, "rb") as f:
            f.read(4096)
    elif op == "getfattr":
        os.getxattr(path, args[0])
    elif op == "setfattr":
        os.setxattr(path, args[0], args[1].encode())
    elif op == "rm":
        os.unlink(path)
    elif op == "mv":
        os.rename(path, args[0])
    elif op == "cp":
        with open(path, "wb") as f:
            f.write(args[0].encode() if args else b"data from the access matrix\n")
    elif op == "mkdir":
        os.mkdir(path)
    else:
        raise ValueError(f"unknown op {op}")
    return "ok"


def main() -> None:
    outcomes: list[object] = []
    for op, path, *args in json.load(sys.stdin):
        try:
            outcomes.append(_run(op, path, *args))
        except OSError as exc:
            outcomes.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    json.dump(outcomes, sys.stdout)


if __name__ == "__main__":
    main()
