"""The sd_notify protocol of `imagefs mount --foreground`, as systemd's Type=notify sees it.

The test listens on the unix datagram socket that $NOTIFY_SOCKET names, as systemd does:
READY=1 only once the mount is there, STATUS= with the reason of a failed start and no
READY, RELOADING=1 then READY=1 around a SIGHUP that re-reads the config, STOPPING=1 on
SIGTERM, and READY=1 again after a crash (what Restart=on-failure relies on).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import Mount, make_file

from imagefs.mountinfo import is_mounted
from imagefs.sd_notify import notify

# Catalog.refresh is slowed down, so a READY=1 sent before the mount exists is caught.
SLOW_START = ("import time\nfrom imagefs.catalog import Catalog\n_refresh = Catalog.refresh\n"
              "def refresh(self, *a, **k):\n    time.sleep(0.5)\n    return _refresh(self, *a, **k)\n"
              "Catalog.refresh = refresh")


class Listener:
    """What systemd's end of $NOTIFY_SOCKET receives: one datagram per notify() call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        fields = self.sock.recv(4096).decode().split("\n")
        return dict(f.split("=", 1) for f in fields)

    def until(self, key: str, timeout: float = 30) -> list[dict[str, str]]:
        """Every message up to and including the first that carries `key`."""
        seen = [self.next(timeout)]
        while key not in seen[-1]:
            seen.append(self.next(timeout))
        return seen


@pytest.fixture
def listener(tmp_path):
    made = Listener(tmp_path / "notify.sock")
    yield made
    made.sock.close()


def _mount(file_store, tmp_path, listener, mounts, config: Path, prelude: str = "") -> Mount:
    m = Mount(file_store, tmp_path, extra=("--config", str(config)),
              env={"NOTIFY_SOCKET": str(listener.path)}, prelude=prelude)
    mounts.append(m)
    return m


def test_ready_only_once_mounted_and_stopping_on_sigterm(file_store, tmp_path, listener,
                                                         mounts):
    image_id = file_store.create(make_file(tmp_path / "a.raw", 4096))
    config = tmp_path / "imagefs.toml"
    config.write_text("")
    m = _mount(file_store, tmp_path, listener, mounts, config, prelude=SLOW_START)
    m.spawn()
    ready = listener.next()
    assert ready.get("READY") == "1", ready
    assert is_mounted(m.path) and os.path.exists(m / f"by-id/{image_id}")
    assert ready["STATUS"] == f"mounted {file_store.url} at {m.path}"

    assert m.process is not None
    m.process.send_signal(signal.SIGTERM)
    stopping = listener.next()
    assert stopping.get("STOPPING") == "1" and stopping["STATUS"].startswith("unmounting")
    assert m.process.wait(timeout=15) == 0 and not is_mounted(m.path)


def test_a_failed_start_says_why_and_is_never_ready(file_store, tmp_path, listener, mounts):
    config = tmp_path / "imagefs.toml"
    config.write_text("")
    m = _mount(file_store, tmp_path, listener, mounts, config)
    (m.path / "stray").write_text("x")
    assert m.spawn().wait(timeout=30) == 1
    messages = listener.until("STATUS", timeout=5)
    assert messages == [{"STATUS": f"cannot mount: mountpoint {m.path} is not empty"}]
    listener.sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing else, READY=1 least of all
        listener.sock.recv(4096)


def test_sighup_reloads_what_it_can_and_names_the_rest(file_store, tmp_path, listener,
                                                       mounts):
    config = tmp_path / "imagefs.toml"
    access = '[access]\nadmins = ["root"]\n[access.projects]\nacme = ["root"]\n'
    config.write_text(f'projects = ["acme"]\n{access}')
    more_access = '[access]\nadmins = ["root"]\nreaders = ["nobody"]\n[access.projects]\n' \
        'acme = ["root"]\n'
    m = _mount(file_store, tmp_path, listener, mounts, config)
    m.spawn()
    assert "READY" in listener.next()
    (m / "inbox/acme/before.part").write_bytes(b"x" * 1000)  # no quota yet

    # Every reloadable setting at once, and two that need a remount.
    config.write_text(
        'projects = ["acme", "newproject"]\nrefresh_interval = 2.0\n'
        'full_refresh_interval = 600.0\nread_timeout = 4.0\ngesture_timeout = 7.0\n'
        'delete_grace = 60.0\nsettle_time = 1.0\nlog_level = "DEBUG"\n'
        'cache_size = "1G"\nallow_other = true\n[quotas.acme]\nstaging = 0\n'
        + more_access)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert m.process is not None
    m.process.send_signal(signal.SIGHUP)
    reloading = listener.next()
    assert reloading.get("RELOADING") == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= before + 10_000_000
    ready = listener.next()
    assert ready.get("READY") == "1"
    assert ready["STATUS"] == (
        "reloaded: applied refresh_interval, full_refresh_interval, read_timeout, "
        "gesture_timeout, delete_grace, settle_time, log_level, projects, access, quotas; "
        "needs a remount: cache_size, allow_other")
    assert "cache_size, allow_other changed in the config but take effect only at mount" \
        in m.log()
    assert is_mounted(m.path)
    assert "newproject" in os.listdir(m / "inbox")  # projects: the namespace lists afresh
    with pytest.raises(OSError) as refused:  # quotas: staging = 0 from now on
        (m / "inbox/acme/after.part").write_bytes(b"x" * 1000)
    assert refused.value.errno == errno.EDQUOT

    config.write_text("refresh_interval = [")
    m.process.send_signal(signal.SIGHUP)
    assert "RELOADING" in listener.next()
    failed = listener.next()
    assert failed.get("READY") == "1"
    assert failed["STATUS"].startswith("reload failed, the running settings stay: config "
                                       f"file {config} is not valid TOML")
    assert is_mounted(m.path) and os.listdir(m / "inbox")


def test_after_a_crash_the_next_start_cleans_up_and_is_ready(file_store, tmp_path, listener,
                                                             mounts):
    """What Restart=on-failure does: start the same command again on the dead mount."""
    config = tmp_path / "imagefs.toml"
    config.write_text("")
    m = _mount(file_store, tmp_path, listener, mounts, config)
    m.spawn()
    assert "READY" in listener.next()
    assert m.process is not None
    m.process.kill()
    m.process.wait(timeout=10)
    with pytest.raises(OSError) as dead:
        os.listdir(m.path)
    assert dead.value.errno == errno.ENOTCONN
    m.spawn()
    assert "READY" in listener.next()
    assert os.listdir(m.path) and "cleaned up the stale mount" in m.log()


def test_notify_reaches_an_abstract_socket_and_never_raises(monkeypatch):
    name = f"imagefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("READY=1", "STATUS=two\nlines")
        assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    notify("READY=1")  # systemd gone: a warning, never an exception
    monkeypatch.delenv("NOTIFY_SOCKET")
    notify("READY=1")
