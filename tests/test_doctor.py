"""`imagefs doctor`: every check passes on a good host, and each failure is provoked once.

What a test cannot break on this host for real (/dev/fuse, fuse.conf, the clock) is
provoked in process, through the check's own parameters.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from conftest import run_cli

from imagefs import doctor
from imagefs.config import Settings

NO_CONFIG = {"IMAGEFS_CONFIG": "/dev/null"}


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`what` -> the whole line, for each line doctor printed."""
    found = {}
    for line in result.stdout.splitlines():
        what = line[6:].split(": ", 1)[0]
        found[what] = line
    return found


def test_a_good_host_passes(tmp_path):
    store = f"file://{tmp_path}/new-store"
    run_cli("store", "init", "--store", store)  # creates the directory, stamps the marker
    result = run_cli("doctor", "--store", store, "--cache-dir", str(tmp_path / "cache"),
                     env=NO_CONFIG)
    assert result.returncode == 0
    found = lines(result)
    for what in ("/dev/fuse", "fusermount3", "allow_other", "cache dir", store,
                 "store writable", "catalog", "clock"):
        assert found[what].startswith("ok "), result.stdout
    assert not list((tmp_path / "new-store").glob("*doctor*"))  # the probes left nothing


def test_a_broken_host_fails_each_check(tmp_path):
    """No fusermount3 on PATH, a missing store, a secret readable by all, a read-only
    cache dir: each is its own FAIL (or warn) line, and the exit status is 1."""
    config = tmp_path / "imagefs.toml"
    config.write_text('[s3]\naccess_key_id = "AKIA"\nsecret_access_key = "s3cr3t"\n')
    config.chmod(0o644)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                   check=True)
    try:
        result = run_cli("doctor", "--config", str(config), "--store",
                         f"file://{tmp_path}/no-such-store", "--cache-dir",
                         str(readonly / "cache"), check=False, env={"PATH": "/nonexistent"})
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert result.returncode == 1
    found = lines(result)
    assert found["fusermount3"].startswith("FAIL") and "install fuse3" in found["fusermount3"]
    assert found["config"].startswith("warn") and "s3.secret_access_key" in found["config"]
    assert f"chmod 600 {config}" in found["config"]
    assert found["cache dir"].startswith("FAIL") and "read-only" in found["cache dir"]
    missing = found[f"file://{tmp_path}/no-such-store"]
    assert missing.startswith("FAIL") and "imagefs store init --store" in missing


def test_a_full_cache_dir_fails(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        checks = doctor.directory("cache dir", full / "cache", 10 << 30)
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert checks[0].status == "FAIL" and "free on its filesystem" in checks[0].detail


def test_s3_bucket_and_credentials(s3_server, s3_store):
    env = {**s3_server.environ(), **NO_CONFIG}
    good = lines(run_cli("doctor", "--store", s3_store.url, check=False, env=env))
    assert good[s3_store.url].startswith("ok") and good["store writable"].startswith("ok")
    assert good["clock"].startswith("ok") and "the store's" in good["clock"]  # its Date header
    url = f"s3://t-{uuid.uuid4().hex[:12]}/x"
    missing = run_cli("doctor", "--store", url, check=False, env=env)
    assert missing.returncode == 1
    assert "bucket does not exist" in lines(missing)[url] and "store init" in lines(missing)[url]
    denied = lines(run_cli("doctor", "--store", s3_store.url, check=False,
                           env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}))
    assert denied[s3_store.url].startswith("FAIL") and "access denied" in denied[s3_store.url]
    assert denied["clock"].startswith("ok")  # measured even when the signature is refused


def test_host_checks_that_cannot_be_broken_for_real(tmp_path):
    assert doctor.fuse_device(tmp_path / "fuse").status == "FAIL"
    (tmp_path / "plain").write_text("")
    assert "not a character device" in doctor.fuse_device(tmp_path / "plain").detail
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    refused = doctor.allow_other(True, conf, euid=1000)
    assert refused.status == "FAIL" and "user_allow_other" in refused.detail
    conf.write_text("user_allow_other\n")
    assert doctor.allow_other(True, conf, euid=1000).status == "ok"
    assert doctor.allow_other(True, tmp_path / "none", euid=0).status == "ok"  # root


@pytest.mark.parametrize("offset, status", [(0.5, "ok"), (60.0, "warn"), (3600.0, "FAIL")])
def test_clock_skew_against_the_store(tmp_path, offset, status):
    settings = Settings(store=f"file://{tmp_path}")
    checks = doctor.store_checks(settings, clock=lambda: time.time() + offset)
    clock = next(c for c in checks if c.what == "clock")
    assert clock.status == status, clock
    assert not list(tmp_path.iterdir())  # the probes left nothing behind
