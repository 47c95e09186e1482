#!/usr/bin/env python3
"""Many hosts, one catalog: what a refresh costs, what a new host costs, and a boot storm.

Against one SeaweedFS S3 server started here (loopback), in one run:

  refresh   per catalog size (--sizes, default 100 1000 10000): S3 requests and bytes
            of one idle refresh as daemons do it now (the change log's tail) and as
            they did before it (a listing of every manifest: still done every
            full_refresh_interval); then a real daemon's requests over --idle seconds of
            idle refreshes; and a new host with an empty cache dir: time until the mount
            is ready and `ls -l` of the folder holding every image, before and after a
            catalog snapshot exists, and again with a warm cache dir.
  storm     N hosts (N daemons, each with its own empty cache dir; --hosts, default
            1 2 4 8) read one --storm-size image at the same moment: time to first byte,
            time to read it all, and the store's egress as a multiple of the image.

    .venv/bin/python benchmarks/fleet.py [--sizes 100 1000 10000] [--hosts 1 2 4 8]
        [--storm-size 256M] [--idle 10] [--json results.json]

Run as root (it mounts). Figures go to docs/fleet.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from imagefs.cache import open_environment  # noqa: E402
from imagefs.catalog import Catalog  # noqa: E402
from imagefs.catalog_index import CatalogIndex  # noqa: E402
from imagefs.catalog_store import CatalogStore  # noqa: E402
from imagefs.config import S3Settings, parse_size  # noqa: E402
from imagefs.mountinfo import is_mounted  # noqa: E402
from imagefs.pipeline import upload_image  # noqa: E402
from imagefs.records import ImageRecord  # noqa: E402
from imagefs.stores import open_store  # noqa: E402
from seaweedfs import SeaweedServer  # noqa: E402

MiB = 1 << 20


class Bench:
    def __init__(self, server: SeaweedServer, work: Path) -> None:
        self.server = server
        self.work = work
        self.hosts: dict[str, tuple[subprocess.Popen, Path]] = {}  # mounted, by name

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:10]}"
        self.server.make_bucket(name)
        return name

    def store(self, bucket: str) -> CatalogStore:
        env = self.server.environ()
        return CatalogStore(open_store(f"s3://{bucket}/imagefs", S3Settings(
            endpoint_url=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
            secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])))

    def counted(self, bucket: str, action) -> tuple[object, dict[str, int]]:  # noqa: ANN001
        """Run action(); what the store served meanwhile (requests by kind, bytes)."""
        before = self.server.s3_counters(bucket)
        result = action()
        after = self.server.s3_counters(bucket)
        return result, {k: after.get(k, 0) - before.get(k, 0) for k in after}

    def mount(self, bucket: str, name: str, **config: object) -> tuple[subprocess.Popen, Path]:
        mnt = self.work / f"mnt-{name}"
        mnt.mkdir(exist_ok=True)
        cfg = self.work / f"{name}.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "imagefs", "mount", "--foreground", "--config", str(cfg),
             "--store", f"s3://{bucket}/imagefs", "--cache-dir",
             str(self.work / f"cache-{name}"), str(mnt)],
            env={**os.environ, **self.server.environ()}, stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"{name}.log", "ab"))
        deadline = time.monotonic() + 300
        while not is_mounted(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount {name} failed; see {self.work / (name + '.log')}")
            time.sleep(0.02)
        return daemon, mnt

    @staticmethod
    def unmount(daemon: subprocess.Popen, mnt: Path) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        daemon.wait(timeout=60)


def populate(catalog_store: CatalogStore, count: int) -> None:
    def one(n: int) -> None:
        record = ImageRecord.new("acme", name=f"img-{n:05d}", status="saving",
                                 disk_format="raw", visibility="private")
        upload_image(catalog_store, io.BytesIO(b"x" * 512), record, 4096)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def in_process_refresh(bench: Bench, bucket: str, full: bool) -> dict[str, int]:
    """The requests of one idle refresh, by the daemon's own Catalog code.

    weed counts object bytes only; the bytes of LIST answers (XML, about 300 bytes a
    key) are counted here, from the responses botocore receives.
    """
    work = Path(tempfile.mkdtemp(dir=bench.work))
    env = open_environment(work, 64 * MiB)
    catalog_store = bench.store(bucket)
    catalog = Catalog(catalog_store, CatalogIndex(env, catalog_store.store.url),
                      full_interval=0.0 if full else 3600.0)
    catalog.load_cached()
    catalog.refresh()  # a first, complete refresh; the next one is idle
    listed = [0]

    def count(http_response, **_kwargs) -> None:  # noqa: ANN001
        listed[0] += len(http_response.content)

    catalog_store.store.client.meta.events.register("after-call.s3.ListObjectsV2", count)
    _, spent = bench.counted(bucket, catalog.refresh)
    env.close()
    return {**spent, "list_bytes": listed[0]}


def ls_l(folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["ls", "-l", str(folder)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def refresh_costs(bench: Bench, size: int, idle: float) -> dict[str, object]:
    bucket = bench.bucket()
    populate(bench.store(bucket), size)
    row: dict[str, object] = {"images": size}
    row["idle_log"] = in_process_refresh(bench, bucket, full=False)
    row["idle_listing"] = in_process_refresh(bench, bucket, full=True)

    def new_host(name: str) -> tuple[float, float, dict[str, int]]:
        def start() -> tuple[float, float]:
            began = time.perf_counter()
            daemon, mnt = bench.mount(bucket, name, refresh_interval=1.0)
            ready = time.perf_counter() - began
            listing = ls_l(mnt / "projects/acme/private")
            bench.hosts[name] = (daemon, mnt)
            return ready, listing
        (ready, listing), spent = bench.counted(bucket, start)
        return ready, listing, spent

    bench.hosts.clear()
    row["first_host"] = new_host("first")  # no snapshot yet: lists every manifest
    daemon, mnt = bench.hosts["first"]
    # it writes a catalog snapshot after its first refresh (>= 1000 entries in the log)
    time.sleep(3)
    _, spent = bench.counted(bucket, lambda: time.sleep(idle))
    row["daemon_idle"] = {**spent, "seconds": idle, "refreshes": idle / 1.0}
    row["second_host"] = new_host("second")  # starts from the snapshot, if one was due
    for name in ("first", "second"):
        bench.unmount(*bench.hosts[name])
    row["warm_host"] = new_host("second")  # its cache dir is warm now
    bench.unmount(*bench.hosts["second"])
    return row


def storm(bench: Bench, hosts: int, size: int) -> dict[str, object]:
    bucket = bench.bucket()
    catalog_store = bench.store(bucket)
    record = ImageRecord.new("acme", name="golden", status="saving", disk_format="raw",
                             visibility="public")
    with open("/dev/urandom", "rb") as random:
        data = random.read(size)
    image = upload_image(catalog_store, io.BytesIO(data), record, 256 << 10)
    mounted = [bench.mount(bucket, f"storm{hosts}-{i}", refresh_interval=10.0)
               for i in range(hosts)]
    go = threading.Barrier(hosts)
    results: list[tuple[float, float]] = []

    def boot(mnt: Path) -> None:
        path = mnt / f"by-id/{image.record.id}"
        with open(path, "rb", buffering=0) as f:
            go.wait()
            began = time.perf_counter()
            f.read(4096)
            first = time.perf_counter() - began
            while f.read(1 * MiB):
                pass
            results.append((first, time.perf_counter() - began))

    def run_all() -> None:
        threads = [threading.Thread(target=boot, args=(m,)) for _, m in mounted]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    _, spent = bench.counted(bucket, run_all)
    for daemon, mnt in mounted:
        bench.unmount(daemon, mnt)
    firsts = [r[0] for r in results]
    totals = [r[1] for r in results]
    return {"hosts": hosts, "ttfb_ms_median": statistics.median(firsts) * 1000,
            "ttfb_ms_max": max(firsts) * 1000, "read_s_median": statistics.median(totals),
            "read_s_max": max(totals), "egress_x": spent["get_bytes"] / size,
            "get_requests": spent["get_requests"],
            "aggregate_MBps": hosts * size / max(totals) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--hosts", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--storm-size", default="256M")
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagefs-fleet-"))
    out: dict[str, list[dict[str, object]]] = {"refresh": [], "storm": []}
    try:
        with SeaweedServer(work / "seaweedfs") as server:
            bench = Bench(server, work)
            for size in args.sizes:
                row = refresh_costs(bench, size, args.idle)
                out["refresh"].append(row)
                print(json.dumps(row), flush=True)
            for hosts in args.hosts:
                row = storm(bench, hosts, parse_size(args.storm_size))
                out["storm"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def report(out: dict[str, list[dict[str, object]]]) -> None:
    print("\nidle refresh: S3 requests (bytes received: objects and LIST answers)")
    print(f"{'images':>7} {'log tail':>16} {'full listing':>20} {'daemon, per refresh':>22}")
    for row in out["refresh"]:
        log_, full, idle = row["idle_log"], row["idle_listing"], row["daemon_idle"]

        def cost(c: dict[str, int]) -> str:
            requests = sum(v for k, v in c.items() if k.endswith("_requests"))
            return f"{requests} ({c.get('get_bytes', 0) + c.get('list_bytes', 0)} B)"
        per = sum(v for k, v in idle.items() if k.endswith("_requests")) / idle["refreshes"]
        print(f"{row['images']:>7} {cost(log_):>16} {cost(full):>20} {per:>22.1f}")
    print("\nnew host: seconds until mounted, `ls -l` of the folder, S3 requests")
    for row in out["refresh"]:
        for label in ("first_host", "second_host", "warm_host"):
            ready, listing, spent = row[label]
            requests = sum(v for k, v in spent.items() if k.endswith("_requests"))
            print(f"{row['images']:>7} {label:<12} ready {ready:6.2f} s  ls -l {listing:6.2f} s"
                  f"  {requests:>6} requests")
    print("\nboot storm: N hosts read one image cold at once")
    print(f"{'N':>3} {'TTFB p50 ms':>12} {'TTFB max ms':>12} {'read p50 s':>11} "
          f"{'read max s':>11} {'egress x':>9} {'aggregate MB/s':>15}")
    for row in out["storm"]:
        print(f"{row['hosts']:>3} {row['ttfb_ms_median']:>12.1f} {row['ttfb_ms_max']:>12.1f} "
              f"{row['read_s_median']:>11.2f} {row['read_s_max']:>11.2f} "
              f"{row['egress_x']:>9.2f} {row['aggregate_MBps']:>15.0f}")


if __name__ == "__main__":
    main()
