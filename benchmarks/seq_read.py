#!/usr/bin/env python3
"""Sequential and random read benchmark of an imagefs mount, per store kind.

For each store kind (file://, s3:// on a local SeaweedFS), the script creates a
deterministic random image with `imagefs image create`, mounts it with
`imagefs mount --foreground` and measures, MB = 10^6 bytes:

  baseline    the raw store: a cold 1 MiB-read pass over the store's data file
              (file://), or one boto3 GET of the data object (s3://); plus cold
              4 KiB random reads of it (O_DIRECT preads / 4 KiB ranged GETs)
  cold        sequential 1 MiB reads of by-id/<id>: fresh, empty cache dir, page
              cache dropped
  page cache  the same file again on the same mount (kernel page cache warm)
  warm        unmount, drop caches, remount on the same cache dir, read again: the
              data must come from the LMDB cache (checked with user.imagefs.stats);
              then, on that mount, random 4 KiB reads served by the LMDB cache (its
              pages still resident: drop_caches spares pages a process has mapped),
              and again on a fresh mount after drop_caches (cache pages on disk)
  rand 4K     cold 4 KiB reads at random offsets (one in each 1/N of the image, in
              random order) on a fresh mount with an empty cache; O_DIRECT if the
              filesystem takes it, else buffered preads after drop_caches

With --chunk-sizes 1M,2M,... it also repeats the cold sequential read and the cold
random 4K reads for each chunk size (given to the mount in a TOML config file).

Run as root (drop_caches, FUSE):
    /work/venv/bin/python benchmarks/seq_read.py                       # ~2-3 min
    /work/venv/bin/python benchmarks/seq_read.py --chunk-sizes 1M,2M,4M,8M,16M
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/seaweedfs.py: the SeaweedFS test server

from imagefs.config import parse_size
from imagefs.mountinfo import is_mounted

MiB = 1 << 20
GEN_BLOCK = MiB           # content of generator block i depends only on (seed, i)
READ_SIZE = MiB           # sequential reads: 1 MiB each
STATS_XATTR = "user.imagefs.stats"
IMAGEFS = [sys.executable, "-m", "imagefs"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwinds like Ctrl-C so every finally block runs."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup() -> None:
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with us even if SIGKILLed


# --------------------------------------------------------------------------- helpers
def block_bytes(seed: int, i: int) -> bytes:
    """Same generator as /work/shared/bench/run.py: equal seeds give equal images."""
    return random.Random(f"{seed}:{i}").randbytes(GEN_BLOCK)


def make_image_file(path: Path, size: int, seed: int) -> None:
    stamp = path.with_name(path.name + ".stamp")
    want = f"{size}:{seed}"
    if path.exists() and path.stat().st_size == size and stamp.exists() \
            and stamp.read_text() == want:
        return
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.writelines(block_bytes(seed, i)[:size - i * GEN_BLOCK] for i in range(math.ceil(size / GEN_BLOCK)))
    stamp.write_text(want)
    log(f"generated {size / MiB:.0f} MiB test image in {time.perf_counter() - t0:.1f}s")


IDLE_WAIT = 0.0   # set from --wait-idle
BUSY_STEPS: list[str] = []


def drop_caches(what: str = "") -> None:
    """sync + drop the page cache, after waiting for the machine to be idle."""
    subprocess.run(["sync"], check=True)
    if not wait_idle(IDLE_WAIT):
        BUSY_STEPS.append(what or "?")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def wait_idle(max_wait: float, need: float = 0.85) -> bool:
    """Wait until the machine is idle (>= `need` idle over 2 samples of 0.5 s).

    Other work on a 2-core box (a test suite, another benchmark) skews every figure;
    returns False (and logs it) if the machine stayed busy for `max_wait` seconds."""
    if max_wait <= 0:
        return True
    deadline = time.monotonic() + max_wait
    good = 0
    warned = False
    while True:
        i0, t0 = _cpu_times()
        time.sleep(0.5)
        i1, t1 = _cpu_times()
        idle = (i1 - i0) / max(t1 - t0, 1)
        good = good + 1 if idle >= need else 0
        if good >= 2:
            return True
        if time.monotonic() > deadline:
            log(f"WARNING: machine still busy ({(1 - idle) * 100:.0f}% CPU) after "
                f"{max_wait:.0f}s of waiting; measuring anyway")
            return False
        if not warned and time.monotonic() > deadline - max_wait + 5:
            log(f"machine busy ({(1 - idle) * 100:.0f}% CPU used by others); waiting "
                f"up to {max_wait:.0f}s for it to settle")
            warned = True


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def proc_cpu_s(pid: int) -> float | None:
    """user+sys CPU seconds of one live process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait


def _group_cpu_s(pgid: int) -> float:
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class CpuWatch:
    """CPU time used during a measurement by processes that are not part of it.

    foreign = all busy CPU (/proc/stat) - this process - the daemon - the S3 server.
    Kernel threads working for us (writeback, kswapd) count as foreign too, so a few
    percent is normal; a test suite running beside the benchmark shows up as tens."""

    def __init__(self, daemon_pid: int | None, server_pgid: int | None) -> None:
        self.daemon_pid, self.server_pgid = daemon_pid, server_pgid

    def _ours(self) -> float:
        t = os.times()
        own = t.user + t.system
        if self.daemon_pid:
            own += proc_cpu_s(self.daemon_pid) or 0.0
        if self.server_pgid:
            own += _group_cpu_s(self.server_pgid)
        return own

    def __enter__(self) -> CpuWatch:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), _busy_ticks(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        busy = (_busy_ticks() - self.busy0) / CLK_TCK
        self.foreign_s = max(busy - (self._ours() - self.ours0), 0.0)
        self.foreign_frac = self.foreign_s / max(wall, 1e-6)  # in cores

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        r["foreign_cpu_s"] = round(self.foreign_s, 2)
        r["foreign_cores"] = round(self.foreign_frac, 3)
        return r


FOREIGN_LIMIT = 0.15  # cores used by others during a measurement before it is redone


def seq_read(path: Path | str, expect_size: int) -> dict[str, float]:
    """Read the whole file with 1 MiB reads; MB/s from open to EOF."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    dt = time.perf_counter() - t0
    if total != expect_size:
        raise RuntimeError(f"{path}: read {total} bytes, expected {expect_size}")
    return {"MBps": total / dt / 1e6, "s": dt, "bytes": total}


def rand_offsets(size: int, n: int, seed: int) -> list[int]:
    """One 4 KiB-aligned offset in each 1/n of the image, in random order."""
    rng = random.Random(seed ^ 0xF1257)
    region = size // n
    offs = [(i * region + rng.randrange(max(region - 4096, 1))) // 4096 * 4096
            for i in range(n)]
    rng.shuffle(offs)
    return offs


def rand_read(path: Path | str, offsets: list[int], source: Path,
              stats: Any = None) -> dict[str, Any]:
    """Timed 4 KiB preads (O_DIRECT when possible); content checked against `source`.

    `stats` (a callable returning the imagefs stats dict) is read between reads, outside
    the timing, to tell reads that went to the store ("misses") and reads served from
    the LMDB cache ("lmdb") from reads served from the daemon's memory."""
    try:
        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    lats: list[float] = []
    miss_lats: list[float] = []
    lmdb_lats: list[float] = []
    bad = 0
    try:
        with open(source, "rb") as src:
            for off in offsets:
                before = stats() if stats else None
                t0 = time.perf_counter()
                got = os.preadv(fd, [buf], off)
                lat = (time.perf_counter() - t0) * 1e3
                lats.append(lat)
                if before is not None:
                    after = stats()
                    if after["store_requests"] > before["store_requests"]:
                        miss_lats.append(lat)
                    elif after.get("lmdb_hits", 0) > before.get("lmdb_hits", 0):
                        lmdb_lats.append(lat)
                src.seek(off)
                bad += got != 4096 or buf[:] != src.read(4096)
    finally:
        os.close(fd)
    out = {"n": len(lats), "direct": direct, "bad": bad, "p50_ms": pct(lats, 50),
           "p99_ms": pct(lats, 99), "mean_ms": statistics.fmean(lats), "max_ms": max(lats)}
    if stats:
        out.update(misses=len(miss_lats), miss_p50_ms=pct(miss_lats, 50),
                   miss_p99_ms=pct(miss_lats, 99), lmdb=len(lmdb_lats),
                   lmdb_p50_ms=pct(lmdb_lats, 50), lmdb_p99_ms=pct(lmdb_lats, 99))
    return out


def verify(path: Path | str, source: Path, size: int, seed: int) -> bool:
    """Compare 8 spots of 64 KiB (start, end, middle, 5 random) with the source file."""
    rng = random.Random(seed ^ 0x5EED)
    offs = [0, max(0, size - 65536), max(0, size // 2 - 1000)]
    offs += [rng.randrange(max(1, size - 65536)) for _ in range(5)]
    with open(path, "rb") as a, open(source, "rb") as b:
        for off in offs:
            a.seek(off)
            b.seek(off)
            if a.read(65536) != b.read(65536):
                return False
    return True


def delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    out = {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            d = v - before.get(k, 0)
            if d:
                out[k] = d
    return out


# --------------------------------------------------------------------------- mounts
ACTIVE_MOUNTS: list[Mount] = []


class Mount:
    """`imagefs mount --foreground` in its own session; always unmounted on exit."""

    def __init__(self, store_url: str, env: dict[str, str], mnt: Path, cache_dir: Path,
                 config: Path, log_path: Path) -> None:
        self.store_url, self.env = store_url, env
        self.mnt, self.cache_dir, self.config, self.log_path = mnt, cache_dir, config, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        cmd = [*IMAGEFS, "mount", "--foreground", "--config", str(self.config), "--store",
               self.store_url, "--cache-dir", str(self.cache_dir), str(self.mnt)]
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, preexec_fn=_child_setup)
        ACTIVE_MOUNTS.append(self)
        t0 = time.perf_counter()
        try:
            while not is_mounted(self.mnt):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mount exited with {self.proc.returncode}; see "
                                       f"{self.log_path}:\n{self.log_tail()}")
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"not mounted after 60s; see {self.log_path}")
                time.sleep(0.02)
            self.mount_s = time.perf_counter() - t0
        except BaseException:
            self.stop(lazy=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(lazy=exc[0] is not None)

    def log_tail(self, n: int = 8) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def stats(self) -> dict[str, Any]:
        return json.loads(os.getxattr(self.mnt, STATS_XATTR))

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.proc.pid) if self.proc else None

    def stop(self, lazy: bool = False) -> None:
        """Unmount and wait for the daemon to exit (it syncs the LMDB cache on the way)."""
        try:
            if is_mounted(self.mnt):
                flags = ["-u", "-z"] if lazy else ["-u"]
                for _ in range(20):
                    if subprocess.run(["fusermount3", *flags, str(self.mnt)],
                                      capture_output=True).returncode == 0:
                        break
                    time.sleep(0.25)  # EBUSY right after a read is transient
                else:
                    subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)],
                                   capture_output=True)
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    log(f"daemon {self.proc.pid} still running 60s after unmount; killing it")
                    self.proc.kill()
                    self.proc.wait(timeout=10)
                if self.proc.returncode not in (0, None):
                    log(f"daemon exited with {self.proc.returncode}: {self.log_tail(4)}")
                if "Traceback" in self.log_tail(200):
                    log(f"warning: daemon logged a traceback, see {self.log_path}")
        finally:
            if self in ACTIVE_MOUNTS:
                ACTIVE_MOUNTS.remove(self)


