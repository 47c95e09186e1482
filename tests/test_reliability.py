"""The failure model (docs/reliability.md) on real mounts: what bad luck and bad input do.

A full spool disk, a store directory that turns empty, a hung NFS share, a killed
daemon, two daemons on one cache dir, concurrent edits from two hosts, background tasks
that fail, a damaged cache, hostile names: each ends with a clear errno and a mount
that keeps serving, and nothing is lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb

from conftest import StoreHandle, make_file, run_cli
from imagefs.config import Settings
from imagefs.mountinfo import is_mounted

MiB = 1 << 20
HERE = Path(__file__).parent


def config(tmp_path: Path, **values) -> tuple[str, str]:
    values.setdefault("settle_time", 0.3)
    values.setdefault("projects", ["acme"])
    path = tmp_path / f"reliability-{len(list(tmp_path.glob('reliability-*.toml')))}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return ("--config", str(path))


def errno_of(call, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def inbox_wait(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli("inbox", "wait", str(path), "--timeout", str(timeout), check=False,
                   timeout=timeout + 30)


# -- the spool ------------------------------------------------------------------------

def test_a_full_spool_disk_is_enospc_and_the_mount_keeps_serving(file_store, mount, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "base.raw", 2 * MiB, seed=1), "acme")
    spool = tmp_path / "small-spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(spool)], check=True)
    m = None
    try:
        m = mount(file_store, extra=config(tmp_path, spool_dir=str(spool)))
        big = make_file(tmp_path / "big.raw", 30 * MiB, seed=2)
        copy = subprocess.run(["cp", str(big), str(m / "inbox/acme/big.raw")],
                              capture_output=True, text=True)
        assert copy.returncode != 0 and "No space left on device" in copy.stderr
        report = m / "inbox/acme/big.raw.error"
        wait_for(report.exists, what="the report of the torn upload")
        assert "a write to it failed" in report.read_text()
        assert is_mounted(m.path) and m.process.poll() is None, "the daemon died"
        assert (m / f"by-id/{image_id}").read_bytes() == (tmp_path / "base.raw").read_bytes()
        small = make_file(tmp_path / "small.raw", MiB, seed=3)  # the space came back
        subprocess.run(["cp", str(small), str(m / "inbox/acme/small.raw")], check=True)
        assert inbox_wait(m / "inbox/acme/small.raw").returncode == 0
        assert "unexpected error" not in m.log()
    finally:
        if m is not None:
            m.stop()  # before the spool's filesystem goes
        subprocess.run(["umount", "-l", str(spool)], check=False)


# -- the catalog is never erased by accident ------------------------------------------

def test_an_empty_store_directory_never_erases_the_catalog(file_store, mount, tmp_path):
    ids = [file_store.create(make_file(tmp_path / f"{n}.raw", 64 * 1024, seed=n), "acme")
           for n in range(2)]
    store_dir = Path(file_store.url.removeprefix("file://"))
    cache = tmp_path / "cache-kept"
    m = mount(file_store, cache_dir=cache, extra=config(tmp_path, refresh_interval=0.5))
    assert sorted(os.listdir(m / "by-id")) == sorted(ids)
    store_dir.rename(tmp_path / "store-away")
    store_dir.mkdir()  # what an NFS share that is not mounted looks like
    time.sleep(2.5)  # several refreshes
    assert sorted(os.listdir(m / "by-id")) == sorted(ids)
    assert "lists no images and has no imagefs-catalog.msgpack" in m.log()
    m.stop()
    store_dir.rmdir()  # and now it is gone altogether
    again = mount(file_store, cache_dir=cache)
    assert "serving the cached catalog of 2 images" in again.log()
    assert sorted(os.listdir(again / "by-id")) == sorted(ids)
    again.stop()
    (tmp_path / "store-away").rename(store_dir)
    back = mount(file_store, cache_dir=cache, extra=config(tmp_path, refresh_interval=0.5))
    assert (back / f"by-id/{ids[0]}").read_bytes() == (tmp_path / "0.raw").read_bytes()
    for image_id in ids:  # a store that really is empty (its marker says so) empties it
        file_store.cli("image", "delete", "--now", image_id)
    wait_for(lambda: os.listdir(back / "by-id") == [], what="the deletions to show")


# -- a store that hangs ---------------------------------------------------------------

def test_a_hung_nfs_store_answers_in_time_and_recovers(file_store, mount, tmp_path):
    source = Path(file_store.url.removeprefix("file://"))
    warm_id = file_store.create(make_file(tmp_path / "warm.raw", 2 * MiB, seed=4), "acme")
    cold_id = file_store.create(make_file(tmp_path / "cold.raw", 2 * MiB, seed=5), "acme")
    share = tmp_path / "share"
    share.mkdir()
    nfs = subprocess.Popen([sys.executable, str(HERE / "passthroughfs.py"), str(source),
                            str(share)])
    try:
        wait_for(lambda: is_mounted(share), what="the passthrough share")
        via_share = StoreHandle("file", f"file://{share}")
        m = mount(via_share, extra=config(tmp_path, read_timeout=2.0))
        warm = (tmp_path / "warm.raw").read_bytes()
        assert (m / f"by-id/{warm_id}").read_bytes() == warm
        nfs.send_signal(signal.SIGSTOP)  # the server is gone: every access blocks
        start = time.monotonic()
        assert errno_of((m / f"by-id/{cold_id}").read_bytes) == errno.EIO
        assert time.monotonic() - start < 4.0
        assert (m / f"by-id/{warm_id}").read_bytes() == warm  # cached data is served
        assert sorted(os.listdir(m / "by-id")) == sorted([warm_id, cold_id])
        assert m.stats()["stuck_threads"] >= 1
        nfs.send_signal(signal.SIGCONT)
        time.sleep(2.1)  # the failed chunk's fail-fast window
        assert (m / f"by-id/{cold_id}").read_bytes() == (tmp_path / "cold.raw").read_bytes()
        wait_for(lambda: m.stats()["stuck_threads"] == 0, what="the stuck threads to return")
        m.stop()
    finally:
        nfs.send_signal(signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", str(share)], check=False)
        nfs.wait(timeout=10)


# -- outages --------------------------------------------------------------------------

def test_an_upload_made_during_an_outage_is_published_when_the_store_returns(
        s3_server, s3_store, mount, tmp_path):
    from urllib.parse import urlsplit

    from faultproxy import Fault, FaultProxy
    endpoint = urlsplit(s3_server.endpoint)
    with FaultProxy(endpoint.hostname, endpoint.port) as proxy:
        via = StoreHandle("s3", s3_store.url, {**s3_store.env,
                                               "AWS_ENDPOINT_URL": proxy.endpoint_url})
        m = mount(via, extra=config(tmp_path, read_timeout=2.0))
        outage = proxy.add(Fault("refuse", drop=True))
        src = make_file(tmp_path / "during.raw", 3 * MiB, seed=6)
        subprocess.run(["cp", str(src), str(m / "inbox/acme/during.raw")], check=True)
        time.sleep(3)
        status = os.getxattr(m / "inbox/acme/during.raw", "user.imagefs.status")
        assert status in (b"settling", b"inspecting", b"uploading")  # waiting, or retrying
        assert not (m / "inbox/acme/during.raw.error").exists()
        proxy.remove(outage)
        result = inbox_wait(m / "inbox/acme/during.raw", timeout=90)
        assert result.returncode == 0, (result.stdout, m.log()[-2000:])
        assert (m / f"by-id/{result.stdout.strip()}").read_bytes() == src.read_bytes()


def test_a_killed_daemon_leaves_a_mount_the_next_mount_cleans(file_store, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "k.raw", MiB, seed=7), "acme")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    args = ("mount", "--store", file_store.url, "--cache-dir", str(cache), str(mnt))
    run_cli(*args)
    try:
        pid = int((cache / "imagefs.lock").read_text().split()[2])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: errno_of(os.stat, mnt) == errno.ENOTCONN, what="a stale mount")
        again = run_cli(*args)
        assert "cleaned up the stale mount" in again.stderr
        assert (mnt / f"by-id/{image_id}").read_bytes() == (tmp_path / "k.raw").read_bytes()
    finally:
        run_cli("umount", str(mnt), check=False)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


# -- one daemon per cache dir ---------------------------------------------------------

def test_a_cache_dir_belongs_to_one_daemon(file_store, mount, tmp_path):
    cache = tmp_path / "one-cache"
    first = mount(file_store, cache_dir=cache)
    second = tmp_path / "second"
    second.mkdir()
    refused = run_cli("mount", "--store", file_store.url, "--cache-dir", str(cache),
                      str(second), check=False)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"cache dir {cache} is in use by imagefs pid" in refused.stderr
    assert f"mounted at {first.path}" in refused.stderr
    assert not is_mounted(second)
    assert os.listdir(first / "by-id") == []  # the first one is untouched


def test_two_mounts_of_one_store_without_cache_dir_are_refused(file_store, tmp_path):
    mounts = [tmp_path / "a", tmp_path / "b"]
    for path in mounts:
        path.mkdir()
    run_cli("mount", "--store", file_store.url, str(mounts[0]))
    try:
        refused = run_cli("mount", "--store", file_store.url, str(mounts[1]), check=False)
        assert refused.returncode == 1 and "is in use by imagefs pid" in refused.stderr
    finally:
        run_cli("umount", str(mounts[0]), check=False)
    shutil.rmtree(Settings(store=file_store.url).effective_cache_dir(), ignore_errors=True)


def test_a_shared_spool_dir_is_refused(file_store, mount, tmp_path):
    spool = tmp_path / "spool"
    mount(file_store, cache_dir=tmp_path / "c1", extra=config(tmp_path, spool_dir=str(spool)))
    other = tmp_path / "other"
    other.mkdir()
    refused = run_cli("mount", "--store", file_store.url, "--cache-dir", str(tmp_path / "c2"),
                      *config(tmp_path, spool_dir=str(spool)), str(other), check=False)
    assert refused.returncode == 1 and f"spool dir {spool} is in use" in refused.stderr


# -- concurrent edits -----------------------------------------------------------------

def test_concurrent_edits_from_two_hosts_lose_nothing(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "e.raw", 4096, seed=8), "acme",
                            "--name", "edited")
    hosts = [mount(store, cache_dir=tmp_path / f"cache-{n}") for n in range(2)]
    edits = 25
    failures: list[str] = []

    def edit(host: int) -> None:
        path = hosts[host] / f"by-id/{image_id}"
        for i in range(edits):
            try:
                os.setxattr(path, f"user.glance.host{host}_{i}", str(i).encode())
            except OSError as exc:
                failures.append(f"host {host} edit {i}: {exc}")

    threads = [threading.Thread(target=edit, args=(h,)) for h in range(2)]
    for t in threads:
        t.start()
    store.cli("image", "set", image_id, "--property", "from_cli=yes")  # a third writer
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    shown = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    missing = [f"host{h}_{i}" for h in range(2) for i in range(edits)
               if shown.get(f"host{h}_{i}") != str(i)]
    assert not missing, f"lost updates: {missing}"
    assert shown["from_cli"] == "yes"


# -- background tasks -----------------------------------------------------------------

FAILING_BACKGROUND = """
import imagefs.catalog as catalog, imagefs.cache as cache, imagefs.admin as admin
import imagefs.inbox.committer as committer
def failing(cls, name, times, skip=0):
    real, calls = getattr(cls, name), [0]
    def wrapper(self, *args, **kwargs):
        calls[0] += 1
        if skip < calls[0] <= skip + times:
            raise RuntimeError(f"injected failure in {name}")
        return real(self, *args, **kwargs)
    setattr(cls, name, wrapper)
