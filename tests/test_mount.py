"""Real mounts against file:// and a real SeaweedFS S3 server."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_file, need, run_cli

MiB = 1 << 20


def sha512(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            h.update(piece)
    return h.hexdigest()


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_bytes_through_the_mount_equal_the_upload(store, mount, tmp_path):
    src = make_file(tmp_path / "disk.raw", 9 * MiB + 12345, seed=1)
    image_id = store.create(src, "acme", "--name", "disk")
    m = mount(store)
    through = m / "projects/acme/private/disk.raw"
    assert sha512(through) == sha512(src)
    assert sha512(m / f"by-id/{image_id}") == sha512(src)
    data = src.read_bytes()
    rng = random.Random(7)
    fd = os.open(m / f"by-id/{image_id}", os.O_RDONLY | os.O_DIRECT)
    os.close(fd)  # O_DIRECT opens are accepted
    with open(through, "rb", buffering=0) as f:
        for _ in range(200):
            off = rng.randrange(0, len(data) + 100)
            size = rng.choice([1, 511, 4096, 65536, 300_000])
            f.seek(off)
            assert f.read(size) == data[off:off + size], f"wrong bytes at {off}+{size}"


def test_listings_names_and_collisions(store, mount, tmp_path):
    raw = make_file(tmp_path / "a.raw", 4096, seed=2)
    older = store.create(raw, "acme", "--name", "ubuntu", "--tag", "lts")
    time.sleep(0.01)
    newer = store.create(raw, "acme", "--name", "ubuntu", "--tag", "lts", "--tag", "x/y")
    pub = store.create(raw, "beta", "--name", "shared.raw", "--visibility", "public")
    com = store.create(raw, "beta", "--name", "comm", "--visibility", "community")
    hidden = store.create(raw, "beta", "--name", "hidden", "--visibility", "public")
    store.cli("image", "set", hidden, "--hidden")
    m = mount(store)
    assert sorted(os.listdir(m.path)) == ["by-id", "community", "inbox", "projects", "public",
                                          "tags"]
    assert sorted(os.listdir(m / "projects")) == ["acme", "beta"]
    assert sorted(os.listdir(m / "projects/acme")) == [
        "community", "invitations", "private", "public", "shared", "shared-with-me"]
    assert sorted(os.listdir(m / "projects/acme/private")) == sorted(
        ["ubuntu.raw", f"ubuntu~{older[:8]}.raw"])
    assert os.stat(m / "projects/acme/private/ubuntu.raw").st_ino == \
        os.stat(m / f"by-id/{newer}").st_ino
    assert os.listdir(m / "public") == ["shared.raw"]  # os_hidden: in no listing...
    assert os.listdir(m / "community") == ["comm.raw"]
    assert os.listdir(m / "projects/beta/community") == ["comm.raw"]
    assert sorted(os.listdir(m / "by-id")) == sorted([older, newer, pub, com])
    assert os.path.getsize(m / f"by-id/{hidden}") == 4096  # ...but reachable by id
    assert sorted(os.listdir(m / "tags")) == ["lts", "x_y"]
    assert sorted(os.listdir(m / "tags/lts")) == sorted(["ubuntu.raw", f"ubuntu~{older[:8]}.raw"])
    assert os.listdir(m / "tags/x_y") == ["ubuntu.raw"]
    for missing in ("nope", "projects/zeta", "projects/acme/private/nope.raw", "by-id/123",
                    "tags/none"):
        with pytest.raises(FileNotFoundError):
            os.stat(m / missing)


def test_attributes_and_xattrs(store, mount, tmp_path):
    src = make_file(tmp_path / "x.raw", 3 * MiB, seed=3)
    image_id = store.create(src, "acme", "--name", "x", "--tag", "a", "--property",
                            "os_distro=ubuntu", "--min-ram", "512")
    shown = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    m = mount(store)
    path = m / "projects/acme/private/x.raw"
    st = os.stat(path)
    assert st.st_size == 3 * MiB
    assert oct(st.st_mode & 0o777) == "0o644"
    from datetime import datetime
    created = datetime.fromisoformat(shown["created_at"].replace("Z", "+00:00")).timestamp()
    assert abs(st.st_mtime - created) < 1
    names = {n for n in os.listxattr(path)}
    expected = {f"user.glance.{k}" for k, v in shown.items()
                if v is not None and k not in ("self", "file", "schema")}
    assert names == expected
    assert os.getxattr(path, "user.glance.os_distro") == b"ubuntu"
    assert os.getxattr(path, "user.glance.min_ram") == b"512"
    assert os.getxattr(path, "user.glance.protected") == b"false"
    assert json.loads(os.getxattr(path, "user.glance.tags")) == ["a"]
    assert os.getxattr(path, "user.glance.checksum").decode() == \
        hashlib.md5(src.read_bytes()).hexdigest()
    assert os.getxattr(path, "user.glance.os_hash_value").decode() == sha512(src)
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.glance.virtual_size_missing")
    assert exc.value.errno == errno.ENODATA
    for foreign in ("security.selinux", "system.posix_acl_access", "trusted.glance.tags"):
        with pytest.raises(OSError) as exc:  # what ls -l asks: answered by the fast path
            os.getxattr(path, foreign)
        assert exc.value.errno in (errno.ENODATA, errno.EOPNOTSUPP), foreign


def test_inodes_stable_across_remounts(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "s.raw", 4096), "acme")
    first = mount(store)
    ino = os.stat(first / f"by-id/{image_id}").st_ino
    dir_ino = os.stat(first / "projects/acme/private").st_ino
    second = mount(store, cache_dir=tmp_path / "other-cache")
    assert os.stat(second / f"by-id/{image_id}").st_ino == ino
    assert os.stat(second / "projects/acme/private/s.raw").st_ino == ino
    assert os.stat(second / "projects/acme/private").st_ino == dir_ino


def test_only_touched_chunks_are_fetched(store, mount, tmp_path):
    src = make_file(tmp_path / "big.raw", 64 * MiB, seed=4)
    image_id = store.create(src, "acme")
    m = mount(store)
    served_before = store.server.s3_counters() if store.server else None
    with open(m / f"by-id/{image_id}", "rb", buffering=0) as f:
        f.seek(20 * MiB + 100)
        assert f.read(MiB) == src.read_bytes()[20 * MiB + 100:21 * MiB + 100]
    stats = m.stats()
    # 1 MiB inside one 4 MiB chunk; prefetch looks only about 1 MiB further.
    assert stats["store_bytes"] <= 8 * MiB, stats
    if store.server:
        after = store.server.s3_counters()
        assert after["get_bytes"] - served_before["get_bytes"] <= 9 * MiB


def test_second_pass_comes_from_cache_even_offline(store, mount, tmp_path):
    src = make_file(tmp_path / "c.raw", 10 * MiB, seed=5)
    image_id = store.create(src, "acme", "--name", "c")
    cache_dir = tmp_path / "shared-cache"
    first = mount(store, cache_dir=cache_dir)
    warmed = run_cli("cache", "warm", str(first / f"by-id/{image_id}"))
    assert f"1 image cached, {10 * MiB} bytes read" in warmed.stdout
    first.stop()
    offline_env = {}
    if store.kind == "file":  # the store's directory is gone, e.g. its NFS share is down
        os.rename(store.url.removeprefix("file://"), tmp_path / "moved-away")
    else:  # nothing listens on the endpoint
        offline_env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    second = mount(store, cache_dir=cache_dir, env=offline_env)
    assert "serving the cached catalog" in second.log()
    assert sha512(second / "projects/acme/private/c.raw") == sha512(src)
    assert second.stats()["store_requests"] == 0
    assert os.listdir(second / "by-id") == [image_id]


def test_corrupted_object_gives_eio_not_wrong_bytes(store, mount, tmp_path, mounts):
    good = make_file(tmp_path / "good.raw", 5 * MiB, seed=6)
    bad = make_file(tmp_path / "bad.raw", 5 * MiB, seed=7)
    good_id = store.create(good, "acme", "--name", "good")
    bad_id = store.create(bad, "acme", "--name", "bad")
    data = bytearray(store.read_object(f"data/{bad_id}"))
    data[4 * MiB + 10] ^= 0x01  # one bit in the second chunk
    store.write_object(f"data/{bad_id}", bytes(data))
    m = mount(store)
    with open(m / f"by-id/{bad_id}", "rb", buffering=0) as f:
        assert f.read(4096) == bad.read_bytes()[:4096]  # the first chunk is intact
        f.seek(4 * MiB)
        with pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO
    assert sha512(m / f"by-id/{good_id}") == sha512(good)
    assert "does not match the hash recorded at upload" in m.log()
    assert m.stats()["corrupt_chunks"] >= 1


def test_qemu_img_reads_a_qcow2_through_the_mount(store, mount, tmp_path):
    need("qemu-img")
    raw = make_file(tmp_path / "base.raw", 8 * MiB, seed=8)
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    image_id = store.create(qcow, "acme", "--name", "disk")
    shown = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert shown["disk_format"] == "qcow2" and shown["virtual_size"] == 8 * MiB
    m = mount(store)
    path = m / "projects/acme/private/disk.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * MiB
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)],
                   check=True, capture_output=True)
    # a qcow2 overlay whose backing file lives on the mount, by-id as the docs advise
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(m / f"by-id/{image_id}"), str(overlay)], check=True)
    subprocess.run(["qemu-img", "compare", str(overlay), str(raw)], check=True,
                   capture_output=True)


def test_data_is_read_only_and_structure_fixed(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "r.raw", 4096), "acme")
    m = mount(store)
    path = m / f"by-id/{image_id}"
    attempts = {
        errno.EROFS: [lambda: open(path, "r+b"), lambda: open(m / "public/new.raw", "wb"),
                      lambda: os.truncate(path, 0)],
        errno.EPERM: [lambda: os.mkdir(m / "public/dir"), lambda: os.chmod(path, 0o600),
                      lambda: os.chown(path, 1000, 1000), lambda: os.link(path, m / "x"),
                      lambda: os.symlink("x", m / "public/l"), lambda: os.utime(path, (1, 1)),
                      lambda: os.rmdir(m / "public"),
                      lambda: os.rename(path, m / f"by-id/{image_id[:8]}")],
    }
    for code, calls in attempts.items():
        for attempt in calls:
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == code, (exc.value, code)


def test_mount_picks_up_catalog_changes(store, mount, tmp_path):
    src = make_file(tmp_path / "n.raw", 4096)
    m = mount(store, extra=("--config", str(_config(tmp_path, refresh_interval=0.5))))
    assert os.listdir(m / "by-id") == []
    image_id = store.create(src, "acme", "--name", "n")
    wait_for(lambda: os.path.exists(m / "projects/acme/private/n.raw"), what="new image")
    store.cli("image", "set", image_id, "--name", "renamed", "--visibility", "public",
              "--tag", "fresh")
    wait_for(lambda: os.path.exists(m / "public/renamed.raw"), what="renamed image")
    assert os.listdir(m / "tags/fresh") == ["renamed.raw"]
    assert os.getxattr(m / f"by-id/{image_id}", "user.glance.name") == b"renamed"
    store.cli("image", "delete", image_id)
    wait_for(lambda: not os.path.exists(m / f"by-id/{image_id}"), what="deletion")


def _config(tmp_path: Path, **values) -> Path:
    path = tmp_path / "imagefs.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_sigterm_unmounts_cleanly(store, mount, tmp_path):
    m = mount(store)
    m.process.send_signal(signal.SIGTERM)
    assert m.process.wait(timeout=15) == 0
    assert not os.path.ismount(m.path)
    assert "unmounted" in m.log()


def test_daemon_mode_and_umount(store, tmp_path):
    image_id = store.create(make_file(tmp_path / "d.raw", 4096), "acme")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    try:
        run_cli("mount", "--store", store.url, "--cache-dir", str(cache), str(mnt),
                env=store.env, timeout=60)
        assert os.path.exists(mnt / f"by-id/{image_id}")  # ready when the command returns
        again = run_cli("mount", "--store", store.url, str(mnt), check=False, env=store.env)
        assert again.returncode == 1 and "already a mountpoint" in again.stderr
        run_cli("umount", str(mnt))
        assert not os.path.ismount(mnt)
        assert "mounted" in (cache / "imagefs.log").read_text()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_mount_errors_are_one_clear_line(file_store, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        (["--store", file_store.url, str(tmp_path / "missing")], "does not exist"),
        (["--store", file_store.url, str(full)], "not empty"),
        (["--store", "ftp://x/y", str(tmp_path / "empty")], "unknown store scheme"),
        (["--store", f"file://{tmp_path}/no-store", "--cache-dir", str(tmp_path / "c"),
          str(tmp_path / "empty")], "does not exist"),
        (["--store", file_store.url, "--cache-size", "lots", str(tmp_path / "empty")],
         "invalid size"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        result = run_cli("mount", *args, check=False)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unhandled_exception_in_a_handler_is_eio_and_the_mount_lives(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "e.raw", 4096), "acme")
    m = mount(store, prelude="import imagefs.records as r\n"
                             "def boom(self): raise RuntimeError('injected fault')\n"
                             "r.ImageRecord.metadata_items = boom")
    m.tracebacks_expected = True
    with pytest.raises(OSError) as exc:
        os.getxattr(m / f"by-id/{image_id}", "user.glance.name")
    assert exc.value.errno == errno.EIO
    assert "Traceback" in m.log()
    assert os.path.getsize(m / f"by-id/{image_id}") == 4096


def test_members_show_as_invitations_then_shared_with_me(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "s.raw", 4096), "acme", "--name", "gold",
                            "--visibility", "shared")
    refused = store.cli("member", "add", store.create(tmp_path / "s.raw", "acme"), "beta",
                        check=False)
    assert refused.returncode == 1 and "only shared images" in refused.stderr
    store.cli("member", "add", image_id, "beta")
    store.cli("member", "add", image_id, "gamma")
    store.cli("member", "set", image_id, "gamma", "accepted")
    assert store.cli("member", "list", image_id).stdout.split() == [
        "beta", "pending", "gamma", "accepted"]
    m = mount(store)
    assert os.listdir(m / "projects/acme/shared") == ["gold.raw"]
    assert os.listdir(m / "projects/beta/invitations") == ["gold.raw"]
    assert os.listdir(m / "projects/beta/shared-with-me") == []
    assert os.listdir(m / "projects/gamma/shared-with-me") == ["gold.raw"]
    assert os.listdir(m / "projects/gamma/invitations") == []


def test_a_damaged_cache_entry_is_refetched_not_returned(file_store, mount, tmp_path):
    import lmdb
    src = make_file(tmp_path / "k.raw", 6 * MiB, seed=9)
    image_id = file_store.create(src, "acme")
    cache_dir = tmp_path / "cache-damaged"
    first = mount(file_store, cache_dir=cache_dir)
    assert sha512(first / f"by-id/{image_id}") == sha512(src)
    first.stop()
    env = lmdb.open(str(cache_dir / "lmdb"), max_dbs=16, map_size=1 << 30)
    chunks = env.open_db(b"chunks")
    with env.begin(write=True, db=chunks) as txn:
        for key, value in list(txn.cursor()):
            damaged = bytearray(value)
            damaged[(1 << 20) + 100] ^= 0xFF  # in the second block
            txn.put(key, bytes(damaged))
    env.close()
    second = mount(file_store, cache_dir=cache_dir)
    with open(second / f"by-id/{image_id}", "rb", buffering=0) as f:
        f.seek((1 << 20) + 50)
        assert f.read(4096) == src.read_bytes()[(1 << 20) + 50:(1 << 20) + 4146]
    stats = second.stats()
    assert stats["damaged_cache_entries"] >= 1 and stats["store_requests"] >= 1
    assert "failed its page checksums" in second.log()
    assert sha512(second / f"by-id/{image_id}") == sha512(src)


def test_sequential_readers_send_the_configured_readahead(file_store, mount, tmp_path):
    """read_ahead = 1M reaches the kernel (it is set after FUSE's INIT, which resets it):
    a buffered sequential read arrives as 1 MiB requests, not 128 KiB ones."""
    src = make_file(tmp_path / "ra.raw", 16 * MiB, seed=21)
    image_id = file_store.create(src, "acme")
    m = mount(file_store)
    device = next(line.split()[2] for line in open("/proc/self/mountinfo")
                  if line.split()[4] == os.path.realpath(m.path))
    bdi = Path("/sys/class/bdi", device, "read_ahead_kb")
    deadline = time.monotonic() + 10
    while bdi.read_text().strip() != "1024" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bdi.read_text().strip() == "1024", m.log()
    before = m.stats()
    assert (m / f"by-id/{image_id}").read_bytes() == src.read_bytes()
    after = m.stats()
    reads = after["reads"] - before["reads"]
    assert (after["read_bytes"] - before["read_bytes"]) / reads > 512 << 10, reads
