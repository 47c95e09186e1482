"""`imagefs install`: the mount(8) helper and the systemd units, for this venv's imagefs.

Both run the interpreter that ran `install` (`python -m imagefs`), so a host can keep
imagefs in a venv of its own. Installing is idempotent: a file is written only when its
content differs, and each is reported as installed, updated or unchanged. `--root DIR`
writes under DIR instead of / (as DESTDIR does, for tests and image builds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from imagefs.errors import InvalidValue

HELPER = "sbin/mount.fuse.imagefs"
HELPER_ALIAS = "sbin/mount.imagefs"  # for `mount -t imagefs`
UNIT_DIR = "etc/systemd/system"
# What a systemd Exec line and a shell line both take as-is: no quoting, no specifiers.
_PLAIN_PATH = re.compile(r"[\w./+-]+")


def helper_script(python: str) -> str:
    return ("#!/bin/sh\n"
            "# mount(8) helper for fuse.imagefs, written by `imagefs install`.\n"
            f'exec {python} -m imagefs.mount_helper "$@"\n')


def unit(python: str, instance: bool) -> str:
    """imagefs@.service (config /etc/imagefs/<instance>.toml) or imagefs.service."""
    name = "%i" if instance else "imagefs"
    return f"""\
# Written by `imagefs install`; `imagefs install` again rewrites it. Local changes belong
# in a drop-in: systemctl edit {'imagefs@NAME' if instance else 'imagefs'}
[Unit]
Description=imagefs image catalog mount (/etc/imagefs/{name}.toml)
Wants=network-online.target
After=network-online.target
Before=remote-fs.target

[Service]
# READY=1 once the catalog is mounted; `systemctl start` returns then (sd_notify.py).
Type=notify
NotifyAccess=main
# AWS_* variables for boto3, if the config's [s3] table does not hold them.
EnvironmentFile=-/etc/imagefs/{name}.env
ExecStart={python} -m imagefs mount --foreground --config /etc/imagefs/{name}.toml
# SIGHUP re-reads the config: what can change live does, the rest is logged (reload.py).
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM to the daemon alone: it unmounts and exits.
KillMode=mixed
TimeoutStartSec=300
TimeoutStopSec=30
# A crash leaves a dead FUSE mount; the next start cleans it up.
Restart=on-failure
RestartSec=5

[Install]
WantedBy=remote-fs.target
"""


def _put(path: Path, content: str, mode: int) -> str:
    if not path.is_symlink() and path.is_file():
        if path.read_text() == content and path.stat().st_mode & 0o7777 == mode:
            return "unchanged"
        action = "updated"
    else:
        action = "replaced" if path.is_symlink() else "installed"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.new")
    temp.write_text(content)
    temp.chmod(mode)
    os.replace(temp, path)
    return action


def _link(path: Path, target: str) -> str:
    if path.is_symlink() and os.readlink(path) == target:
        return "unchanged"
    action = "updated" if path.is_symlink() else "replaced" if path.exists() else "installed"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.new")
    temp.unlink(missing_ok=True)
    temp.symlink_to(target)
    os.replace(temp, path)
    return action


def install(root: Path = Path("/"), python: str = sys.executable) -> list[str]:
    """Install under `root`; one line per file saying what was done."""
    if not _PLAIN_PATH.fullmatch(python):
        raise InvalidValue(f"the interpreter's path {python!r} has characters a systemd "
                           "unit would misread: put the venv at a plain path")
    units = {"imagefs@.service": unit(python, True), "imagefs.service": unit(python, False)}
    lines: list[str] = []
    try:
        helper = root / HELPER
        lines.append(f"{_put(helper, helper_script(python), 0o755)} {helper} (runs "
                     f"{python} -m imagefs)")
        alias = root / HELPER_ALIAS
        lines.append(f"{_link(alias, Path(HELPER).name)} {alias} -> {Path(HELPER).name}")
        changed = False
        for name, text in units.items():
            path = root / UNIT_DIR / name
            action = _put(path, text, 0o644)
            changed |= action != "unchanged"
            lines.append(f"{action} {path}")
    except OSError as exc:
        raise InvalidValue(f"cannot install into {exc.filename or root}: {exc.strerror} "
                           "(run as root, or give --root DIR)") from None
    if changed and root == Path("/"):
        lines.append(_daemon_reload())
    return lines


def _daemon_reload() -> str:
    """systemd reads unit files again only when told to."""
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        return "systemd is not running here: it reads the units when it starts"
    result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        return f"systemctl daemon-reload failed: {reason}; run it yourself"
    return "ran systemctl daemon-reload"