failing(catalog.Catalog, "fetch_changes", 2, skip=1)  # the first is the mount's own
failing(cache.ChunkCache, "flush_touches", 2)
failing(cache.ChunkCache, "put", 2)
failing(admin.CatalogAdmin, "scrub", 2)
failing(committer.Committer, "_settled", 1)
"""


def test_background_tasks_survive_their_own_failures(file_store, mount, tmp_path):
    src = make_file(tmp_path / "b.raw", 9 * MiB, seed=9)
    image_id = file_store.create(src, "acme")
    m = mount(file_store, prelude=FAILING_BACKGROUND,
              extra=config(tmp_path, refresh_interval=0.3, delete_grace=0.5))
    m.tracebacks_expected = True
    assert (m / f"by-id/{image_id}").read_bytes() == src.read_bytes()  # the cache writes fail
    doomed = file_store.create(make_file(tmp_path / "d.raw", 4096, seed=10), "acme")
    wait_for(lambda: doomed in os.listdir(m / "by-id"), what="a refresh after failed ones")
    file_store.cli("image", "delete", doomed)
    new = make_file(tmp_path / "n.raw", MiB, seed=11)
    subprocess.run(["cp", str(new), str(m / "inbox/acme/n.raw")], check=True)
    assert inbox_wait(m / "inbox/acme/n.raw").returncode == 0  # the committer restarted
    wait_for(lambda: not any(doomed in o for o in _store_objects(file_store)),
             what="the scrubber to purge after failing")
    log = m.log()
    for name in ("fetch_changes", "flush_touches", "put", "scrub", "_settled"):
        assert f"injected failure in {name}" in log, name
    assert "inbox committer failed; restarting it" in log
    assert is_mounted(m.path) and m.process.poll() is None
    assert (m / f"by-id/{image_id}").read_bytes() == src.read_bytes()


def _store_objects(store) -> list[str]:  # type: ignore[no-untyped-def]
    root = Path(store.url.removeprefix("file://"))
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


# -- a damaged cache is a miss --------------------------------------------------------

def test_a_damaged_cache_is_refetched_or_rebuilt(file_store, mount, tmp_path):
    src = make_file(tmp_path / "c.raw", 3 * MiB, seed=12)
    image_id = file_store.create(src, "acme")
    cache = tmp_path / "damaged-cache"
    first = mount(file_store, cache_dir=cache)
    assert (first / f"by-id/{image_id}").read_bytes() == src.read_bytes()
    first.stop()
    env = lmdb.open(str(cache / "lmdb"), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        for key, value in list(txn.cursor(db=blocks)):
            txn.put(key, b"\0" * len(value), db=blocks)  # a block table gone bad
        chunks = env.open_db(b"chunks", txn=txn)
        for key, value in list(txn.cursor(db=chunks)):  # and its chunks: a refetch needs it
            txn.put(key, bytes([value[0] ^ 1]) + bytes(value[1:]), db=chunks)
        catalog = env.open_db(b"catalog", txn=txn)
        txn.put(b"not-a-row", b"\xc1garbage", db=catalog)  # a row that does not decode
    env.close()
    offline = Path(file_store.url.removeprefix("file://"))
    offline.rename(tmp_path / "away")  # the damaged rows must not stop an offline mount
    second = mount(file_store, cache_dir=cache)
    assert "dropping a damaged catalog row" in second.log()
    assert os.listdir(second / "by-id") == [image_id]
    second.stop()
    (tmp_path / "away").rename(offline)
    third = mount(file_store, cache_dir=cache)
    assert (third / f"by-id/{image_id}").read_bytes() == src.read_bytes()
    assert "cached block table of image" in third.log() and "damaged" in third.log()


# -- hostile names and bytes ----------------------------------------------------------

def test_undecodable_names_and_values_are_einval_and_harmless(file_store, mount, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "h.raw", 4096, seed=13), "acme")
    m = mount(file_store, extra=config(tmp_path))
    inbox = os.fsencode(m / "inbox/acme")
    assert errno_of(os.open, inbox + b"/bad\xff.raw", os.O_CREAT | os.O_WRONLY) == errno.EINVAL
    image = os.fsencode(m / f"by-id/{image_id}")
    assert errno_of(os.setxattr, image, b"user.glance.k\xfe", b"v") == errno.EINVAL
    assert errno_of(os.setxattr, image, b"user.glance.k", b"\xff\xfe") == errno.EINVAL
    assert errno_of(os.stat, os.fsencode(m / "projects/acme/private") + b"/\xff") == \
        errno.ENOENT
    (m / "inbox/acme/fine.raw").write_bytes(b"x" * 4096)
    assert errno_of(os.setxattr, os.fsencode(m / "inbox/acme/fine.raw"),
                    b"user.glance.p\xff", b"v") == errno.EINVAL
    assert errno_of(os.rename, m / "inbox/acme/fine.raw",
                    os.fsdecode(inbox + b"/re\xffnamed.raw")) == errno.EINVAL
    assert inbox_wait(m / "inbox/acme/fine.raw").returncode == 0
    assert "Traceback" not in m.log()
    assert json.loads(file_store.cli("image", "show", image_id, "--json").stdout)["id"] == \
        image_id


def test_a_spool_dir_others_use_is_refused_and_left_alone(file_store, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    (shared / "someone-elses-file").write_text("not imagefs's")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = run_cli("mount", "--store", file_store.url, "--cache-dir", str(tmp_path / "c"),
                      *config(tmp_path, spool_dir=str(shared)), str(mnt), check=False)
    assert refused.returncode == 1 and "is shared" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert shared.stat().st_mode & 0o7777 == 0o1777 and not is_mounted(mnt)
