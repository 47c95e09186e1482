"""mount(8)'s helper for `mount -t fuse.imagefs` and fstab entries of that type.

`imagefs install` puts it at /sbin/mount.fuse.imagefs (and /sbin/mount.imagefs, for
`-t imagefs`). mount(8) runs it as `mount.fuse.imagefs SOURCE TARGET [-sfnv] [-o OPTS]`
with PATH and HOME removed from the environment. It checks the options (mount_options.py;
an unknown one is one line and exit 1, before anything is mounted), then becomes
`imagefs mount --store SOURCE`, which returns once the mount is ready.
"""

from __future__ import annotations

import os
import shlex
import sys

from imagefs.errors import ImagefsError, InvalidValue
from imagefs.mount_options import parse_options

PROG = "mount.fuse.imagefs"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_FLAGS = set("sfnv")  # sloppy, fake, no mtab, verbose: what mount(8) passes on


def command(argv: list[str]) -> tuple[list[str], set[str]]:
    """The `imagefs mount` command line for mount(8)'s arguments, and the flags given."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "-t", "-N"):
            value = next(args, None)
            if value is None:
                raise InvalidValue(f"{arg} needs a value")
            if arg == "-N":
                raise InvalidValue("-N (mount in another namespace) is not supported")
            if arg == "-o":
                options.append(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            if not set(arg[1:]) <= _FLAGS:
                raise InvalidValue(f"unknown flag {arg} (mount(8) passes -s -f -n -v -o)")
            flags |= set(arg[1:])
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise InvalidValue(f"usage: {PROG} STORE_URL MOUNTPOINT [-o OPTIONS] (as mount(8) "
                           "runs it: mount -t fuse.imagefs s3://BUCKET/PREFIX /mnt/images)")
    source, target = positional
    parsed = parse_options(options, sloppy="s" in flags)
    line = [sys.executable, "-m", "imagefs", "mount", "--store", source]
    if parsed.accepted:
        line += ["-o", ",".join(parsed.accepted)]
    return [*line, target], flags


def main(argv: list[str]) -> int:
    try:
        line, flags = command(argv)
    except ImagefsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if "v" in flags:
        print(f"{PROG}: {shlex.join(line)}", file=sys.stderr)
    if "f" in flags:  # mount -f: check everything, mount nothing
        return 0
    os.execve(line[0], line, {"PATH": _PATH, **os.environ})
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
