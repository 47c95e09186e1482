"""Admin gestures on catalog files: rm, mv, setfattr; persistence; access; copies out."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_file, need

MiB = 1 << 20


def cfg(tmp_path: Path, **values) -> tuple[str, str]:
    path = tmp_path / f"g-{time.monotonic_ns()}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return ("--config", str(path))


def errno_of(call) -> int:
    with pytest.raises(OSError) as exc:
        call()
    return exc.value.errno


def show(store, image_id: str) -> dict:
    return json.loads(store.cli("image", "show", image_id, "--json").stdout)


def test_rm_is_a_delayed_delete_that_open_readers_survive(store, mount, tmp_path):
    src = make_file(tmp_path / "d.raw", 9 * MiB, seed=70)
    image_id = store.create(src, "acme", "--name", "d")
    keep = store.create(src, "acme", "--name", "keep", "--protected")
    m = mount(store, extra=cfg(tmp_path, refresh_interval=0.3))
    path = m / "projects/acme/private/d.raw"
    with open(path, "rb", buffering=0) as reader:
        head = reader.read(MiB)
        os.unlink(path)
        assert not path.exists() and not (m / f"by-id/{image_id}").exists()
        assert head + reader.read() == src.read_bytes()  # reads on to the end
    assert show(store, image_id)["status"] == "pending_delete"
    assert errno_of(lambda: os.unlink(m / "projects/acme/private/keep.raw")) == errno.EPERM
    assert (m / f"by-id/{keep}").exists()
    store.cli("image", "restore", image_id)
    deadline = time.monotonic() + 15
    while not (m / "projects/acme/private/d.raw").exists():
        assert time.monotonic() < deadline, "restored image never came back"
        time.sleep(0.1)
    assert (m / "projects/acme/private/d.raw").read_bytes() == src.read_bytes()


def test_scrubber_purges_after_the_grace_period(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "s.raw", MiB), "acme", "--name", "s")
    m = mount(store, extra=cfg(tmp_path, delete_grace=0.5, refresh_interval=0.3))
    os.unlink(m / "projects/acme/private/s.raw")
    deadline = time.monotonic() + 20
    while store.cli("image", "show", image_id, check=False).returncode == 0:
        assert time.monotonic() < deadline, "never purged"
        time.sleep(0.2)
    assert not store.has_object(f"data/{image_id}")


def test_rm_in_tags_only_removes_the_tag(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "t.raw", 4096), "acme", "--name", "t",
                            "--tag", "a", "--tag", "b")
    m = mount(store)
    os.unlink(m / "tags/a/t.raw")
    assert show(store, image_id)["tags"] == ["b"]
    assert (m / f"by-id/{image_id}").exists() and not (m / "tags/a").exists()
    assert os.listdir(m / "tags/b") == ["t.raw"]


def test_mv_renames_and_changes_visibility_never_replaces(store, mount, tmp_path):
    src = make_file(tmp_path / "m.raw", 4096)
    one = store.create(src, "acme", "--name", "one")
    two = store.create(src, "acme", "--name", "two")
    store.create(src, "beta", "--name", "other")
    m = mount(store)
    priv = m / "projects/acme/private"
    os.rename(priv / "one.raw", priv / "uno.raw")
    assert show(store, one)["name"] == "uno"
    assert sorted(os.listdir(priv)) == ["two.raw", "uno.raw"]
    assert errno_of(lambda: os.rename(priv / "uno.raw", priv / "two.raw")) == errno.EEXIST
    assert show(store, two)["name"] == "two"
    os.rename(priv / "uno.raw", m / "projects/acme/public/uno.raw")
    assert show(store, one)["visibility"] == "public"
    assert os.listdir(m / "public") == ["uno.raw"]
    subprocess.run(["mv", str(m / "public/uno.raw"), str(m / "public/eins.raw")], check=True)
    assert show(store, one)["name"] == "eins"
    for bad in [lambda: os.rename(priv / "two.raw", m / "projects/beta/private/two.raw"),
                lambda: os.rename(m / f"by-id/{two}", m / "by-id/x"),
                lambda: os.rename(priv / "two.raw", m / "public/two.raw"),
                lambda: os.rename(priv / "two.raw", m / "inbox/acme/two.raw")]:
        assert errno_of(bad) == errno.EPERM


def test_invitations_accept_with_mv_and_reject_with_rm(store, mount, tmp_path):
    src = make_file(tmp_path / "i.raw", 4096)
    first = store.create(src, "acme", "--name", "first", "--visibility", "shared")
    second = store.create(src, "acme", "--name", "second", "--visibility", "shared")
    for image_id in (first, second):
        store.cli("member", "add", image_id, "beta")
    m = mount(store)
    beta = m / "projects/beta"
    assert sorted(os.listdir(beta / "invitations")) == ["first.raw", "second.raw"]
    os.rename(beta / "invitations/first.raw", beta / "shared-with-me/first.raw")
    os.unlink(beta / "invitations/second.raw")
    assert os.listdir(beta / "shared-with-me") == ["first.raw"]
    assert os.listdir(beta / "invitations") == []
    assert show(store, second)["status"] == "active"  # rejecting is not deleting
    assert store.cli("member", "list", second).stdout.split() == ["beta", "rejected"]


def test_setfattr_edits_metadata_and_refuses_bad_values(store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "x.raw", 4096), "acme", "--name", "x")
    m = mount(store)
    path = m / f"by-id/{image_id}"
    edits = {"min_ram": b"2048", "min_disk": b"20", "protected": b"true", "os_hidden": b"true",
             "tags": b'["a","b"]', "hw_disk_bus": b"virtio", "name": b"renamed"}
    for key, value in edits.items():
        os.setxattr(path, f"user.glance.{key}", value)
    doc = show(store, image_id)
    assert (doc["min_ram"], doc["min_disk"], doc["protected"], doc["os_hidden"], doc["tags"],
            doc["hw_disk_bus"], doc["name"]) == (2048, 20, True, True, ["a", "b"], "virtio",
                                                  "renamed")
    assert os.getxattr(path, "user.glance.hw_disk_bus") == b"virtio"
    os.removexattr(path, "user.glance.hw_disk_bus")
    assert "hw_disk_bus" not in show(store, image_id)
    refusals = {
        errno.EPERM: [("setxattr", "id", b"x"), ("setxattr", "checksum", b"x"),
                      ("setxattr", "size", b"1"), ("setxattr", "status", b"active"),
                      ("removexattr", "name", None)],
        errno.EINVAL: [("setxattr", "min_ram", b"-1"), ("setxattr", "name", b"n" * 256),
                       ("setxattr", "tags", json.dumps([f"t{i}" for i in range(129)]).encode()),
                       ("setxattr", "visibility", b"everyone"), ("setxattr", "tags", b"nope"),
                       ("setxattr", "protected", b"maybe")],
        errno.ENODATA: [("removexattr", "never_set", None)],
        errno.ENOTSUP: [("setxattr", "trusted.x", b"1")],
    }
    for code, cases in refusals.items():
        for op, key, value in cases:
            name = key if "." in key else f"user.glance.{key}"
            if op == "setxattr":
                assert errno_of(lambda n=name, v=value: os.setxattr(path, n, v)) == code, key
            else:
                assert errno_of(lambda n=name: os.removexattr(path, n)) == code, key
    assert show(store, image_id)["min_ram"] == 2048


def test_changes_survive_a_remount(store, mount, tmp_path, mounts):
    image_id = store.create(make_file(tmp_path / "p.raw", 4096), "acme", "--name", "p")
    first = mount(store)
    os.rename(first / "projects/acme/private/p.raw", first / "projects/acme/community/q.raw")
    os.setxattr(first / f"by-id/{image_id}", "user.glance.os_distro", b"alpine")
    first.stop()
    second = mount(store, cache_dir=tmp_path / "fresh-cache")
    assert os.listdir(second / "projects/acme/community") == ["q.raw"]
    assert os.getxattr(second / "community/q.raw", "user.glance.os_distro") == b"alpine"


def test_tar_and_rsync_copies_keep_the_metadata(store, mount, tmp_path):
    need("rsync")
    src = make_file(tmp_path / "b.raw", 2 * MiB, seed=71)
    store.create(src, "acme", "--name", "b", "--property", "os_distro=arch", "--tag", "t")
    m = mount(store)
    archive = tmp_path / "images.tar"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "-cf", str(archive), "-C",
                    str(m / "projects/acme"), "private"], check=True)
    out = tmp_path / "untar"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "-xf", str(archive), "-C",
                    str(out)], check=True)
    copy = out / "private/b.raw"
    assert copy.read_bytes() == src.read_bytes()
    assert os.getxattr(copy, "user.glance.os_distro") == b"arch"
    subprocess.run(["rsync", "-aX", f"{m / 'projects/acme/private'}/", str(tmp_path / "rs")],
                   check=True)
    assert os.getxattr(tmp_path / "rs/b.raw", "user.glance.tags") == b'["t"]'
    assert (tmp_path / "rs/b.raw").read_bytes() == src.read_bytes()
    # a second rsync finds nothing to do: stable sizes and mtimes
    again = subprocess.run(["rsync", "-aXi", f"{m / 'projects/acme/private'}/",
                            str(tmp_path / "rs")], check=True, capture_output=True, text=True)
    assert again.stdout.strip() == ""


def test_other_users_may_read_but_not_change(world_dir, store, mount, tmp_path):
    image_id = store.create(make_file(tmp_path / "u.raw", 4096), "acme", "--name", "u")
    m = mount(store, root=world_dir, extra=("--allow-other", *cfg(tmp_path, projects=["acme"])))
    assert "every local user can read every image" in m.log()

    def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *command], capture_output=True, text=True)

    read = as_nobody("wc", "-c", str(m / "by-id" / image_id))
    assert read.stdout.split()[0] == "4096", read.stderr
    for command in [("cp", "/etc/hostname", str(m / "inbox/acme/x.raw")),
                    ("rm", "-f", str(m / "projects/acme/private/u.raw")),
                    ("setfattr", "-n", "user.glance.name", "-v", "x",
                     str(m / "by-id" / image_id)),
                    ("mv", str(m / "projects/acme/private/u.raw"),
                     str(m / "projects/acme/private/v.raw"))]:
        result = as_nobody(*command)
        assert result.returncode != 0 and "Permission denied" in result.stderr, \
            (command, result.stderr)
    assert show(store, image_id)["name"] == "u"
    assert os.listdir(m / "inbox/acme") == []
