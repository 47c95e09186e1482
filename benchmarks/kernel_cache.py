#!/usr/bin/env python3
"""What per-caller views cost in kernel caching: `ls -l` and `stat` with and without it.

An --allow-other mount shares the kernel's name and attribute caches between users, so
entries whose visibility depends on the caller are answered with zero timeouts (every
stat reaches the daemon). This measures that against the same catalog served with 1 s
kernel caching (no [access] table: one view for everyone, the cheapest any design with
kernel-enforced permissions could be), in one run:

  ls -l FOLDER     a folder of --folder images, listed with attributes (`ls -l`), cold
                   (first listing after mount) and warm (repeated, median of 5)
  stat PATHS       os.stat of --paths image paths in projects/acme/ (every image of the
                   catalog; caller-dependent), then of the public ones in public/ (the
                   same for every caller), each twice, in one process

Images are written straight into a file:// store (tiny data, real manifests), so the
figures are about names and attributes, not data. Run as root (it mounts, and runs the
access-controlled side as a user made for it):

    .venv/bin/python benchmarks/kernel_cache.py [--folder 2000] [--paths 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagefs.catalog_store import CatalogStore  # noqa: E402
from imagefs.mountinfo import is_mounted  # noqa: E402
from imagefs.pipeline import upload_image  # noqa: E402
from imagefs.records import ImageRecord  # noqa: E402
from imagefs.stores.file import FileStore  # noqa: E402

USER = "ifs-bench"
PROBE = """
import os, sys, time, json, subprocess
groups = json.loads(sys.stdin.read())
folder = sys.argv[1]
def ls():
    t = time.perf_counter()
    subprocess.run(["ls", "-l", folder], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t
out = {"ls_cold": ls()}
out["ls_warm"] = sorted(ls() for _ in range(5))[2]
for group, paths in groups.items():
    for label in ("1st", "2nd"):
        t = time.perf_counter()
        for p in paths:
            os.stat(p)
        out[f"{group}_{label}"] = time.perf_counter() - t
print(json.dumps(out))
"""
COLUMNS = {"ls_cold": "ls -l {folder} cold", "ls_warm": "ls -l {folder} warm",
           "projects_1st": "stat {paths} in projects/ (1st)",
           "projects_2nd": "stat {paths} in projects/ (2nd)",
           "public_1st": "stat {public} in public/ (1st)",
           "public_2nd": "stat {public} in public/ (2nd)", "daemon_cpu": "daemon CPU s"}


def populate(root: Path, folder: int, paths: int) -> list[tuple[str, str]]:
    """(visibility folder, name) of every image; `folder` of them in projects/acme/private."""
    catalog = CatalogStore(FileStore(str(root)))
    made = []
    for n in range(paths):
        visibility = "private" if n < folder else "public"
        record = ImageRecord.new("acme", name=f"img-{n:05d}", visibility=visibility,
                                 status="saving", disk_format="raw")
        upload_image(catalog, io.BytesIO(b"x" * 512), record, 4096)
        made.append((visibility, f"img-{n:05d}.raw"))
    return made


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True)
        return pwd.getpwnam(USER)


def measure(store: Path, work: Path, images: list[tuple[str, str]], config: str,
            as_user: pwd.struct_passwd | None) -> dict[str, float]:
    mnt = work / f"mnt-{len(os.listdir(work))}"
    mnt.mkdir()
    conf = work / f"c-{mnt.name}.toml"
    conf.write_text(config)
    daemon = subprocess.Popen([sys.executable, "-m", "imagefs", "mount", "--foreground",
                               "--allow-other", "--store", f"file://{store}", "--cache-dir",
                               str(work / f"cache-{mnt.name}"), "--config", str(conf),
                               str(mnt)], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("the mount did not come up")
            time.sleep(0.05)
        cpu_before = _cpu(daemon.pid)
        command = ["/usr/bin/python3", "-c", PROBE, str(mnt / "projects/acme/private")]
        if as_user is not None:
            command = ["setpriv", f"--reuid={as_user.pw_uid}", f"--regid={as_user.pw_gid}",
                       "--init-groups", *command]
        groups = {"projects": [str(mnt / f"projects/acme/{v}/{n}") for v, n in images],
                  "public": [str(mnt / f"public/{n}") for v, n in images if v == "public"]}
        result = subprocess.run(command, input=json.dumps(groups), capture_output=True,
                                text=True, check=True)
        figures = json.loads(result.stdout)
        figures["daemon_cpu"] = _cpu(daemon.pid) - cpu_before
        return figures
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        daemon.wait(timeout=30)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=int, default=2000, help="images in the listed folder")
    parser.add_argument("--paths", type=int, default=10000, help="image paths to stat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagefs-kcache-"))
    work.chmod(0o755)
    store = work / "store"
    store.mkdir()
    try:
        start = time.perf_counter()
        images = populate(store, args.folder, max(args.paths, args.folder))
        print(f"catalog: {len(images)} images written in {time.perf_counter() - start:.1f}s")
        user = ensure_user()
        variants = {
            "kernel caching (no [access], entry_timeout 1 s)": ("", None),
            "per-caller views ([access] table)":
                (f'[access]\n[access.projects]\nacme = ["{USER}"]\n', user),
        }
        rows = {}
        for label, (config, who) in variants.items():
            runs = [measure(store, work, images, config, who) for _ in range(args.repeats)]
            rows[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        public = sum(1 for v, _ in images if v == "public")
        names = {k: c.format(folder=args.folder, paths=len(images), public=public)
                 for k, c in COLUMNS.items()}
        print(f"\nseconds, median of {args.repeats} mounts\n")
        print("| | " + " | ".join(rows) + " |")
        print("|---|" + "---|" * len(rows))
        for key, name in names.items():
            print(f"| {name} | " + " | ".join(f"{row[key]:.3f}" for row in rows.values())
                  + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
