"""`imagefs install`, mount(8) with `-t fuse.imagefs`, fstab entries and the systemd units.

mount(8) looks for its helper in /sbin only, so the mount tests install for real (and
put back whatever was there before); fstab is backed up and restored around its test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_file, need, run_cli

from imagefs.errors import InvalidValue
from imagefs.mount_helper import command
from imagefs.mount_options import parse_options
from imagefs.mountinfo import is_mounted, mount_at

MiB = 1 << 20
INSTALLED = [Path("/sbin/mount.fuse.imagefs"), Path("/sbin/mount.imagefs"),
             Path("/etc/systemd/system/imagefs@.service"),
             Path("/etc/systemd/system/imagefs.service")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`imagefs install` into / for real; what was there before comes back afterwards."""
    backup = tmp_path_factory.mktemp("before-install")
    saved = {}
    for path in INSTALLED:
        if path.exists() or path.is_symlink():
            saved[path] = backup / path.name
            shutil.copy2(path, saved[path], follow_symlinks=False)
    try:
        yield run_cli("install").stdout
    finally:
        for path in INSTALLED:
            path.unlink(missing_ok=True)
            if path in saved:
                shutil.copy2(saved[path], path, follow_symlinks=False)


def _unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def _mount_options(path: Path) -> set[str]:
    found = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(path)],
                           capture_output=True, text=True, check=True)
    return set(found.stdout.strip().split(","))


def test_install_is_idempotent_and_says_what_it_did(tmp_path):
    root = tmp_path / "root"
    first = run_cli("install", "--root", str(root)).stdout.splitlines()
    assert [line.split()[0] for line in first] == ["installed"] * 4
    helper = root / "sbin/mount.fuse.imagefs"
    assert f"exec {sys.executable} -m imagefs.mount_helper" in helper.read_text()
    assert os.access(helper, os.X_OK)
    assert os.readlink(root / "sbin/mount.imagefs") == "mount.fuse.imagefs"
    unit = (root / "etc/systemd/system/imagefs@.service").read_text()
    assert f"ExecStart={sys.executable} -m imagefs mount --foreground --config " \
           "/etc/imagefs/%i.toml" in unit
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "/etc/imagefs/imagefs.toml" in (root / "etc/systemd/system/imagefs.service").read_text()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_symlink()}

    again = run_cli("install", "--root", str(root)).stdout.splitlines()
    assert [line.split()[0] for line in again] == ["unchanged"] * 4
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing was rewritten

    (root / "etc/systemd/system/imagefs.service").write_text("# edited\n")
    (root / "sbin/mount.imagefs").unlink()
    (root / "sbin/mount.imagefs").write_text("#!/bin/sh\n")  # the old hand-copied helper
    third = run_cli("install", "--root", str(root)).stdout.splitlines()
    assert [line.split()[0] for line in third] == ["unchanged", "replaced", "unchanged",
                                                    "updated"]
    assert os.readlink(root / "sbin/mount.imagefs") == "mount.fuse.imagefs"


def test_systemd_analyze_verifies_the_installed_units(installed):
    need("systemd-analyze")
    assert "/sbin/mount.fuse.imagefs" in installed
    units = Path("/etc/systemd/system")
    result = subprocess.run(["systemd-analyze", "verify", str(units / "imagefs.service"),
                             str(units / "imagefs@check.service")],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in result.stderr.splitlines() if "imagefs" in line]
    assert result.returncode == 0 and not ours, result.stderr


