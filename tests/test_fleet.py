"""Many hosts, one catalog: three daemons, each with its own cache dir, on one SeaweedFS
cluster (a master, three volume servers with replication 001, a filer with the S3
gateway), proving what docs/fleet.md promises.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import LONG, StoreHandle, make_file
from imagefs.catalog_store import CatalogStore
from imagefs.pipeline import upload_image
from imagefs.records import ImageRecord
from seaweed_cluster import SeaweedCluster
from test_inbox import published
from test_reliability import wait_for
from test_stores import _open

MiB = 1 << 20
REFRESH = 0.5  # seconds: refresh_interval of every host here
RACES = 300 if LONG else 100


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with SeaweedCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
def fleet_store(cluster) -> StoreHandle:
    bucket = f"f-{uuid.uuid4().hex[:12]}"
    cluster.make_bucket(bucket)
    return StoreHandle("s3", f"s3://{bucket}/imagefs", cluster.environ(), cluster, bucket)


def host_config(tmp_path: Path, **values) -> tuple[str, str]:
    values = {"refresh_interval": REFRESH, "entry_timeout": 60.0, "settle_time": 0.3,
              "projects": ["acme"], **values}
    path = tmp_path / f"host-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return ("--config", str(path))


@pytest.fixture
def hosts(fleet_store, mount, tmp_path):
    """Three daemons on one store, each with its own cache dir (as on three hosts)."""
    def start(name: str, **config):
        return mount(fleet_store, cache_dir=tmp_path / f"cache-{name}",
                     extra=host_config(tmp_path, **config))
    return start


def visible(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False


def test_an_upload_and_every_gesture_on_one_host_reach_the_others(fleet_store, hosts,
                                                                  tmp_path):
    a, b, c = hosts("a"), hosts("b"), hosts("c")
    src = make_file(tmp_path / "golden.raw", 3 * MiB + 7, seed=5)
    subprocess.run(["cp", str(src), str(a / "inbox/acme/golden.raw")], check=True)
    image_id = published(a / "inbox/acme/golden.raw")
    name = os.listdir(a / "projects/acme/private")[0]
    for other in (b, c):
        wait_for(lambda o=other: visible(o / f"projects/acme/private/{name}"),
                 timeout=REFRESH * 2 + 3, what="the upload on the other hosts")
        assert (other / f"by-id/{image_id}").read_bytes() == src.read_bytes()
    os.rename(a / f"projects/acme/private/{name}", a / "projects/acme/public/gold.raw")
    for other in (b, c):  # now in their kernel caches too (entry_timeout is 60 s)
        wait_for(lambda o=other: visible(o / "public/gold.raw"), timeout=REFRESH * 2 + 3,
                 what="the visibility change on the other hosts")
    os.rename(a / "projects/acme/public/gold.raw", a / "projects/acme/public/silver.raw")
    os.setxattr(a / "public/silver.raw", "user.glance.min_ram", b"2048")
    for other in (b, c):
        wait_for(lambda o=other: visible(o / "public/silver.raw")
                 and not visible(o / "public/gold.raw")
                 and os.getxattr(o / "public/silver.raw", "user.glance.min_ram") == b"2048",
                 timeout=REFRESH * 2 + 3, what="the rename and setfattr on the other hosts")
    os.unlink(a / "public/silver.raw")
    for other in (b, c):
        wait_for(lambda o=other: not visible(o / "public/silver.raw")
                 and not visible(o / f"by-id/{image_id}"),
                 timeout=REFRESH * 2 + 3, what="the delete on the other hosts")


def test_kernel_caches_on_other_hosts_forget_renamed_and_deleted_names(fleet_store, hosts,
                                                                      tmp_path):
    """entry_timeout is 60 s, yet an old name stops answering within a refresh."""
    image_id = fleet_store.create(make_file(tmp_path / "k.raw", 1 * MiB, seed=6), "acme",
                                  "--name", "k", "--visibility", "public")
    a, b = hosts("a"), hosts("b")
    st = os.stat(b / "public/k.raw")  # now in b's kernel dentry and attribute caches
    os.rename(a / "public/k.raw", a / "public/renamed.raw")
    started = time.monotonic()
    wait_for(lambda: not visible(b / "public/k.raw"), timeout=REFRESH * 2 + 3,
             what="b's kernel to forget the old name")
    assert time.monotonic() - started < 10
    assert os.stat(b / "public/renamed.raw").st_ino == st.st_ino
    os.unlink(a / "public/renamed.raw")
    wait_for(lambda: not visible(b / "public/renamed.raw"), timeout=REFRESH * 2 + 3,
             what="b's kernel to forget the deleted name")
    with pytest.raises(FileNotFoundError):
        os.stat(b / f"by-id/{image_id}")


def test_two_hosts_editing_one_image_at_once_lose_nothing(fleet_store, hosts, tmp_path):
    """setfattr on a and mv on b at the same moment, RACES times: both always survive."""
    image_id = fleet_store.create(make_file(tmp_path / "r.raw", 64 << 10, seed=7), "acme",
                                  "--name", "r0")
    a, b = hosts("a"), hosts("b")
    wait_for(lambda: visible(b / "projects/acme/private/r0.raw"), what="the image on b")
    catalog = CatalogStore(_open(fleet_store))
    name, min_ram, refused = "r0", 0, 0
    for i in range(1, RACES + 1):
        go = threading.Barrier(2)
        outcome: dict[str, OSError | None] = {}

        def attempt(who: str, gesture) -> None:  # type: ignore[no-untyped-def]
            go.wait()
            try:
                gesture()
                outcome[who] = None
            except OSError as exc:
                outcome[who] = exc

        gestures = {
            "a": lambda: os.setxattr(a / f"by-id/{image_id}", "user.glance.min_ram",
                                     str(i).encode()),
            "b": lambda: os.rename(b / f"projects/acme/private/{name}.raw",
                                   b / f"projects/acme/private/r{i}.raw")}
        threads = [threading.Thread(target=attempt, args=item) for item in gestures.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for who, exc in outcome.items():
            if exc is not None:  # a refusal must be clear (EAGAIN: try again), never a loss
                assert exc.errno == errno.EAGAIN, (who, exc)
                refused += 1
        min_ram = i if outcome["a"] is None else min_ram
        name = f"r{i}" if outcome["b"] is None else name
        record = catalog.load(image_id).record
        assert (record.min_ram, record.name) == (min_ram, name), f"race {i} lost a change"
    assert refused <= RACES // 10, f"{refused} of {RACES} gestures refused"


def test_two_hosts_publishing_one_name_at_once_get_two_images(fleet_store, hosts, tmp_path):
    a, b = hosts("a"), hosts("b")
    sources = [make_file(tmp_path / f"same-{i}.raw", 1 * MiB, seed=10 + i) for i in range(2)]
    copies = [threading.Thread(target=subprocess.run, kwargs={"check": True, "args": [
        "cp", str(src), str(h / "inbox/acme/same.raw")]})
        for src, h in zip(sources, (a, b), strict=True)]
    for t in copies:
        t.start()
    for t in copies:
        t.join()
    ids = {published(a / "inbox/acme/same.raw"), published(b / "inbox/acme/same.raw")}
    assert len(ids) == 2
    wait_for(lambda: len(os.listdir(a / "projects/acme/private")) == 2, what="both on a")
    contents = {(a / f"by-id/{i}").read_bytes() for i in ids}
    assert contents == {s.read_bytes() for s in sources}


def test_a_handle_open_on_one_host_reads_an_image_deleted_on_another(fleet_store, hosts,
                                                                    tmp_path):
    src = make_file(tmp_path / "d.raw", 4 * MiB, seed=8)
    image_id = fleet_store.create(src, "acme", "--name", "d")
    a, b = hosts("a", delete_grace=600.0), hosts("b", delete_grace=600.0)
    wait_for(lambda: visible(b / f"by-id/{image_id}"), what="the image on b")
    with open(b / f"by-id/{image_id}", "rb") as handle:
        os.unlink(a / "projects/acme/private/d.raw")
        wait_for(lambda: not visible(b / "projects/acme/private/d.raw"),
                 timeout=REFRESH * 2 + 3, what="the delete on b")
        assert handle.read() == src.read_bytes()  # uncached until now: fetched from the store


def test_scrubbers_on_three_hosts_purge_once(fleet_store, hosts, tmp_path):
    image_id = fleet_store.create(make_file(tmp_path / "s.raw", 64 << 10, seed=12), "acme",
                                  "--name", "s")
    started = [hosts(n, delete_grace=1.0) for n in "abc"]
    for h in started:
        wait_for(lambda h=h: visible(h / f"by-id/{image_id}"), what="the image everywhere")
    fleet_store.cli("image", "delete", image_id)
    wait_for(lambda: not fleet_store.has_object(f"data/{image_id}"), timeout=15,
             what="the purge")
    time.sleep(3 * REFRESH)  # give the other scrubbers every chance to purge it again
    purged = sum(h.log().count(f"image {image_id} purged") for h in started)
    assert purged == 1, f"{purged} hosts purged the image"


def test_an_offline_host_catches_up_from_the_log(fleet_store, hosts, tmp_path):
    first = fleet_store.create(make_file(tmp_path / "o1.raw", 64 << 10, seed=9), "acme",
                               "--name", "o1")
    c = hosts("c")
    wait_for(lambda: visible(c / f"by-id/{first}"), what="the image on c")
    c.stop()
    second = fleet_store.create(make_file(tmp_path / "o2.raw", 64 << 10, seed=10), "acme",
                                "--name", "o2")
    fleet_store.cli("image", "set", first, "--name", "o1-renamed")
    c.start()
    assert sorted(os.listdir(c / "projects/acme/private")) == ["o1-renamed.raw", "o2.raw"]
    assert visible(c / f"by-id/{second}")
    assert "catalog refreshed from the log" in c.log()


def test_an_idle_fleet_costs_one_small_request_per_host_and_refresh(fleet_store, hosts,
                                                                    cluster, tmp_path):
    catalog = CatalogStore(_open(fleet_store))
    for i in range(40):
        record = ImageRecord.new("acme", name=f"i{i}", status="saving")
        upload_image(catalog, io.BytesIO(b"i" * 4096), record, 4096)
    started = [hosts(n) for n in "abc"]
    for h in started:
        wait_for(lambda h=h: len(os.listdir(h / "projects/acme/private")) == 40,
                 what="the catalog on every host")
    time.sleep(2 * REFRESH)  # the first host's catalog snapshot is written by now
    idle = 3.0
    before = cluster.s3_counters(fleet_store.bucket)
    time.sleep(idle)
    after = cluster.s3_counters(fleet_store.bucket)
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    refreshes = 3 * idle / REFRESH
    assert spent["get_requests"] == 0, spent
    assert spent.get("list_requests", 0) <= refreshes + 6, spent


def test_reads_survive_a_volume_server_killed_mid_read(fleet_store, hosts, cluster, tmp_path):
    """Replication 001 keeps a second copy: reads go on, or answer EIO within the deadline."""
    src = make_file(tmp_path / "big.raw", 48 * MiB, seed=11)
    image_id = fleet_store.create(src, "acme", "--name", "big")
    b = hosts("b", read_timeout=5.0, prefetch_max="8M", memory_cache="16M")
    wait_for(lambda: visible(b / f"by-id/{image_id}"), what="the image on b")
    volumes = cluster.object_volume_ids(fleet_store.bucket, f"imagefs/data/{image_id}")
    holders = {i for v in volumes for i in cluster.volume_locations(v)}
    assert len(holders) >= 2, f"the image's data is not replicated: {holders}"
    victim = min(holders)
    expected = src.read_bytes()
    slowest = 0.0
    errors = 0
    killed = False
    with open(b / f"by-id/{image_id}", "rb", buffering=0) as f:
        offset = 0
        while offset < len(expected):
            if offset >= len(expected) // 4 and not killed:
                cluster.kill_volume(victim)
                killed = True
            started = time.monotonic()
            try:
                piece = os.pread(f.fileno(), 1 * MiB, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                errors += 1
                piece = b""
            slowest = max(slowest, time.monotonic() - started)
            if piece:
                assert piece == expected[offset:offset + len(piece)], f"wrong bytes at {offset}"
                offset += len(piece)
            elif errors > 20:
                pytest.fail("reads kept failing after the volume server died")
    cluster.restart_volume(victim)
    assert slowest < 5.0 + 3, f"a read took {slowest:.1f}s"
