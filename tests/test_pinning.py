"""Pinned golden images on real mounts: `imagefs cache pin|unpin|drop|status` (issue 9).

A small cache (20M, so pins may take 16M) and a small memory cache (1M), so every
re-read below is served by LMDB or the store, never by the daemon's memory; reads drop
the kernel's page cache first, as `cache warm` does.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import IMAGEFS, Mount, StoreHandle, make_file, run_cli
from test_access import ACCESS, mounted_for_everyone, run_as, shared_host, unix_users  # noqa: F401
from test_inbox import config

MiB = 1 << 20
CAP = 20 * MiB
SMALL = ("--cache-size", "20M")


def read_all(path: Path) -> bytes:
    """Through the daemon: the kernel's cached pages are dropped before and after."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def status(m: Mount, cap: int = CAP) -> dict:
    """What `imagefs cache status --json` prints, read as it reads it."""
    doc = json.loads(os.getxattr(m.path, "user.imagefs.cache"))
    assert doc["cache_bytes"] <= doc["cap"] == cap, doc  # the cap is never exceeded
    return doc


def cached(m: Mount, image_id: str) -> tuple[int, bool]:
    row = next((i for i in status(m)["images"] if i["id"] == image_id), None)
    return (row["cached_bytes"], row["pinned"]) if row else (0, False)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Until the mount's background work (the refresh, the pin keeper) got there."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def gets(store: StoreHandle) -> int:
    """GET (and HEAD) requests the S3 server has answered for the store's bucket."""
    return store.server.s3_counters(bucket=store.bucket)["get_requests"] if store.server else 0