def test_mount_t_fuse_imagefs_with_options(installed, file_store, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "a.raw", 4096))
    cache, log = tmp_path / "cache", tmp_path / "daemon.log"
    config = tmp_path / "imagefs.toml"
    config.write_text(f'cache_dir = "{cache}"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = f"allow_other,ro,config={config},cache_size=64M,read_timeout=5,log_file={log}"
    try:
        fake = subprocess.run(["mount", "-f", "-t", "fuse.imagefs", file_store.url, str(mnt),
                               "-o", options], capture_output=True, text=True, timeout=60)
        assert fake.returncode == 0 and not is_mounted(mnt), fake.stderr  # mount -f: checks only
        done = subprocess.run(["mount", "-t", "fuse.imagefs", file_store.url, str(mnt),
                               "-o", options], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.path.exists(mnt / f"by-id/{image_id}")  # ready once mount(8) returns
        entry = mount_at(mnt)
        assert entry is not None and (entry.fstype, entry.source) == ("fuse.imagefs",
                                                                       file_store.url)
        assert {"ro", "allow_other"} <= _mount_options(mnt)
        assert json.loads(os.getxattr(mnt, "user.imagefs.stats"))["cache_cap"] == 64 * MiB
        assert cache.is_dir()  # where config= said
        assert "mounted" in log.read_text()
        with pytest.raises(OSError) as refused:
            (mnt / "inbox/acme/new.raw").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
        assert subprocess.run(["umount", str(mnt)]).returncode == 0
        assert not is_mounted(mnt)
    finally:
        _unmount(mnt)


def test_an_unknown_option_is_one_line_and_mounts_nothing(installed, file_store, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "imagefs", file_store.url, str(mnt), "-o",
                             "allow_other,cache-siz=1G"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and not is_mounted(mnt)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mount.fuse.imagefs: unknown mount option 'cache-siz' (did you mean cache_size?)"), lines


def test_an_fstab_entry_mounts_with_mount_dir(installed, file_store, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "b.raw", 4096))
    mnt = tmp_path / f"fstab-{tmp_path.name}"
    mnt.mkdir()
    fstab = Path("/etc/fstab")
    original = fstab.read_bytes()
    options = ("defaults,_netdev,nofail,users,x-systemd.mount-timeout=30,"
               f"x-systemd.after=network-online.target,cache_dir={tmp_path / 'cache'},"
               "cache_size=32M")
    try:
        fstab.write_bytes(original + f"{file_store.url} {mnt} fuse.imagefs {options} 0 0\n"
                          .encode())
        done = subprocess.run(["mount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.path.exists(mnt / f"by-id/{image_id}")
        assert json.loads(os.getxattr(mnt, "user.imagefs.stats"))["cache_cap"] == 32 * MiB
        # mount -a knows the entry is mounted (the source matches fstab's) and leaves it.
        again = subprocess.run(["mount", "-a", "-t", "fuse.imagefs"], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert subprocess.run(["umount", str(mnt)]).returncode == 0
        assert not is_mounted(mnt)
    finally:
        fstab.write_bytes(original)
        _unmount(mnt)


def test_options_come_from_the_settings():
    parsed = parse_options(["rw,allow_other,config=/etc/imagefs/a.toml,cache_size=20G",
                            "read-timeout=2.5,s3.endpoint_url=http://s3:8333,_netdev,nofail,"
                            "noauto,x-systemd.automount,user=alice,nosuid,nodev,noexec,ro"])
    assert parsed.config == "/etc/imagefs/a.toml"
    assert parsed.overrides == {"allow_other": True, "cache_size": 20 << 30,
                                "read_timeout": 2.5, "read_only": True,
                                "s3": {"endpoint_url": "http://s3:8333"}}
    assert parse_options(["allow_other=false"]).overrides == {"allow_other": False}
    for bad, message in [("store=s3://x", "the store is the mount's source"),
                         ("read_timeout=soon", "expected a number"),
                         ("cache_size", "needs a value"),
                         ("projects=a", "unknown mount option 'projects'"),
                         ("bogus", "unknown mount option 'bogus'")]:
        with pytest.raises(InvalidValue, match=message):
            parse_options([bad])
    assert parse_options(["bogus,cache_size=1G"], sloppy=True).accepted == ["cache_size=1G"]


def test_the_helper_reads_mount8s_arguments():
    line, flags = command(["s3://b/p", "/mnt/images", "-s", "-v", "-o",
                           "rw,allow_other,bogus,_netdev"])
    assert line == [sys.executable, "-m", "imagefs", "mount", "--store", "s3://b/p", "-o",
                    "allow_other", "/mnt/images"] and flags == {"s", "v"}
    for argv, message in [(["s3://b/p"], "usage"), (["a", "b", "-N", "1"], "not supported"),
                          (["a", "b", "-x"], "unknown flag -x"), (["a", "b", "-o"], "needs")]:
        with pytest.raises(InvalidValue, match=message):
            command(argv)