def emergency_cleanup() -> None:
    for m in list(ACTIVE_MOUNTS):
        with contextlib.suppress(Exception):
            subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True,
                           timeout=30)
        if m.proc is not None and m.proc.poll() is None:
            with contextlib.suppress(Exception):
                m.proc.terminate()
                m.proc.wait(timeout=10)
            if m.proc.poll() is None:
                m.proc.kill()
        with contextlib.suppress(ValueError):
            ACTIVE_MOUNTS.remove(m)


# --------------------------------------------------------------------------- stores
class StoreKind:
    """A store under test: where the image lives and how to reach its raw bytes."""

    kind: str
    url: str
    env: dict[str, str]

    def baseline_seq(self, image_id: str, size: int) -> dict[str, Any]: ...
    def baseline_rand(self, image_id: str, offsets: list[int], source: Path) -> dict[str, Any]: ...
    def counters(self) -> dict[str, Any] | None:
        return None

    def server_pgid(self) -> int | None:
        return None


class FileKind(StoreKind):
    kind = "file"

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.url = f"file://{root}"
        self.env = dict(os.environ)

    def data_path(self, image_id: str) -> Path:
        return self.root / "data" / image_id

    def baseline_seq(self, image_id: str, size: int) -> dict[str, Any]:
        drop_caches("file baseline seq")
        with CpuWatch(None, None) as w:
            r = seq_read(self.data_path(image_id), size)
        return w.record({"what": "local file, 1 MiB reads", **r})

    def baseline_rand(self, image_id: str, offsets: list[int], source: Path) -> dict[str, Any]:
        drop_caches("file baseline rand")
        with CpuWatch(None, None) as w:
            r = rand_read(self.data_path(image_id), offsets, source)
        return w.record({"what": "local file, 4 KiB preads", **r})


