"""The CLI and the mount as a new user meets them: typos, names, deletions, store init,
refusal reasons and cache warming (issue 9, "Docs and CLI, tried as a new user would")."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid

import pytest
from conftest import make_file, run_cli
from test_inbox import config, published

from imagefs.errors import ImageNotFound, NotPermitted
from imagefs.refusals import Refusals

MiB = 1 << 20
NO_CONFIG = {"IMAGEFS_CONFIG": "/dev/null"}


def test_a_mistyped_flag_is_named_alone_and_never_abbreviates(file_store):
    typo = run_cli("image", "show", "--stor", file_store.url, "some-id", check=False)
    assert typo.returncode == 2
    assert "unrecognized arguments: --stor (did you mean --store?)" in typo.stderr
    assert "some-id" not in typo.stderr and "usage: imagefs image show" in typo.stderr
    abbreviated = run_cli("image", "list", "--proj", "acme", "--store", file_store.url,
                          check=False)
    assert abbreviated.returncode == 2 and "--proj (did you mean --project?)" in abbreviated.stderr
    extra = run_cli("image", "show", "--store", file_store.url, "a", "b", check=False)
    assert "unrecognized arguments: b" in extra.stderr


def test_names_show_list_scrub_and_refusal_hints(file_store, tmp_path):
    src = make_file(tmp_path / "golden.img", 4096)
    golden = file_store.create(src, "acme")  # the name is the file name less .img
    twins = [file_store.create(src, "acme", "--name", "twin") for _ in range(2)]
    doc = json.loads(file_store.cli("image", "show", "golden", "--json").stdout)
    assert (doc["id"], doc["name"]) == (golden, "golden")
    ambiguous = file_store.cli("image", "show", "twin", check=False)
    assert ambiguous.returncode == 1 and all(i in ambiguous.stderr for i in twins)
    assert "no image with id or name 'nothing'" in \
        file_store.cli("image", "show", "nothing", check=False).stderr

    file_store.cli("image", "set", golden, "--protected")
    refused = file_store.cli("image", "delete", golden, check=False)
    assert f"imagefs image set --store {file_store.url} {golden} --unprotected" in \
        refused.stderr
    deleted = file_store.cli("image", "delete", twins[0])
    assert f"imagefs image restore --store {file_store.url} {twins[0]}" in deleted.stderr
    listed = file_store.cli("image", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(twins[0]))
    assert "pending_delete (deleted; purged after 20" in row
    assert "1 image is deleted (pending_delete)" in listed.stderr
    assert file_store.cli("image", "scrub").stdout.startswith("purged 0 deleted images")


def test_store_init_creates_the_bucket_the_error_names(s3_server, tmp_path):
    url = f"s3://t-{uuid.uuid4().hex[:12]}/imagefs"
    env = {**s3_server.environ(), **NO_CONFIG}
    src = make_file(tmp_path / "a.raw", 4096)
    missing = run_cli("image", "create", "--store", url, "--project", "p", str(src),
                      check=False, env=env)
    assert missing.returncode == 1 and "the bucket does not exist" in missing.stderr
    assert f"`imagefs store init --store {url}` creates and stamps it" in missing.stderr
    (tmp_path / "mnt").mkdir()
    mounting = run_cli("mount", "--store", url, "--cache-dir", str(tmp_path / "cache"),
                       str(tmp_path / "mnt"), check=False, env=env)
    assert mounting.returncode == 1 and "imagefs store init --store" in mounting.stderr
    first = run_cli("store", "init", "--store", url, env=env).stdout
    again = run_cli("store", "init", "--store", url, env=env).stdout
    assert f"{url}: created; catalog id " in first and f"{url}: exists; catalog id " in again
    assert first.split()[-1] == again.split()[-1]
    run_cli("image", "create", "--store", url, "--project", "p", str(src), env=env)


def test_refusals_are_kept_per_caller():
    refusals = Refusals(kept=2)
    refusals.note(0, [("public",)], "rm x.raw", NotPermitted("image x is protected"))
    refusals.note(0, [("tags", "a")], "ls", ImageNotFound("routine, never kept"))
    assert "rm x.raw: EPERM: image x is protected" in refusals.last(0, ("public",))
    assert refusals.last(0, ()) == refusals.last(0, ("public",))  # the root: the latest
    assert refusals.last(1000, ("public",)) is None and refusals.last(0, ("tags", "a")) is None
    refusals.note(0, [("community",)], "rm y.raw", NotPermitted("no"))
    assert refusals.last(0, ("public",)) is None  # the oldest went


def test_on_a_mount_names_refusals_and_cache_warm(world_dir, file_store, mount, tmp_path):
    keep = file_store.create(make_file(tmp_path / "k.raw", 4096), "acme", "--name", "keep",
                             "--protected")
    m = mount(file_store, root=world_dir, extra=("--allow-other", *config(tmp_path)))
    private = m / "projects/acme/private"
    # Inbox and mv follow one rule: the file name less a known disk-format extension.
    src = make_file(tmp_path / "golden.img", 12 * MiB, seed=5)
    shutil.copy(src, m / "inbox/acme/golden.img")
    image_id = published(m / "inbox/acme/golden.img")
    assert sorted(os.listdir(private)) == ["golden.raw", "keep.raw"]
    os.rename(private / "golden.raw", private / "silver.img")
    assert os.getxattr(private / "silver.raw", "user.glance.name") == b"silver"

    # A refusal says why, on the folder where it happened and on the root.
    with pytest.raises(OSError) as refused:
        os.unlink(private / "keep.raw")
    assert refused.value.errno == errno.EPERM
    reason = os.getxattr(private, "user.imagefs.last_error").decode()
    assert f"rm keep.raw: EPERM: image {keep} is protected" in reason and "--store" in reason
    assert os.getxattr(m.path, "user.imagefs.last_error").decode() == reason
    assert "user.imagefs.last_error" in os.listxattr(private)
    with pytest.raises(OSError):
        os.setxattr(m / f"by-id/{keep}", "user.glance.min_ram", b"-1")
    assert "EINVAL: min_ram" in os.getxattr(m.path, "user.imagefs.last_error").decode()
    assert os.getxattr(private, "user.imagefs.last_error").decode() == reason
    other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "getfattr", "-n", "user.imagefs.last_error", str(private)],
                           capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "No such attribute" in other.stderr, other

    # cache warm: one image named twice is read once, and cached when warm returns.
    warmed = run_cli("cache", "warm", str(m / f"by-id/{image_id}"), str(private / "silver.raw"))
    assert warmed.stdout.strip() == f"1 image cached, {12 * MiB} bytes read"
    assert m.stats()["cache_bytes"] >= 12 * MiB
