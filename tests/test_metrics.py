"""Monitoring (issue 9): Prometheus metrics scraped over HTTP from real mounts, and
`imagefs status` — the numbers move as reads, uploads, refusals and refreshes happen."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_file, run_cli
from prometheus_client.parser import text_string_to_metric_families
from test_inbox import config, published, qemu_img, wait

from imagefs.config import listen_address
from imagefs.errors import InvalidValue
from imagefs.metrics import COUNTERS, GAUGES

MiB = 1 << 20
LISTEN = ("--metrics-listen", "127.0.0.1:0")  # any free port: the status names it
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def daemon_status(path: Path) -> dict:
    return json.loads(os.getxattr(path, "user.imagefs.daemon"))


def scrape(url: str) -> Samples:
    """Every sample, parsed with prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("imagefs_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def read_through(path: Path) -> bytes:
    """Read the way a reader that the kernel cannot answer does; fsync waits for the
    chunks to be in the cache (as `imagefs cache warm`)."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = f.read()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def assert_counters_match(stats: dict, samples: Samples) -> None:
    """Every counter of user.imagefs.stats is a metric, with the same value."""
    for key, count in stats.items():
        if key == "read_errors":
            for name, n in count.items():
                assert value(samples, "imagefs_read_errors_total", errno=name) == n
        elif key == "images":
            assert sum(v for (name, _), v in samples.items() if name == "imagefs_images") \
                == count
        elif key in COUNTERS:
            name, _text, label = COUNTERS[key]
            labels = dict([label]) if label else {}
            assert value(samples, f"imagefs_{name}_total", **labels) == count, key
        else:
            assert key in GAUGES, f"the counter {key} has no metric"
            assert value(samples, f"imagefs_{GAUGES[key][0]}") == count, key


def test_reads_move_the_cache_and_store_metrics(store, mount, tmp_path):
    src = make_file(tmp_path / "a.raw", 6 * MiB, seed=91)  # two 4 MiB chunks
    image_id = store.create(src)
    cache = tmp_path / "cache-metrics"
    m = mount(store, cache_dir=cache, extra=LISTEN)
    url = daemon_status(m.path)["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    idle = scrape(url)
    assert value(idle, "imagefs_store_fetches_total") == 0
    assert value(idle, "imagefs_images", status="active") == 1
    assert value(idle, "imagefs_cache_cap_bytes") == 10 << 30
    assert value(idle, "imagefs_daemon_info", store=store.url, mountpoint=str(m.path),
                 version="0.1.0") == 1

    assert read_through(m / f"by-id/{image_id}") == src.read_bytes()
    cold = scrape(url)
    assert value(cold, "imagefs_store_fetches_total") == 2
    assert value(cold, "imagefs_store_fetched_bytes_total") == 6 * MiB
    assert value(cold, "imagefs_store_fetch_seconds_count") == 2
    assert value(cold, "imagefs_cache_misses_total", tier="lmdb") == 2
    assert value(cold, "imagefs_cache_misses_total", tier="memory") >= 1  # chunk 1: prefetched
    assert value(cold, "imagefs_read_bytes_total") == 6 * MiB
    assert value(cold, "imagefs_cache_bytes") == 6 * MiB
    assert value(cold, "imagefs_read_errors_total", errno="EIO") == 0

    read_through(m / f"by-id/{image_id}")
    warm = scrape(url)
    assert value(warm, "imagefs_store_fetches_total") == 2  # no new fetch...
    hits = value(warm, "imagefs_cache_hits_total", tier="memory") - \
        value(cold, "imagefs_cache_hits_total", tier="memory")
    reads = value(warm, "imagefs_reads_total") - value(cold, "imagefs_reads_total")
    assert reads >= 6 and hits == reads  # ...every read came from memory
    assert_counters_match(m.stats(), scrape(url))
    assert daemon_status(m.path)["cache"]["hit_ratio"] == 0.5  # 12 MiB read, 6 fetched

    m.stop()  # a new daemon on the same cache dir: memory is empty, LMDB is not
    again = mount(store, cache_dir=cache, extra=LISTEN)
    read_through(again / f"by-id/{image_id}")
    after = scrape(daemon_status(again.path)["metrics_url"])
    assert value(after, "imagefs_cache_hits_total", tier="lmdb") >= 2
    assert value(after, "imagefs_store_fetches_total") == 0
    assert value(after, "imagefs_store_fetched_bytes_total") == 0


# The catalog refresh fails while the flag file exists, as against a store that is down.
REFRESH_OUTAGE = """
import os
import imagefs.catalog as catalog
from imagefs.errors import StoreUnavailable
real = catalog.Catalog.fetch_changes
def fetch_changes(self):
    if os.path.exists({flag!r}):
        raise StoreUnavailable("injected refresh outage")
    return real(self)
catalog.Catalog.fetch_changes = fetch_changes
"""


def wait_for(predicate, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_uploads_refusals_and_refreshes_move_their_metrics(file_store, mount, tmp_path):
    flag = tmp_path / "store-down"
    m = mount(file_store, extra=(*config(tmp_path, refresh_interval=0.5), *LISTEN),
              prelude=REFRESH_OUTAGE.format(flag=str(flag)))
    url = daemon_status(m.path)["metrics_url"]

    src = make_file(tmp_path / "good.raw", MiB, seed=92)
    subprocess.run(["cp", str(src), str(m / "inbox/acme/good.raw")], check=True)
    image_id = published(m / "inbox/acme/good.raw")
    assert (m / f"by-id/{image_id}").stat().st_size == MiB
    done = scrape(url)
    assert value(done, "imagefs_uploads_total") == 1
    assert value(done, "imagefs_uploaded_bytes_total") == MiB
    assert value(done, "imagefs_upload_failures_total") == 0
    assert value(done, "imagefs_images", status="active") == 1
    assert all(value(done, "imagefs_inbox_entries", state=s) == 0
               for s in ("writing", "settling", "inspecting", "uploading", "failed"))

    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(bad))
    subprocess.run(["cp", str(bad), str(m / "inbox/acme/bad.qcow2")], check=True)
    assert wait(m / "inbox/acme/bad.qcow2").returncode == 1
    refused = scrape(url)
    assert value(refused, "imagefs_upload_failures_total") == 1
    assert value(refused, "imagefs_uploads_total") == 1
    assert value(refused, "imagefs_inbox_entries", state="failed") == 1

    os.unlink(m / "projects/acme/private/good.raw")  # a delayed delete: pending_delete
    gone = scrape(url)
    assert value(gone, "imagefs_images", status="active") == 0
    assert value(gone, "imagefs_images", status="pending_delete") == 1

    flag.touch()
    wait_for(lambda: value(scrape(url), "imagefs_catalog_refresh_failures_total") >= 1,
             "a refresh to fail")
    stale = wait_for(lambda: (age := value(scrape(url), "imagefs_catalog_refresh_age_seconds"))
                     >= 1.0 and age, "the catalog to age")  # refresh_interval is 0.5 s
    refreshes = value(scrape(url), "imagefs_catalog_refreshes_total")
    flag.unlink()
    wait_for(lambda: value(scrape(url), "imagefs_catalog_refreshes_total") > refreshes,
             "a refresh to succeed")
    assert value(scrape(url), "imagefs_catalog_refresh_age_seconds") < stale
    errors = daemon_status(m.path)["recent_errors"]
    assert any("catalog refresh failed: injected refresh outage" in e for e in errors)


def test_a_busy_port_is_a_clear_startup_error(file_store, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        (tmp_path / "mnt").mkdir()
        result = run_cli("mount", "--store", file_store.url, "--cache-dir",
                         str(tmp_path / "cache"), "--metrics-listen", listen,
                         str(tmp_path / "mnt"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"metrics_listen {listen}: address already in use")
    assert not os.path.ismount(tmp_path / "mnt")


def test_listen_addresses():
    assert listen_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert listen_address("[::1]:9464") == ("::1", 9464)
    assert listen_address(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "host:port", "127.0.0.1:70000"):
        with pytest.raises(InvalidValue, match="expected HOST:PORT"):
            listen_address(bad)


def test_status_human_and_json_on_a_real_mount(file_store, tmp_path):
    src = make_file(tmp_path / "golden.raw", 2 * MiB, seed=93)
    image_id = file_store.create(src, "acme", "--protected")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    run_cli("mount", "--store", file_store.url, "--cache-dir", str(cache), *LISTEN,
            str(mnt))  # daemonized, as an operator mounts: it logs to a file
    try:
        read_through(mnt / f"by-id/{image_id}")
        try:
            os.unlink(mnt / "projects/acme/private/golden.raw")
        except PermissionError:
            pass
        else:
            raise AssertionError("a protected image was deleted")
        human = run_cli("status", str(mnt)).stdout
        rows = [re.match(r"([a-z ]+):( +)(.*)", line) for line in human.splitlines()
                if not line.startswith(" ")]
        shown = {row[1]: row[3] for row in rows}
        assert set(shown) == {
            "mountpoint", "store", "daemon", "cache", "hit ratio", "catalog",
            "refresh failures", "inbox", "uploads", "staging", "read errors", "log file",
            "metrics", "recent errors"}
        assert len({row.start(3) for row in rows}) == 1  # one column for the values
        assert shown["mountpoint"] == str(mnt) and shown["store"] == file_store.url
        assert shown["catalog"].startswith("1 image (1 active), refreshed ")
        assert shown["cache"].startswith(f"2.0M of 10.0G (0%) in {cache}")
        assert shown["hit ratio"].startswith("0.0% of 2.0M read came from the cache")
        assert shown["log file"] == str(cache / "imagefs.log")
        assert shown["metrics"].startswith("http://127.0.0.1:")
        assert "REFUSED uid 0: rm golden.raw: EPERM: image" in shown["recent errors"]

        doc = json.loads(run_cli("status", str(mnt), "--json").stdout)
        assert doc["mountpoint"] == str(mnt) and doc["catalog"]["images"] == 1
        assert doc["cache"]["bytes"] == 2 * MiB and doc["metrics_url"] == shown["metrics"]
        assert doc["log_file"] == str(cache / "imagefs.log")
        assert "is protected" in (cache / "imagefs.log").read_text()
        every = run_cli("status", "--json", check=False)  # every imagefs mount on the host
        assert str(mnt) in [d["mountpoint"] for d in json.loads(every.stdout)]
    finally:
        run_cli("umount", str(mnt))
    gone = run_cli("status", str(mnt), check=False)
    assert gone.returncode == 1 and f"{mnt} is not an imagefs mount" in gone.stderr


def test_status_says_why_a_mount_shows_none(monkeypatch):
    """What a non-admin meets under an [access] table (the xattr itself: test_access.py),
    and what a dead daemon's stale mount answers."""
    from imagefs import status
    from imagefs.mountinfo import MountEntry

    monkeypatch.setattr(status, "mount_at", lambda p: MountEntry(p, "fuse.imagefs", "imagefs"))
    for code, says in ((errno.ENODATA, "shows its status to admins only"),
                       (errno.ENOTCONN, "its daemon died (a stale mount)")):
        def refuse(path, key, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(status.os, "getxattr", refuse)
        with pytest.raises(InvalidValue, match=re.escape(says)):
            status.read_status("/mnt/images")


def test_status_of_a_stopped_daemon_answers_in_time(file_store, mount):
    """A daemon that is stopped (or hung) must not hang `imagefs status`."""
    from imagefs import status

    m = mount(file_store)
    os.kill(m.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InvalidValue, match="did not answer within 0.5s"):
            status.run(str(m.path), False, timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        os.kill(m.process.pid, signal.SIGCONT)
    assert status.within(5, "again", status.read_status, str(m.path))["store"] == \
        file_store.url
