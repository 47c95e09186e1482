#!/usr/bin/env python3
"""Where the daemon's CPU goes on the read path: py-spy samples of a real mount.

Against a SeaweedFS server started here: uploads a --size image of random bytes, mounts
it with an empty cache dir, and records the daemon with py-spy (every thread, idle
samples left out) while

  cold     one reader streams the image in 1 MiB reads (page cache dropped first)
  random   4 KiB O_DIRECT reads at random offsets, served from the LMDB cache (a fresh
           mount of the now warm cache dir, page cache dropped)

For each it prints the daemon's CPU seconds, the share of samples per leaf function
(self time) and per stack frame anywhere (inclusive), and writes a collapsed-stack file
(`--out DIR`, for flamegraph.pl or speedscope).

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile_read.py [--size 512M] [--reads 4000] [--out DIR]

Run as root (FUSE, drop_caches).
"""

from __future__ import annotations

import argparse
import collections
import json
import mmap
import os
import random
import shutil
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

PY_SPY = Path(sys.executable).with_name("py-spy")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mount(server: SeaweedServer, url: str, cache: Path, mnt: Path) -> subprocess.Popen:
    mnt.mkdir(exist_ok=True)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "imagefs", "mount", "--foreground", "--store", url,
         "--cache-dir", str(cache), str(mnt)], env={**os.environ, **server.environ()},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not is_mounted(mnt):
        if daemon.poll() is not None:
            raise RuntimeError("the mount did not come up")
        time.sleep(0.05)
    return daemon


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiled(pid: int, out: Path, work) -> tuple[float, Path]:  # noqa: ANN001
    """Run work() with py-spy recording `pid`; (daemon CPU seconds, collapsed stacks)."""
    spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(pid), "--threads",
                            "--format", "raw", "--rate", "250", "--output", str(out),
                            "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    before = cpu_seconds(pid)
    work()
    spent = cpu_seconds(pid) - before
    spy.send_signal(2)
    spy.wait(timeout=60)
    return spent, out


def summary(collapsed: Path, top: int = 14) -> dict[str, list[tuple[str, float]]]:
    """Leaf (self) and inclusive shares of the samples, per function."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")[1:]]
        if not frames:
            continue
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return {kind: [(f, round(100 * n / total, 1)) for f, n in counter.most_common(top)]
            for kind, counter in (("self %", leaf), ("inclusive %", inclusive))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--size", default="512M")
    parser.add_argument("--reads", type=int, default=4000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="imagefs-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        with SeaweedServer(work / "seaweedfs") as server:
            server.make_bucket("bench")
            url = "s3://bench/imagefs"
            image = work / "image.raw"
            with open(image, "wb") as f, open("/dev/urandom", "rb") as rnd:
                for _ in range(size // (1 << 20)):
                    f.write(rnd.read(1 << 20))
            env = {**os.environ, **server.environ()}
            image_id = subprocess.run(
                [sys.executable, "-m", "imagefs", "image", "create", "--store", url,
                 "--project", "bench", str(image)], env=env, check=True,
                capture_output=True, text=True).stdout.strip()
            cache, mnt = work / "cache", work / "mnt"

            daemon = mount(server, url, cache, mnt)
            path = mnt / f"by-id/{image_id}"

            def stream() -> None:
                drop_caches()
                with open(path, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass

            started = time.perf_counter()
            cpu, stacks = profiled(daemon.pid, out / "cold.txt", stream)
            results["cold"] = {"cpu_s_per_GiB": cpu * (1 << 30) / size,
                               "seconds": time.perf_counter() - started,
                               **summary(stacks)}
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            daemon.wait(timeout=60)

            daemon = mount(server, url, cache, mnt)
            rng = random.Random(7)
            offsets = [rng.randrange(size // 4096) * 4096 for _ in range(args.reads)]

            def random_reads() -> None:
                drop_caches()
                buf = mmap.mmap(-1, 4096)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                try:
                    for offset in offsets:
                        os.preadv(fd, [buf], offset)
                finally:
                    os.close(fd)

            started = time.perf_counter()
            cpu, stacks = profiled(daemon.pid, out / "random.txt", random_reads)
            elapsed = time.perf_counter() - started
            results["random"] = {"cpu_ms_per_read": 1000 * cpu / args.reads,
                                 "reads_per_s": args.reads / elapsed, **summary(stacks)}
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            daemon.wait(timeout=60)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