def test_pinned_image_outlives_eviction_pressure_and_a_remount(store, mount, tmp_path):
    sources = {name: make_file(tmp_path / f"{name}.raw", size, seed=n)
               for n, (name, size) in enumerate([("golden", 12 * MiB), ("a", 8 * MiB),
                                                 ("b", 8 * MiB)])}
    ids = {name: store.create(src, "acme") for name, src in sources.items()}
    cache_dir = tmp_path / "cache"
    extra = (*SMALL, *config(tmp_path, memory_cache="1M", refresh_interval=3600))
    m = mount(store, cache_dir=cache_dir, extra=extra)
    golden = m / f"by-id/{ids['golden']}"

    pinned = run_cli("cache", "pin", str(golden), str(m / "projects/acme/private/golden.raw"))
    assert pinned.stdout == f"1 image pinned, {12 * MiB} bytes cached\n"
    assert cached(m, ids["golden"]) == (12 * MiB, True)
    # 12M pinned + 8M is over the 16M pins may take: one line, nothing pinned.
    refused = run_cli("cache", "pin", str(m / f"by-id/{ids['a']}"), check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"cannot pin image {ids['a']} (8.0M): pins may take 16.0M (80% of the 20.0M " \
           "cache_size) and only 4.0M of that is left; unpin others or raise cache_size" \
        in refused.stderr
    assert cached(m, ids["a"])[1] is False

    for name in ("a", "b"):  # 16M more than the 20M cap holds, beside 12M pinned
        assert read_all(m / f"by-id/{ids[name]}") == sources[name].read_bytes()
        assert m.stats()["cache_bytes"] <= CAP
    doc = status(m)
    assert doc["pinned_bytes"] == 12 * MiB and doc["pin_limit"] == 16 * MiB
    assert cached(m, ids["golden"]) == (12 * MiB, True)
    assert m.stats()["evicted_bytes"] > 0, "no pressure: the test proves nothing"
    before, s3_before = m.stats()["store_requests"], gets(store)
    assert read_all(golden) == sources["golden"].read_bytes()
    assert m.stats()["store_requests"] == before and gets(store) == s3_before

    assert json.loads(run_cli("cache", "status", str(m.path), "--json").stdout) == status(m)
    human = run_cli("cache", "status", str(m.path)).stdout.splitlines()
    assert human[0].split() == ["IMAGE", "NAME", "SIZE", "CACHED", "PINNED"]
    assert human[1].split() == [ids["golden"], "golden", "12.0M", "12.0M", "pinned"]
    assert human[-1].startswith("cached ") and \
        human[-1].endswith(" of the 20.0M cap; pinned 12.0M of the 16.0M pins may take")

    m.stop()  # the pin is in LMDB: a new daemon keeps it and reads nothing from the store
    m = mount(store, cache_dir=cache_dir, extra=extra)
    golden = m / f"by-id/{ids['golden']}"
    assert cached(m, ids["golden"]) == (12 * MiB, True)
    s3_before = gets(store)
    assert read_all(golden) == sources["golden"].read_bytes()
    assert m.stats()["store_requests"] == 0 and gets(store) == s3_before
    if store.kind == "s3":
        return  # the rest works alike on both stores

    # drop evicts now; a pinned image refuses it; unpinned, the pin's chunks are evictable.
    dropped = run_cli("cache", "drop", str(m / f"by-id/{ids['a']}"), str(m / f"by-id/{ids['b']}"))
    assert dropped.stdout.startswith("2 images dropped from the cache, ")
    assert cached(m, ids["a"]) == cached(m, ids["b"]) == (0, False)
    refused = run_cli("cache", "drop", str(golden), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"image {ids['golden']} is pinned; unpin it first" in refused.stderr
    assert run_cli("cache", "unpin", str(golden)).stdout == "1 image unpinned\n"
    assert cached(m, ids["golden"]) == (12 * MiB, False)
    for name in ("a", "b"):
        assert read_all(m / f"by-id/{ids[name]}") == sources[name].read_bytes()
    assert m.stats()["store_requests"] >= 4, "the dropped images were not fetched again"
    assert cached(m, ids["golden"])[0] < 12 * MiB, "unpinned, yet nothing of it was evicted"
    assert status(m)["pinned_bytes"] == 0


def test_a_purged_image_loses_its_pin(file_store, mount, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "g.raw", 5 * MiB), "acme")
    m = mount(file_store, extra=(*SMALL, *config(tmp_path, refresh_interval=0.3)))
    # On a terminal the pin shows a progress bar (script(1) gives it one).
    pin = shlex.join([*IMAGEFS, "cache", "pin", str(m / f"by-id/{image_id}")])
    shown = subprocess.run(["script", "-qec", f"stty rows 24 cols 80; {pin}", "/dev/null"],
                           capture_output=True, text=True, timeout=60)
    assert "1 image pinned" in shown.stdout and "pin: " in shown.stdout, shown
    assert cached(m, image_id) == (5 * MiB, True)
    file_store.cli("image", "delete", "--now", image_id)
    wait_for(lambda: not status(m)["pinned_bytes"])
    doc = status(m)
    assert doc["pinned_bytes"] == 0 and doc["images"] == [], doc
    assert doc["other_bytes"] == 5 * MiB  # its chunks age out like any others
    assert f"image {image_id} was purged from the catalog; its pin is dropped" in m.log()


@pytest.mark.usefixtures("unix_users")
def test_only_admins_pin_under_an_access_table(tmp_path):
    with shared_host("refresh_interval = 0.5\ncache_size = \"20M\"\n" + ACCESS) \
            as (root, store, config_file):
        image_id = store.create(make_file(tmp_path / "p.raw", 2 * MiB), "acme",
                                "--visibility", "public")
        with mounted_for_everyone(store, root, config_file) as m:
            image = str(m / f"by-id/{image_id}")
            # alice is in acme (the owner) but no admin; carol administers.
            assert run_as("alice", [["setfattr", image, "user.imagefs.cache", "pin"],
                                    ["setfattr", image, "user.imagefs.cache", "drop"],
                                    ["getfattr", str(m.path), "user.imagefs.cache"],
                                    ["getfattr", image, "user.imagefs.cache"]]) == \
                ["EACCES", "EACCES", "ENODATA", "ok"]
            alice = pwd.getpwnam("ifs-alice")
            why = subprocess.run(["setpriv", f"--reuid={alice.pw_uid}",
                                  f"--regid={alice.pw_gid}", "--init-groups", "getfattr",
                                  "-n", "user.imagefs.last_error", "--only-values",
                                  str(m.path)], capture_output=True, text=True, timeout=30)
            assert f"may not drop image {image_id} in the cache: admins only" in why.stdout, why
            assert cached(m, image_id)[1] is False
            assert run_as("carol", [["setfattr", image, "user.imagefs.cache", "pin"]]) == ["ok"]
            assert cached(m, image_id) == (2 * MiB, True)
            assert run_as("alice", [["setfattr", image, "user.imagefs.cache", "unpin"]]) == \
                ["EACCES"]
            assert cached(m, image_id)[1] is True


def test_a_pin_the_store_cannot_finish_is_finished_when_it_answers(file_store, mount,
                                                                    tmp_path):
    src = make_file(tmp_path / "g.raw", 6 * MiB, seed=3)
    image_id = file_store.create(src, "acme")
    m = mount(file_store, extra=(*SMALL, *config(tmp_path, refresh_interval=0.3,
                                                 read_timeout=2)))
    root = Path(file_store.url.removeprefix("file://"))
    root.rename(tmp_path / "away")  # the NFS share is gone
    try:
        failed = run_cli("cache", "pin", str(m / f"by-id/{image_id}"), check=False)
    finally:
        (tmp_path / "away").rename(root)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert f"image {image_id}: 2 chunks not cached yet: " in failed.stderr
    assert "; it stays pinned, and the mount fetches the rest once the store answers" in \
        failed.stderr
    wait_for(lambda: cached(m, image_id) == (6 * MiB, True))
    assert cached(m, image_id) == (6 * MiB, True)


def test_a_lowered_cache_size_unpins_the_newest_pins(file_store, mount, tmp_path):
    ids = [file_store.create(make_file(tmp_path / f"{n}.raw", 4 * MiB, seed=n), "acme")
           for n in range(2)]
    cache_dir = tmp_path / "cache"
    fast = config(tmp_path, refresh_interval=0.3)
    m = mount(file_store, cache_dir=cache_dir, extra=(*SMALL, *fast))
    run_cli("cache", "pin", *(str(m / f"by-id/{i}") for i in ids))  # in this order
    m.stop()
    m = mount(file_store, cache_dir=cache_dir, extra=("--cache-size", "8M", *fast))
    expected = [(ids[0], True), (ids[1], False)]  # the newest pin went; its chunks stay
    wait_for(lambda: [(i["id"], i["pinned"]) for i in status(m, 8 * MiB)["images"]] == expected)
    assert [(i["id"], i["pinned"]) for i in status(m, 8 * MiB)["images"]] == expected
    assert f"image {ids[1]} unpinned: the pinned images took more than the 6.4M pins may " \
           "take (80% of the 8.0M cache_size)" in m.log()