class S3Kind(StoreKind):
    kind = "s3"

    def __init__(self, server: Any, bucket: str) -> None:
        self.server = server
        self.bucket = bucket
        self.prefix = "imagefs"
        self.url = f"s3://{bucket}/{self.prefix}"
        self.env = {**os.environ, **server.environ()}
        import boto3
        from botocore.config import Config
        self.client = boto3.client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key, region_name=server.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                          max_pool_connections=16))

    def key(self, image_id: str) -> str:
        return f"{self.prefix}/data/{image_id}"

    def baseline_seq(self, image_id: str, size: int) -> dict[str, Any]:
        drop_caches("s3 baseline seq")
        with CpuWatch(None, self.server_pgid()) as w:
            t0 = time.perf_counter()
            n = 0
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(image_id))["Body"]
            for piece in body.iter_chunks(READ_SIZE):
                n += len(piece)
            dt = time.perf_counter() - t0
        if n != size:
            raise RuntimeError(f"boto3 GET returned {n} bytes, expected {size}")
        return w.record({"what": "boto3, one GET", "MBps": n / dt / 1e6, "s": dt, "bytes": n})

    def baseline_rand(self, image_id: str, offsets: list[int], source: Path) -> dict[str, Any]:
        drop_caches("s3 baseline rand")
        lats = []
        bad = 0
        with open(source, "rb") as src, CpuWatch(None, self.server_pgid()) as w:
            for off in offsets:
                t0 = time.perf_counter()
                got = self.client.get_object(Bucket=self.bucket, Key=self.key(image_id),
                                             Range=f"bytes={off}-{off + 4095}")["Body"].read()
                lats.append((time.perf_counter() - t0) * 1e3)
                src.seek(off)
                bad += got != src.read(4096)
        return w.record({"what": "boto3, 4 KiB ranged GETs", "n": len(lats), "direct": None,
                         "bad": bad, "p50_ms": pct(lats, 50), "p99_ms": pct(lats, 99),
                         "mean_ms": statistics.fmean(lats), "max_ms": max(lats)})

    def server_pgid(self) -> int | None:
        proc = getattr(self.server, "_proc", None)  # weed runs in its own process group
        return proc.pid if proc is not None else None

    def counters(self) -> dict[str, Any] | None:
        fn = getattr(self.server, "s3_counters", None)
        if fn is None:
            return None
        try:
            c = fn(self.bucket)
        except Exception as exc:  # counters are a nice-to-have
            log(f"s3_counters failed: {exc}")
            return None
        return _flatten(c) if isinstance(c, dict) else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- runner
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.a = args
        self.work = work
        self.source = work / "image.raw"
        self.offsets = rand_offsets(args.size, args.rand_reads, args.seed)
        self.results: dict[str, Any] = {"meta": self.meta(), "stores": {}}
        self._n = 0

    def meta(self) -> dict[str, Any]:
        def first_line(cmd: list[str]) -> str | None:
            try:
                return subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=20).stdout.strip().splitlines()[0]
            except Exception:
                return None
        cpu = None
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        return {"args": {k: v for k, v in vars(self.a).items()},
                "size": self.a.size, "seed": self.a.seed, "rand_reads": self.a.rand_reads,
                "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
                "python": platform.python_version(),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                 / 2**30, 1),
                "imagefs": first_line([*IMAGEFS, "--version"]),
                "imagefs_module": first_line([sys.executable, "-c",
                                              "import imagefs; print(imagefs.__file__)"]),
                "git_commit": first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]) or (
                    (REPO / "COMMIT").read_text().strip() if (REPO / "COMMIT").exists()
                    else None),
                "weed": first_line([shutil.which("weed") or str(Path(sys.executable).with_name(
                    "weed")), "version"]),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _dir(self, what: str) -> Path:
        self._n += 1
        return self.work / f"{self._n:02d}-{what}"

    def config(self, chunk_size: str | None) -> Path:
        path = self.work / f"imagefs-{chunk_size or 'default'}.toml"
        path.write_text(f'chunk_size = "{chunk_size}"\n' if chunk_size else
                        "# defaults (see imagefs/config.py)\n")
        return path

    def mount(self, store: StoreKind, cache_dir: Path, config: Path, tag: str) -> Mount:
        return Mount(store.url, store.env, self.work / "mnt", cache_dir, config,
                     self.work / f"daemon-{store.kind}-{tag}.log")

    def create_image(self, store: StoreKind) -> str:
        t0 = time.perf_counter()
        result = subprocess.run(
            [*IMAGEFS, "image", "create", "--store", store.url, "--project", "bench",
             "--name", "bench-image", "--disk-format", "raw", str(self.source)],
            capture_output=True, text=True, env={**store.env, "TQDM_DISABLE": "1"},
            stdin=subprocess.DEVNULL)
        if result.returncode:
            raise RuntimeError(f"imagefs image create failed: {result.stderr.strip()}")
        image_id = result.stdout.strip().splitlines()[-1]
        dt = time.perf_counter() - t0
        log(f"{store.kind}: image {image_id} created in {dt:.1f}s "
            f"({self.a.size / dt / 1e6:.0f} MB/s)")
        self.results["stores"][store.kind]["create"] = {"s": dt, "MBps": self.a.size / dt / 1e6}
        return image_id

    # ---------------------------------------------------------------- measurements
    def cold_seq(self, store: StoreKind, image_id: str, config: Path, tag: str,
                 then_page_cache: bool = False) -> tuple[dict[str, Any], Path]:
        """Fresh cache dir, drop caches, read the image once (and again if asked)."""
        cache = self._dir(f"cache-{store.kind}-{tag}")
        out: dict[str, Any] = {}
        with self.mount(store, cache, config, tag) as m:
            path = m.mnt / "by-id" / image_id
            os.stat(path)  # lookup outside the timing, as a client would stat first
            drop_caches(f"{store.kind} [{tag}] cold seq")
            s0, c0, k0 = m.stats(), m.cpu_s(), store.counters()
            with CpuWatch(m.proc.pid, store.server_pgid()) as w:
                r = seq_read(path, self.a.size)
            s1, c1, k1 = m.stats(), m.cpu_s(), store.counters()
            w.record(r)
            r.update(stats=delta(s0, s1), daemon_cpu_s=(c1 - c0) if c0 is not None and c1
                     is not None else None, s3=delta(k0, k1), verify=verify(
                         path, self.source, self.a.size, self.a.seed))
            out["cold"] = r
            log(f"{store.kind} [{tag}] cold seq: {r['MBps']:.0f} MB/s, stats {r['stats']}")
            if then_page_cache:
                s0, c0 = m.stats(), m.cpu_s()
                with CpuWatch(m.proc.pid, store.server_pgid()) as w:
                    r = seq_read(path, self.a.size)
                s1, c1 = m.stats(), m.cpu_s()
                w.record(r)
                r.update(stats=delta(s0, s1), daemon_cpu_s=(c1 - c0) if c0 is not None and
                         c1 is not None else None)
                out["page_cache"] = r
                log(f"{store.kind} [{tag}] page-cache re-read: {r['MBps']:.0f} MB/s, "
                    f"stats {r['stats']}")
        return out, cache

    def warm_seq(self, store: StoreKind, image_id: str, config: Path, cache: Path,
                 tag: str) -> dict[str, Any]:
        """Remount on the same cache dir after drop_caches: served by LMDB."""
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        with self.mount(store, cache, config, tag + "-warm") as m:
            path = m.mnt / "by-id" / image_id
            os.stat(path)
            drop_caches(f"{store.kind} [{tag}] warm seq")
            s0, c0, k0 = m.stats(), m.cpu_s(), store.counters()
            with CpuWatch(m.proc.pid, store.server_pgid()) as w:
                r = seq_read(path, self.a.size)
            s1, c1, k1 = m.stats(), m.cpu_s(), store.counters()
            w.record(r)
            r.update(stats=delta(s0, s1), stats_total=s1,
                     daemon_cpu_s=(c1 - c0) if c0 is not None and c1 is not None else None,
                     s3=delta(k0, k1),
                     verify=verify(path, self.source, self.a.size, self.a.seed))
            r["rand"] = self._warm_rand(m, store, path, tag)
        d = r["stats"] or {}
        r["from_lmdb"] = d.get("store_bytes", 0) == 0 and d.get("lmdb_hits", 0) > 0
        log(f"{store.kind} [{tag}] warm (LMDB) seq: {r['MBps']:.0f} MB/s")
        log(f"{store.kind} [{tag}] {STATS_XATTR} after the warm read: "
            f"{json.dumps(s1, sort_keys=True)}")
        if not r["from_lmdb"]:
            log(f"WARNING: warm read was not served from the LMDB cache alone: {d}")
        return r

    def _warm_rand(self, m: Mount, store: StoreKind, path: Path, tag: str) -> dict[str, Any]:
        """Random 4K reads served by the LMDB cache (the daemon's memory holds only the
        last memory_cache bytes read).

        drop_caches does not evict page-cache pages that a live process has mapped: on
        a mount that has just read the cache, LMDB's pages stay resident. On a fresh
        mount (warm_rand) they come from disk."""
        drop_caches(f"{store.kind} [{tag}] warm rand 4K")
        offsets = rand_offsets(self.a.size, self.a.rand_reads, self.a.seed + 1)
        s0 = m.stats()
        with CpuWatch(m.proc.pid, store.server_pgid()) as w:
            rr = rand_read(path, offsets, self.source, stats=m.stats)
        w.record(rr)
        rr["stats"] = delta(s0, m.stats())
        log(f"{store.kind} [{tag}] warm random 4K: p50 {rr['p50_ms']:.2f} ms, p99 "
            f"{rr['p99_ms']:.2f} ms ({rr['lmdb']} of {rr['n']} from LMDB, LMDB p50 "
            f"{rr['lmdb_p50_ms'] or 0:.2f} ms)")
        return rr

    def warm_rand(self, store: StoreKind, image_id: str, config: Path, cache: Path,
                  tag: str) -> dict[str, Any]:
        """Remount on a filled cache dir; random 4K reads only."""
        with self.mount(store, cache, config, tag + "-warm") as m:
            path = m.mnt / "by-id" / image_id
            os.stat(path)
            return self._warm_rand(m, store, path, tag)

    def cold_rand(self, store: StoreKind, image_id: str, config: Path,
                  tag: str) -> dict[str, Any]:
        cache = self._dir(f"cache-{store.kind}-{tag}-rand")
        with self.mount(store, cache, config, tag + "-rand") as m:
            path = m.mnt / "by-id" / image_id
            os.stat(path)
            drop_caches(f"{store.kind} [{tag}] rand 4K")
            s0, k0 = m.stats(), store.counters()
            with CpuWatch(m.proc.pid, store.server_pgid()) as w:
                r = rand_read(path, self.offsets, self.source, stats=m.stats)
            s1, k1 = m.stats(), store.counters()
            w.record(r)
            r.update(stats=delta(s0, s1), s3=delta(k0, k1))
        shutil.rmtree(cache, ignore_errors=True)
        log(f"{store.kind} [{tag}] cold random 4K: p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms (O_DIRECT={r['direct']}, {r['n']} reads, "
            f"{r.get('misses')} went to the store)")
        return r

    def clean(self, what: str, fn: Any, foreign: Any, undo: Any = None) -> Any:
        """Run a measurement; redo it (up to --retry-busy times) if others used the CPU."""
        for attempt in range(self.a.retry_busy + 1):
            result = fn()
            busy = foreign(result)
            if busy <= FOREIGN_LIMIT or attempt == self.a.retry_busy:
                if busy > FOREIGN_LIMIT:
                    BUSY_STEPS.append(f"{what} ({busy:.2f} cores used by others)")
                return result
            log(f"{what}: other processes used {busy:.2f} cores meanwhile; measuring again")
            if undo:
                undo(result)

    def run_store(self, store: StoreKind) -> None:
        res: dict[str, Any] = self.results["stores"].setdefault(store.kind, {})
        image_id = self.create_image(store)
        res["image_id"] = image_id
        default_cfg = self.config(None)
        fc = lambda r: r["foreign_cores"]
        seq_fc = lambda o: max(r["foreign_cores"] for r in o[0].values())
        drop = lambda o: shutil.rmtree(o[1], ignore_errors=True)
        if not self.a.skip_default:
            res["baseline_seq"] = self.clean(
                f"{store.kind} baseline seq", lambda: store.baseline_seq(image_id, self.a.size),
                fc)
            log(f"{store.kind} baseline seq ({res['baseline_seq']['what']}): "
                f"{res['baseline_seq']['MBps']:.0f} MB/s")
            res["baseline_rand"] = self.clean(
                f"{store.kind} baseline rand",
                lambda: store.baseline_rand(image_id, self.offsets, self.source), fc)
            log(f"{store.kind} baseline random 4K: p50 {res['baseline_rand']['p50_ms']:.2f} ms,"
                f" p99 {res['baseline_rand']['p99_ms']:.2f} ms")
            colds = []
            for rep in range(self.a.repeats):
                last = rep == self.a.repeats - 1
                seq, cache = self.clean(
                    f"{store.kind} cold seq", lambda: self.cold_seq(
                        store, image_id, default_cfg, "default", then_page_cache=last),
                    seq_fc, drop)
                colds.append(seq["cold"])
                if last:
                    res["page_cache"] = seq["page_cache"]
                    res["warm"] = self.clean(
                        f"{store.kind} warm seq",
                        lambda: self.warm_seq(store, image_id, default_cfg, cache, "default"),
                        lambda r: max(r["foreign_cores"], r["rand"]["foreign_cores"]))
                    res["warm_rand"] = self.clean(
                        f"{store.kind} warm rand 4K",
                        lambda: self.warm_rand(store, image_id, default_cfg, cache, "default"),
                        fc)
                shutil.rmtree(cache, ignore_errors=True)
            res["cold_runs"] = colds
            res["cold"] = sorted(colds, key=lambda r: r["MBps"])[(len(colds) - 1) // 2]
            res["rand"] = self.clean(
                f"{store.kind} rand 4K",
                lambda: self.cold_rand(store, image_id, default_cfg, "default"), fc)
        for cs in self.a.chunk_sizes:
            cfg = self.config(cs)
            sweep = res.setdefault("sweep", {}).setdefault(cs, {})
            runs = []
            for rep in range(self.a.repeats):
                seq, cache = self.clean(
                    f"{store.kind} chunk {cs} cold seq",
                    lambda: self.cold_seq(store, image_id, cfg, f"chunk-{cs}"), seq_fc, drop)
                runs.append(seq["cold"])
                if rep == self.a.repeats - 1:
                    sweep["warm_rand"] = self.clean(
                        f"{store.kind} chunk {cs} warm rand 4K",
                        lambda: self.warm_rand(store, image_id, cfg, cache, f"chunk-{cs}"), fc)
                shutil.rmtree(cache, ignore_errors=True)
            sweep["cold_runs"] = runs
            sweep["cold"] = sorted(runs, key=lambda r: r["MBps"])[(len(runs) - 1) // 2]
            sweep["rand"] = self.clean(
                f"{store.kind} chunk {cs} rand 4K",
                lambda: self.cold_rand(store, image_id, cfg, f"chunk-{cs}"), fc)

    # ---------------------------------------------------------------- report
    def markdown(self) -> str:
        a, meta = self.a, self.results["meta"]
        lines = [f"imagefs read benchmark: image {a.size / MiB:.0f} MiB (seed {a.seed}), "
                 f"{meta['cpus']} CPUs ({meta['cpu']}), kernel {meta['kernel']}, "
                 f"{meta['imagefs']}; MB = 10^6 bytes; {a.rand_reads} random 4K reads; "
                 f"cold = empty cache dir + drop_caches.", ""]
        stores = self.results["stores"]

        def f(v: Any, spec: str = "{:.0f}") -> str:
            return spec.format(v) if isinstance(v, (int, float)) else "-"

        have_default = [k for k, r in stores.items() if "cold" in r]
        if have_default:
            lines += ["| metric | " + " | ".join(f"{k}://" for k in have_default) + " |",
                      "|---" * (len(have_default) + 1) + "|"]
            rows: list[tuple[str, Any]] = [
                ("imagefs image create (MB/s)", lambda r: f(r["create"]["MBps"])),
                ("baseline: raw store, cold seq (MB/s)",
                 lambda r: f"{f(r['baseline_seq']['MBps'])} ({r['baseline_seq']['what']})"),
                ("imagefs seq, cold (MB/s)" + (f", median of {a.repeats}" if a.repeats > 1
                                               else ""),
                 lambda r: f(r["cold"]["MBps"]) + (
                     f" ({f(min(x['MBps'] for x in r['cold_runs']))}-"
                     f"{f(max(x['MBps'] for x in r['cold_runs']))})"
                     if len(r["cold_runs"]) > 1 else "")),
                ("  daemon CPU during it (s)", lambda r: f(r["cold"]["daemon_cpu_s"], "{:.1f}")),
                ("  store requests / MB fetched (imagefs stats)",
                 lambda r: f"{(r['cold']['stats'] or {}).get('store_requests', 0)} / "
                           f"{(r['cold']['stats'] or {}).get('store_bytes', 0) / 1e6:.0f}"),
                ("  S3 GETs / MB sent (SeaweedFS counters)",
                 lambda r: f"{r['cold']['s3'].get('get_requests', 0)} / "
                           f"{r['cold']['s3'].get('get_bytes', 0) / 1e6:.0f}"),
                ("imagefs seq, warm LMDB cache, page cache cold (MB/s)",
                 lambda r: f(r["warm"]["MBps"])),
                ("  daemon CPU during it (s)", lambda r: f(r["warm"]["daemon_cpu_s"], "{:.1f}")),
                ("  S3 GETs during it (SeaweedFS counters)",
                 lambda r: f"{r['warm']['s3'].get('get_requests', 0)}"),
                ("  served from LMDB only (store bytes 0, lmdb_hits)",
                 lambda r: f"{'yes' if r['warm']['from_lmdb'] else 'NO'}, "
                           f"{(r['warm']['stats'] or {}).get('lmdb_hits', 0)} hits"),
                ("imagefs seq, page cache warm, same mount (MB/s)",
                 lambda r: f(r["page_cache"]["MBps"])),
                ("content check (cold / warm)",
                 lambda r: f"{'ok' if r['cold']['verify'] else 'FAIL'} / "
                           f"{'ok' if r['warm']['verify'] else 'FAIL'}"),
                ("baseline: raw store, random 4K p50 / p99 (ms)",
                 lambda r: f"{f(r['baseline_rand']['p50_ms'], '{:.2f}')} / "
                           f"{f(r['baseline_rand']['p99_ms'], '{:.2f}')}"),
                ("imagefs random 4K cold, p50 / p99 (ms)",
                 lambda r: f"{f(r['rand']['p50_ms'], '{:.2f}')} / "
                           f"{f(r['rand']['p99_ms'], '{:.2f}')}"),
                ("  reads that went to the store: n, p50 / p99 (ms)",
                 lambda r: f"{r['rand'].get('misses')}, "
                           f"{f(r['rand'].get('miss_p50_ms'), '{:.2f}')} / "
                           f"{f(r['rand'].get('miss_p99_ms'), '{:.2f}')}"),
                ("  O_DIRECT / wrong reads",
                 lambda r: f"{'yes' if r['rand']['direct'] else 'no'} / {r['rand']['bad']}"),
                ("imagefs random 4K from LMDB, fresh mount, page cache cold: p50 / p99 (ms)",
                 lambda r: f"{f(r['warm_rand']['lmdb_p50_ms'], '{:.2f}')} / "
                           f"{f(r['warm_rand']['lmdb_p99_ms'], '{:.2f}')} "
                           f"(n={r['warm_rand']['lmdb']})"),
                ("imagefs random 4K from LMDB, cache pages resident: p50 / p99 (ms)",
                 lambda r: f"{f(r['warm']['rand']['lmdb_p50_ms'], '{:.2f}')} / "
                           f"{f(r['warm']['rand']['lmdb_p99_ms'], '{:.2f}')} "
                           f"(n={r['warm']['rand']['lmdb']})"),
            ]
            for label, fn in rows:
                cells = []
                for k in have_default:
                    try:
                        cells.append(fn(stores[k]))
                    except (KeyError, TypeError, ValueError, AttributeError):
                        cells.append("-")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        swept = [k for k, r in stores.items() if r.get("sweep")]
        if swept:
            head = "| chunk_size |"
            for k in swept:
                head += (f" {k}:// cold seq MB/s | {k}:// daemon CPU s |"
                         f" {k}:// 4K first touch p50 / p99 ms | {k}:// 4K all reads p50 ms |"
                         f" {k}:// 4K from LMDB p50 / p99 ms |")
            lines += [f"Chunk-size sweep, all cold: sequential read median of {a.repeats} "
                      f"(min-max); {a.rand_reads} random 4K reads, of which \"first touch\" "
                      "are those that had to fetch their chunk from the store; \"from LMDB\": "
                      "random 4K reads after a remount on the filled cache and drop_caches:",
                      "", head,
                      "|---" * (1 + 5 * len(swept)) + "|"]
            for cs in a.chunk_sizes:
                row = f"| {cs} |"
                for k in swept:
                    s = stores[k]["sweep"].get(cs)
                    if not s:
                        row += " - | - | - | - | - |"
                        continue
                    runs = s.get("cold_runs") or [s["cold"]]
                    spread = (f" ({f(min(x['MBps'] for x in runs))}-"
                              f"{f(max(x['MBps'] for x in runs))})" if len(runs) > 1 else "")
                    rr = s["rand"]
                    row += (f" {f(s['cold']['MBps'])}{spread} |"
                            f" {f(s['cold'].get('daemon_cpu_s'), '{:.1f}')} |"
                            f" {f(rr.get('miss_p50_ms'), '{:.1f}')} /"
                            f" {f(rr.get('miss_p99_ms'), '{:.1f}')} (n={rr.get('misses')}) |"
                            f" {f(rr['p50_ms'], '{:.1f}')} |")
                    wr = s.get("warm_rand") or {}
                    row += (f" {f(wr.get('lmdb_p50_ms'), '{:.1f}')} /"
                            f" {f(wr.get('lmdb_p99_ms'), '{:.1f}')} |")
                lines.append(row)
            lines.append("")
        foreign = list(_walk(stores, "foreign_cores"))
        if foreign:
            lines.append(f"CPU used by other processes during the timed parts: at most "
                         f"{max(foreign):.2f} cores (a measurement is redone above "
                         f"{FOREIGN_LIMIT}, up to --retry-busy times).")
        busy = self.results["meta"].get("busy_steps") or []
        if busy:
            lines.append("WARNING: still busy after the retries: " + "; ".join(busy)
                         + ". Those figures are skewed.")
        return "\n".join(lines)


def _walk(obj: Any, key: str) -> Iterator[float]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, (int, float)):
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="image size, e.g. 256M, 1G (default 1G)")
    p.add_argument("--stores", default="file,s3",
                   help="comma list of store kinds: file, s3 (default file,s3)")
    p.add_argument("--chunk-sizes", default="",
                   help="optional sweep, e.g. 1M,2M,4M,8M,16M: cold seq + cold random 4K "
                        "per chunk size (config chunk_size)")
    p.add_argument("--sweep-only", dest="skip_default", action="store_true",
                   help="with --chunk-sizes: skip the default-config measurements")
    p.add_argument("--repeats", type=int, default=1,
                   help="cold sequential reads per configuration, each on a fresh cache "
                        "(median reported; default 1)")
    p.add_argument("--rand-reads", type=int, default=128,
                   help="cold random 4K reads, one per 1/N of the image (default 128)")
    p.add_argument("--seed", type=int, default=1234,
                   help="image content seed (1234 = the shared bench harness's object)")
    p.add_argument("--work-dir", help="keep data here (the generated image is reused); "
                                      "default: a temp dir, removed at the end")
    p.add_argument("--wait-idle", type=float, default=120, metavar="SECONDS",
                   help="before each measurement wait up to this long for the machine to be "
                        "idle (others' CPU use skews the figures; 0 = do not wait; "
                        "default 120)")
    p.add_argument("--retry-busy", type=int, default=2, metavar="N",
                   help="redo a measurement (up to N times) when other processes used more "
                        f"than {FOREIGN_LIMIT} of a core during it (default 2)")
    p.add_argument("--report", metavar="JSON",
                   help="only print the tables of an earlier run's --json file")
    p.add_argument("--json", dest="json_out", help="also write all results as JSON here")
    p.add_argument("--md", dest="md_out", help="also write the markdown tables here")
    a = p.parse_args(argv)
    a.size = parse_size(a.size)
    if a.size < 2 * MiB:
        p.error("--size must be at least 2M")
    a.stores = [s.strip() for s in a.stores.split(",") if s.strip()]
    for s in a.stores:
        if s not in ("file", "s3"):
            p.error(f"unknown store kind {s!r} (use file, s3)")
    a.chunk_sizes = [c.strip() for c in a.chunk_sizes.split(",") if c.strip()]
    for c in a.chunk_sizes:
        try:
            if parse_size(c) % 4096 or parse_size(c) == 0:
                p.error(f"chunk size {c} is not a positive multiple of 4 KiB (imagefs "
                        "also wants a multiple of the block size)")
        except Exception as exc:
            p.error(str(exc))
    if a.skip_default and not a.chunk_sizes:
        p.error("--sweep-only needs --chunk-sizes")
    if a.repeats < 1 or a.rand_reads < 1:
        p.error("--repeats and --rand-reads must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    global IDLE_WAIT
    a = parse_args(argv)
    IDLE_WAIT = a.wait_idle
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        for key in ("size", "seed", "rand_reads", "repeats", "chunk_sizes"):
            if key in saved["meta"].get("args", {}):
                setattr(a, key, saved["meta"]["args"][key])
        bench = Bench.__new__(Bench)
        bench.a, bench.results = a, saved
        print(bench.markdown())
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root (drop_caches and FUSE mounts need it)")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    own_work = a.work_dir is None
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="imagefs-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(a, work)
    rc = 0
    t_start = time.monotonic()
    try:
        make_image_file(bench.source, a.size, a.seed)
        for kind in a.stores:
            log(f"--- store {kind}://")
            with contextlib.ExitStack() as stack:
                if kind == "file":
                    shutil.rmtree(work / "store-file", ignore_errors=True)
                    store: StoreKind = FileKind(work / "store-file")
                else:
                    from seaweedfs import SeaweedServer  # tests/seaweedfs.py
                    shutil.rmtree(work / "seaweedfs", ignore_errors=True)
                    (work / "seaweedfs").mkdir()
                    t0 = time.perf_counter()
                    server = stack.enter_context(SeaweedServer(work / "seaweedfs"))
                    log(f"SeaweedFS up at {server.endpoint} in {time.perf_counter() - t0:.1f}s")
                    server.make_bucket("bench")
                    store = S3Kind(server, "bench")
                try:
                    bench.run_store(store)
                finally:
                    emergency_cleanup()
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc or 'SIGINT'}); cleaning up")
        bench.results["meta"]["interrupted"] = str(exc) or "SIGINT"
        rc = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # do not interrupt the cleanup
        emergency_cleanup()
        bench.results["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        bench.results["meta"]["busy_steps"] = BUSY_STEPS
        table = bench.markdown()
        print(table)
        if a.md_out:
            Path(a.md_out).write_text(table + "\n")
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(bench.results, indent=1, default=str))
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for mnt in work.glob("mnt"):
                with contextlib.suppress(OSError):
                    mnt.rmdir()
        log(f"done in {bench.results['meta']['elapsed_s']}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
