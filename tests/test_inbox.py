"""Inbox uploads on real mounts: cp, qemu-img convert and rsync in; safety; crashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import make_file, need, run_cli

MiB = 1 << 20


def config(tmp_path: Path, **values) -> tuple[str, str]:
    path = tmp_path / f"imagefs-{len(list(tmp_path.glob('imagefs-*.toml')))}.toml"
    values.setdefault("settle_time", 0.3)
    values.setdefault("projects", ["acme"])
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return ("--config", str(path))


def wait(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli("inbox", "wait", str(path), "--timeout", str(timeout), check=False,
                   timeout=timeout + 30)


def published(path: Path) -> str:
    result = wait(path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout.strip()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    need("qemu-img")
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_cp_publishes_with_format_size_and_checksums(store, mount, tmp_path):
    raw = make_file(tmp_path / "src.raw", 6 * MiB + 512, seed=31)
    qcow = tmp_path / "ubuntu.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    m = mount(store, extra=config(tmp_path))
    target = m / "inbox/acme/ubuntu.qcow2"
    subprocess.run(["cp", str(qcow), str(target)], check=True)
    assert os.getxattr(target, "user.imagefs.status").decode() in (
        "settling", "inspecting", "uploading")
    image_id = published(target)
    assert not target.exists()
    image = m / "projects/acme/private/ubuntu.qcow2"
    assert os.getxattr(image, "user.glance.id").decode() == image_id
    assert os.getxattr(image, "user.glance.disk_format") == b"qcow2"
    assert os.getxattr(image, "user.glance.container_format") == b"bare"
    assert int(os.getxattr(image, "user.glance.virtual_size")) == 6 * MiB + 512
    assert os.getxattr(image, "user.glance.checksum").decode() == md5(qcow)
    assert os.getxattr(image, "user.glance.os_hash_value").decode() == \
        hashlib.sha512(qcow.read_bytes()).hexdigest()
    assert image.read_bytes() == qcow.read_bytes()
    shown = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert shown["owner"] == "acme" and shown["visibility"] == "private"
    assert shown["name"] == "ubuntu"  # the file name less its disk-format extension


@pytest.mark.parametrize("fmt, make", [
    ("raw", lambda raw, out: out.write_bytes(raw.read_bytes())),
    ("vmdk", lambda raw, out: qemu_img("convert", "-O", "vmdk", "-o",
                                       "subformat=streamOptimized", str(raw), str(out))),
    ("vhd", lambda raw, out: qemu_img("convert", "-O", "vpc", str(raw), str(out))),
    ("vhdx", lambda raw, out: qemu_img("convert", "-O", "vhdx", str(raw), str(out))),
])
def test_formats_through_the_inbox(file_store, mount, tmp_path, fmt, make):
    raw = make_file(tmp_path / "src.raw", 4 * MiB, seed=32)
    src = tmp_path / f"disk.{fmt}"
    make(raw, src)
    m = mount(file_store, extra=config(tmp_path))
    subprocess.run(["cp", str(src), str(m / f"inbox/acme/disk.{fmt}")], check=True)
    image_id = published(m / f"inbox/acme/disk.{fmt}")
    doc = json.loads(file_store.cli("image", "show", image_id, "--json").stdout)
    assert doc["disk_format"] == fmt and doc["checksum"] == md5(src)
    assert doc["virtual_size"] >= 4 * MiB


def test_iso_through_the_inbox(file_store, mount, tmp_path):
    need("xorriso")
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd/readme.txt").write_text("hi")
    iso = tmp_path / "cd.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(tmp_path / "cd")],
                   check=True, capture_output=True)
    m = mount(file_store, extra=config(tmp_path))
    subprocess.run(["cp", str(iso), str(m / "inbox/acme/")], check=True)
    image_id = published(m / "inbox/acme/cd.iso")
    assert os.getxattr(m / f"by-id/{image_id}", "user.glance.disk_format") == b"iso"


def test_qemu_img_convert_and_rsync_straight_into_the_inbox(store, mount, tmp_path):
    need("rsync")
    raw = make_file(tmp_path / "disk.raw", 12 * MiB, seed=33)
    m = mount(store, extra=config(tmp_path))
    target = m / "inbox/acme/staging-v2.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(target))
    image_id = published(target)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                    str(m / f"by-id/{image_id}"), str(raw)], check=True, capture_output=True)

    subprocess.run(["rsync", "-a", str(raw), str(m / "inbox/acme/synced.raw")], check=True)
    synced = published(m / "inbox/acme/synced.raw")
    assert md5(m / f"by-id/{synced}") == md5(raw)
    assert sorted(os.listdir(m / "projects/acme/private")) == ["staging-v2.qcow2", "synced.raw"]


@pytest.mark.parametrize("case", ["backing", "data_file", "vmdk_extent", "qed"])
def test_unsafe_files_leave_an_error_and_no_image(store, mount, tmp_path, case):
    bad = tmp_path / f"bad-{case}"
    if case == "backing":
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(bad))
    elif case == "data_file":
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.bin'}", str(bad),
                 "1M")
    elif case == "qed":
        qemu_img("create", "-f", "qed", str(bad), "1M")
    else:  # a monolithicFlat descriptor whose extent names a host file
        bad.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                       'createType="monolithicFlat"\n\n# Extent description\n'
                       'RW 2048 FLAT "/etc/shadow" 0\n\n# The Disk Data Base\n'
                       'ddb.virtualHWVersion = "4"\n')
    m = mount(store, extra=config(tmp_path))
    target = m / f"inbox/acme/{bad.name}"
    subprocess.run(["cp", str(bad), str(target)], check=True)
    result = wait(target)
    assert result.returncode == 1, result
    report = (m / f"inbox/acme/{bad.name}.error").read_text()
    assert "was not published" in report and "rm this .error file" in report
    assert result.stdout == report
    assert os.listdir(m / "by-id") == []
    assert json.loads(store.cli("image", "list", "--json").stdout) == []
    os.unlink(m / f"inbox/acme/{bad.name}.error")
    assert os.listdir(m / "inbox/acme") == []


def test_temporary_names_and_empty_files_are_never_committed(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path))
    src = make_file(tmp_path / "x.raw", 64 * 1024)
    names = [".hidden.raw", "x.raw.part", "x.tmp", "x.raw~"]
    for name in names:
        subprocess.run(["cp", str(src), str(m / f"inbox/acme/{name}")], check=True)
    (m / "inbox/acme/empty.raw").touch()
    time.sleep(1.5)
    assert sorted(os.listdir(m / "inbox/acme")) == sorted(names + ["empty.raw"])
    assert os.listdir(m / "by-id") == []
    # finishing with a rename publishes: the race-free way to upload with metadata
    os.setxattr(m / "inbox/acme/x.raw.part", "user.glance.visibility", b"public")
    os.rename(m / "inbox/acme/x.raw.part", m / "inbox/acme/final.raw")
    published(m / "inbox/acme/final.raw")
    assert os.listdir(m / "public") == ["final.raw"]


def test_metadata_written_before_the_data(store, mount, tmp_path):
    m = mount(store, extra=config(tmp_path))
    target = m / "inbox/acme/golden.img"
    target.touch()  # empty files wait forever, so the metadata cannot race the commit
    for key, value in [("disk_format", "raw"), ("visibility", "community"), ("name", "golden"),
                       ("tags", '["base","v2"]'), ("os_distro", "debian"), ("min_ram", "512"),
                       ("protected", "true")]:
        os.setxattr(target, f"user.glance.{key}", value.encode())
    assert os.getxattr(target, "user.glance.os_distro") == b"debian"
    with pytest.raises(OSError) as exc:
        os.setxattr(target, "user.glance.checksum", b"abc")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        os.setxattr(target, "user.glance.min_ram", b"-1")
    assert exc.value.errno == errno.EINVAL
    src = make_file(tmp_path / "g.raw", MiB, seed=34)
    subprocess.run(["cp", str(src), str(target)], check=True)
    image_id = published(target)
    doc = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert (doc["name"], doc["visibility"], doc["tags"], doc["os_distro"], doc["min_ram"],
            doc["protected"], doc["disk_format"]) == (
        "golden", "community", ["base", "v2"], "debian", 512, True, "raw")
    assert os.listdir(m / "community") == ["golden.raw"]


def test_declared_format_mismatch_is_rejected(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path))
    target = m / "inbox/acme/notqcow.img"
    target.touch()
    os.setxattr(target, "user.glance.disk_format", b"qcow2")
    subprocess.run(["cp", str(make_file(tmp_path / "r.raw", MiB)), str(target)], check=True)
    result = wait(target)
    assert result.returncode == 1 and "does not match" in result.stdout


def test_concurrent_uploads(store, mount, tmp_path):
    m = mount(store, extra=config(tmp_path))
    sources = [make_file(tmp_path / f"c{i}.raw", (3 + i) * MiB, seed=40 + i) for i in range(4)]
    threads = [threading.Thread(target=subprocess.run,
                                args=(["cp", str(s), str(m / f"inbox/acme/{s.name}")],),
                                kwargs={"check": True}) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for src in sources:
        image_id = published(m / f"inbox/acme/{src.name}")
        assert md5(m / f"by-id/{image_id}") == md5(src)


def test_staging_full_is_enospc_and_loses_nothing(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path, spool_size="6M", settle_time=30.0))
    small = make_file(tmp_path / "small.raw", 2 * MiB, seed=50)
    big = make_file(tmp_path / "big.raw", 5 * MiB, seed=51)
    subprocess.run(["cp", str(small), str(m / "inbox/acme/small.raw")], check=True)
    result = subprocess.run(["cp", str(big), str(m / "inbox/acme/big.raw")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert md5(m / "inbox/acme/small.raw") == md5(small)  # the earlier file is intact
    os.unlink(m / "inbox/acme/big.raw")
    subprocess.run(["cp", str(make_file(tmp_path / "fits.raw", 3 * MiB)),
                    str(m / "inbox/acme/fits.raw")], check=True)


def test_writes_at_any_offset_truncate_fsync_read_back(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path, settle_time=30.0))
    path = m / "inbox/acme/rw.raw"
    with open(path, "w+b") as f:
        f.seek(3 * MiB)
        f.write(b"tail")
        f.seek(0)
        f.write(b"head")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read(4) == b"head"
        f.seek(3 * MiB)
        assert f.read() == b"tail"
        f.truncate(MiB)
    assert path.stat().st_size == MiB
    with open(path, "rb") as f:
        assert f.read(4) == b"head" and f.read(10) == b"\0" * 10
    os.rename(path, m / "inbox/acme/moved.raw")
    assert os.listdir(m / "inbox/acme") == ["moved.raw"]
    fd = os.open(m / "inbox/acme/moved.raw", os.O_WRONLY)
    os.unlink(m / "inbox/acme/moved.raw")  # unlink before close: nothing is committed
    os.write(fd, b"more")
    os.close(fd)
    assert os.listdir(m / "inbox/acme") == []


def test_new_project_inbox_with_mkdir(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path, projects=[]))
    assert os.listdir(m / "inbox") == []
    os.mkdir(m / "inbox/newco")
    subprocess.run(["cp", str(make_file(tmp_path / "n.raw", MiB)), str(m / "inbox/newco/")],
                   check=True)
    published(m / "inbox/newco/n.raw")
    assert os.listdir(m / "projects/newco/private") == ["n.raw"]
    with pytest.raises(OSError) as exc:
        os.mkdir(m / "inbox/bad name")
    assert exc.value.errno == errno.EINVAL


def test_kill_9_mid_upload_then_remount_publishes(store, mount, tmp_path):
    src = make_file(tmp_path / "big.raw", 160 * MiB, seed=60)
    cache = tmp_path / "cache-kill"
    first = mount(store, cache_dir=cache, extra=config(tmp_path, settle_time=0.2))
    target = first / "inbox/acme/big.raw"
    subprocess.run(["cp", str(src), str(target)], check=True)
    deadline = time.monotonic() + 30
    while os.getxattr(target, "user.imagefs.status") not in (b"inspecting", b"uploading"):
        assert time.monotonic() < deadline, "upload never started"
        time.sleep(0.01)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    first.stop()  # lazy-unmounts the dead mount
    assert json.loads(store.cli("image", "list", "--json").stdout) == [], \
        "a half-uploaded image became visible"
    second = mount(store, cache_dir=cache, extra=config(tmp_path, settle_time=0.2))
    image_id = published(second / "inbox/acme/big.raw", )
    assert "resuming 1 entries" in second.log()
    assert md5(second / f"by-id/{image_id}") == md5(src)
    assert os.listdir(second / "inbox/acme") == []


def _store_bytes(store, image_id: str) -> int:
    """Data of `image_id` the store holds so far, committed or still being written."""
    if store.kind == "file":
        return sum(p.stat().st_size for p in store.object_path("data").glob(f"{image_id}*"))
    return store.server.s3_counters(bucket=store.bucket)["put_bytes"]


def test_in_order_writes_upload_while_the_file_is_written(store, mount, tmp_path):
    m = mount(store, extra=config(tmp_path))
    target = m / "inbox/acme/streamed.raw"
    data = make_file(tmp_path / "s.raw", 48 * MiB, seed=61).read_bytes()
    with open(target, "wb") as f:
        image_id = os.getxattr(target, "user.imagefs.id").decode()
        f.write(data[:40 * MiB])
        f.flush()
        deadline = time.monotonic() + 20
        while _store_bytes(store, image_id) < 16 * MiB:  # uploaded while still open
            assert time.monotonic() < deadline, "nothing uploaded while writing"
            time.sleep(0.1)
        assert os.getxattr(target, "user.imagefs.status") == b"writing"
        f.write(data[40 * MiB:])
    assert published(target) == image_id
    assert hashlib.md5(data).hexdigest() == \
        os.getxattr(m / f"by-id/{image_id}", "user.glance.checksum").decode()
    assert (m / f"by-id/{image_id}").read_bytes() == data


def test_a_transient_store_failure_is_retried(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path), prelude=(
        "import imagefs.inbox.committer as inbox\n"
        "from imagefs.errors import StoreUnavailable\n"
        "real, calls = inbox.publish, []\n"
        "def flaky(*args):\n"
        "    calls.append(1)\n"
        "    if len(calls) < 3: raise StoreUnavailable('injected outage')\n"
        "    return real(*args)\n"
        "inbox.publish = flaky"))
    src = make_file(tmp_path / "r.raw", 2 * MiB, seed=62)
    subprocess.run(["cp", str(src), str(m / "inbox/acme/r.raw")], check=True)
    image_id = published(m / "inbox/acme/r.raw")
    assert md5(m / f"by-id/{image_id}") == md5(src)
    assert m.log().count("injected outage") == 2 and "retrying in" in m.log()


def test_a_file_torn_by_a_crash_is_reported_not_published(store, mount, tmp_path):
    cache = tmp_path / "cache-torn"
    first = mount(store, cache_dir=cache, extra=config(tmp_path))
    fd = os.open(first / "inbox/acme/torn.raw", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, os.urandom(3 * MiB))
    first.process.send_signal(signal.SIGKILL)  # the writer still has it open
    first.process.wait(timeout=10)
    try:
        os.close(fd)
    except OSError:
        pass
    first.stop()
    second = mount(store, cache_dir=cache, extra=config(tmp_path))
    result = wait(second / "inbox/acme/torn.raw")
    assert result.returncode == 1 and "daemon stopped while the file was being written" in \
        result.stdout
    assert os.listdir(second / "by-id") == []


def test_a_failed_write_is_reported_not_published(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path, spool_size="4M"))
    target = m / "inbox/acme/big.raw"
    result = subprocess.run(["cp", str(make_file(tmp_path / "b.raw", 6 * MiB)), str(target)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    report = wait(target)
    assert report.returncode == 1 and "staging area is full" in report.stdout
    assert os.listdir(m / "by-id") == []
    # the space is free again, and a rejected name can be used again
    subprocess.run(["cp", str(make_file(tmp_path / "ok.raw", 3 * MiB)), str(target)],
                   check=True)
    published(target)


def test_unlinked_open_files_give_their_space_back(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path, spool_size="8M"))
    with open(m / "inbox/acme/gone.raw", "wb") as f:
        os.unlink(m / "inbox/acme/gone.raw")
        f.write(os.urandom(6 * MiB))  # still counted while it is open...
    src = make_file(tmp_path / "fits.raw", 7 * MiB)  # ...and released at close
    subprocess.run(["cp", str(src), str(m / "inbox/acme/fits.raw")], check=True)
    published(m / "inbox/acme/fits.raw")


def test_one_report_per_name(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path))
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qed", str(bad), "1M")
    for _ in range(2):
        subprocess.run(["cp", str(bad), str(m / "inbox/acme/bad.qcow2")], check=True)
        assert wait(m / "inbox/acme/bad.qcow2").returncode == 1
    assert os.listdir(m / "inbox/acme") == ["bad.qcow2.error"]
    os.unlink(m / "inbox/acme/bad.qcow2.error")
    assert os.listdir(m / "inbox/acme") == []
