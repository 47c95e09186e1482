"""imagefs with its cache warm: the scenarios the shared harness cannot run.

The harness (bench/run.py) empties every system's cache dir before each mount, so its fio
rows are first-touch reads for everyone. Hypervisors read images their host has cached,
and issue 7's random-read target is "from our cache". So, against the server the harness
used: fill a cache dir by reading the image once (fsync waits until every chunk is in
LMDB), then, each on a fresh mount of that cache dir after drop_caches,

  seq      one `dd bs=1M` pass (LMDB -> page cache cold)
  fio1/4   fio randread 4 KiB, psync, O_DIRECT, 1 and 4 jobs, over the whole image

with the daemon's CPU for each, and the stats xattr checked to show that no byte came
from the store. `ceiling()` runs the same fio on ceiling_fs.py: Python FUSE's own limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cpu_of(pid: int) -> float:
    """user+sys seconds of a process and its waited-for children (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f) for f in fields[11:15]) / ticks


class WarmMount:
    """`imagefs mount --foreground` of one store on a kept cache dir."""

    def __init__(self, imagefs: str, store: str, cache: Path, mnt: Path, env: dict[str, str],
                 config: str | None) -> None:
        self.cmd = [imagefs, "mount", "--foreground", "--store", store,
                    "--cache-dir", str(cache), *(["--config", config] if config else []),
                    str(mnt)]
        self.mnt, self.env = mnt, env
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "WarmMount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imagefs mount failed: {' '.join(self.cmd)}")
            time.sleep(0.05)
        return self

    def cpu(self) -> float:
        assert self.proc is not None
        return _cpu_of(self.proc.pid)

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.mnt, "user.imagefs.stats"))

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False,
                       stderr=subprocess.DEVNULL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _fio(path: Path, jobs: int, size: int, runtime: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
         "--bs=4k", "--ioengine=psync", "--iodepth=1", "--direct=1", f"--numjobs={jobs}",
         f"--runtime={runtime}", "--time_based", f"--size={size}", "--group_reporting",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    pct = job["clat_ns"].get("percentile", {})
    return {"iops": job["iops"], "p50_ms": pct.get("50.000000", 0) / 1e6,
            "p99_ms": pct.get("99.000000", 0) / 1e6}


def run(imagefs: str, store: str, image_id: str, size: int, work: Path, env: dict[str, str],
        fio_runtime: int, config: str | None = None) -> dict[str, float]:
    """Fill a cache dir, then the warm scenarios; figures by name (MB = 10^6 bytes)."""
    cache, mnt = work / "warm-cache", work / "warm-mnt"
    path = mnt / "by-id" / image_id
    results: dict[str, float] = {}
    with WarmMount(imagefs, store, cache, mnt, env, config) as m:
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass
            os.fsync(f.fileno())  # returns once the chunks are in LMDB (handles.py)
    with WarmMount(imagefs, store, cache, mnt, env, config) as m:
        _drop_caches()
        before, cpu = m.stats(), m.cpu()
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                       capture_output=True)
        results["seq_MBps"] = size / (time.perf_counter() - t0) / 1e6
        results["seq_cpu_s"] = m.cpu() - cpu
        results["seq_store_bytes"] = m.stats()["store_bytes"] - before["store_bytes"]
    for jobs in (1, 4):
        with WarmMount(imagefs, store, cache, mnt, env, config) as m:
            _drop_caches()
            before, cpu = m.stats(), m.cpu()
            for name, value in _fio(path, jobs, size, fio_runtime).items():
                results[f"fio{jobs}_{name}"] = value
            results[f"fio{jobs}_cpu_s"] = m.cpu() - cpu
            results[f"fio{jobs}_store_bytes"] = m.stats()["store_bytes"] - before["store_bytes"]
    return results


def ceiling(size: int, work: Path, fio_runtime: int) -> dict[str, float]:
    """fio on ceiling_fs.py: the most a pyfuse3 filesystem answers on this machine."""
    mnt = work / "ceiling-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ceiling_fs.py")),
                             str(mnt), "--size", str(size)])
    results: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ceiling_fs.py did not mount")
            time.sleep(0.05)
        for jobs in (1, 4):
            for name, value in _fio(mnt / "file", jobs, size, fio_runtime).items():
                results[f"ceiling_fio{jobs}_{name}"] = value
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, stderr=subprocess.DEVNULL)
        proc.wait(timeout=30)
    return results


ROWS = [("seq_MBps", "seq re-read from the warm cache, page cache cold (MB/s)", "{:.0f}"),
        ("seq_cpu_s", "  daemon CPU during it (s)", "{:.2f}"),
        ("seq_store_bytes", "  bytes from the store during it", "{:.0f}"),
        ("fio1_iops", "fio randread 4K O_DIRECT 1 job, cache warm: IOPS", "{:.0f}"),
        ("fio1_p50_ms", "  p50 latency (ms)", "{:.3f}"),
        ("fio1_p99_ms", "  p99 latency (ms)", "{:.3f}"),
        ("fio1_cpu_s", "  daemon CPU during it (s)", "{:.2f}"),
        ("fio4_iops", "fio randread 4K O_DIRECT 4 jobs, cache warm: IOPS", "{:.0f}"),
        ("fio4_p99_ms", "  p99 latency (ms)", "{:.3f}"),
        ("fio4_cpu_s", "  daemon CPU during it (s)", "{:.2f}"),
        ("fio4_store_bytes", "  bytes from the store during fio", "{:.0f}"),
        ("ceiling_fio1_iops", "limit: in-memory pyfuse3 file (ceiling_fs.py), fio 1 job: IOPS",
         "{:.0f}"),
        ("ceiling_fio1_p99_ms", "  p99 latency (ms)", "{:.3f}"),
        ("ceiling_fio4_iops", "limit: in-memory pyfuse3 file, fio 4 jobs: IOPS", "{:.0f}"),
        ("ceiling_fio4_p99_ms", "  p99 latency (ms)", "{:.3f}")]


def markdown(results: dict[str, float], name: str = "imagefs") -> str:
    lines = [f"| imagefs, cache warm | {name} |", "|---|---|"]
    lines += [f"| {label} | {fmt.format(results[key])} |" for key, label, fmt in ROWS
              if key in results]
    return "\n".join(lines) + "\n"

