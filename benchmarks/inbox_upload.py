#!/usr/bin/env python3
"""Upload throughput through the inbox, beside boto3's own upload_file, in one run.

Starts a SeaweedFS S3 server (tests/seaweedfs.py) on 127.0.0.1, makes a random file of
--size, then measures (MB = 10^6 bytes):

  boto3        boto3.s3.transfer upload_file of the file to the bucket (its defaults:
               8 MiB parts, 10 threads) - the physical limit a Python client reaches
  imagefs      `cp FILE <mnt>/inbox/acme/` until `imagefs inbox wait` reports the image
               published (inspected, md5 + sha512 + block hashes, uploaded, manifest
               written); reported with and without the settle time, which is a
               configured wait, not work
  imagefs cp   how long `cp` itself took (the writer's view)

Run as root:  /work/venv/bin/python benchmarks/inbox_upload.py [--size 1G] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from imagefs.config import parse_size  # noqa: E402
from imagefs.mountinfo import is_mounted  # noqa: E402
from seaweedfs import SeaweedServer  # noqa: E402

IMAGEFS = [sys.executable, "-m", "imagefs"]
SETTLE = 1.0


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))
        f.write(os.urandom(size % (8 << 20)))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_boto3(server: SeaweedServer, bucket: str, src: Path, n: int) -> float:
    client = server.client()
    drop_caches()
    start = time.perf_counter()
    client.upload_file(str(src), bucket, f"boto3/object-{n}")
    return time.perf_counter() - start


def time_inbox(mnt: Path, src: Path, n: int) -> tuple[float, float]:
    target = mnt / "inbox/acme" / f"upload-{n}.raw"
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(target)], check=True)
    copied = time.perf_counter() - start
    result = subprocess.run([*IMAGEFS, "inbox", "wait", str(target), "--timeout", "600"],
                            capture_output=True, text=True)
    total = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"upload failed: {result.stdout}{result.stderr}")
    return copied, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (median)")
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="imagefs-inbox-bench-") as tmp:
        work = Path(tmp)
        src = work / "src.raw"
        make_file(src, size)
        with SeaweedServer(work / "seaweedfs") as server:
            bucket = "bench"
            server.make_bucket(bucket)
            config = work / "imagefs.toml"
            config.write_text(f'settle_time = {SETTLE}\nprojects = ["acme"]\n')
            mnt = work / "mnt"
            mnt.mkdir()
            env = {**os.environ, **server.environ()}
            daemon = subprocess.Popen(
                [*IMAGEFS, "mount", "--foreground", "--store", f"s3://{bucket}/imagefs",
                 "--cache-dir", str(work / "cache"), "--config", str(config), str(mnt)],
                env=env, stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
            try:
                while not is_mounted(mnt):
                    if daemon.poll() is not None:
                        raise SystemExit((work / "daemon.log").read_text())
                    time.sleep(0.05)
                boto = [time_boto3(server, bucket, src, n) for n in range(args.repeats)]
                inbox = [time_inbox(mnt, src, n) for n in range(args.repeats)]
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
                daemon.wait(timeout=30)
    mb = size / 1e6
    boto_s = statistics.median(boto)
    cp_s = statistics.median(c for c, _ in inbox)
    total_s = statistics.median(t for _, t in inbox)
    work_s = total_s - SETTLE
    print(f"file {mb:.0f} MB, median of {args.repeats}, SeaweedFS on 127.0.0.1, "
          f"{os.cpu_count()} cores\n")
    print("| path | seconds | MB/s | ratio to boto3 |")
    print("|---|---|---|---|")
    print(f"| boto3 upload_file | {boto_s:.2f} | {mb / boto_s:.0f} | 1.00 |")
    print(f"| imagefs inbox, cp until published | {total_s:.2f} | {mb / total_s:.0f} | "
          f"{boto_s / total_s:.2f} |")
    print(f"| same, less the {SETTLE:.0f} s settle time | {work_s:.2f} | {mb / work_s:.0f} | "
          f"{boto_s / work_s:.2f} |")
    print(f"| imagefs inbox, cp returns | {cp_s:.2f} | {mb / cp_s:.0f} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
