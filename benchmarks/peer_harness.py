#!/usr/bin/env python3
"""Run the shared FUSE-over-S3 peer harness (bench/run.py) with imagefs as one system.

imagefs does not serve raw bucket objects: its images live under a store prefix with a
manifest and block hashes. So this wrapper
  1. starts a SeaweedFS server (tests/seaweedfs.py) and makes the harness's bucket,
  2. writes the harness's test object into WORK/data/object.bin with the harness's own
     generator (same seed and size, so the harness reuses the file),
  3. uploads it as an imagefs image: `imagefs image create` to s3://BUCKET/imagefs,
  4. runs run.py against that server (--s3-endpoint/--metrics-url), with imagefs added
     as a custom system whose object path is by-id/<image id>; the peers (s3fs,
     rclone) read the same bytes as a plain object that run.py uploads itself.
Everything it starts is stopped on exit, also on Ctrl-C.

    PATH=/work/venv/bin:$PATH /work/venv/bin/python benchmarks/peer_harness.py \\
        --harness /work/shared/bench/run.py --out /tmp/peers.json [-- run.py options]

Options after `--` go to run.py unchanged (e.g. --quick, --systems, --fio-runtime).
Then, unless --no-warm, the warm-cache scenarios of benchmarks/warm_cache.py against the
same server (OUT-warm.json, OUT-warm.md): the harness empties every cache before each
mount, so its fio rows are first-touch reads for every system.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import warm_cache  # noqa: E402

DEFAULT_SYSTEMS = "local,s3fs-cache,s3fs-nocache,rclone160-full"
MOUNT_CMD = ("exec env AWS_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID={access_key} "
             "AWS_SECRET_ACCESS_KEY={secret_key} AWS_DEFAULT_REGION={region} "
             "{imagefs} mount --store s3://{bucket}/imagefs --foreground "
             "{config}--cache-dir {{cache}} {{mnt}}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] peer_harness: {msg}", file=sys.stderr, flush=True)


def load_harness(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_run", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    argv = sys.argv[1:]
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", default="/work/shared/bench/run.py",
                   help="path of the shared harness run.py")
    p.add_argument("--out", required=True, help="results JSON (run.py writes a .md beside it)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"peer systems to run besides imagefs (default {DEFAULT_SYSTEMS})")
    p.add_argument("--work-dir", help="keep data here (default: a temp dir)")
    p.add_argument("--imagefs-config", help="TOML config for the imagefs mount "
                                            "(e.g. another chunk_size)")
    p.add_argument("--system-name", default="imagefs", help="name of the imagefs column")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the warm-cache scenarios (benchmarks/warm_cache.py) after "
                        "the harness")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (the harness drops caches and mounts)")
    harness = load_harness(Path(a.harness))
    hargs = harness.parse_args(passthrough)  # the harness's own defaults (size, seed, ...)
    imagefs = shutil.which("imagefs") or str(Path(sys.executable).with_name("imagefs"))
    if not Path(imagefs).exists():
        raise SystemExit("imagefs not found on PATH or beside this Python")

    own_work = a.work_dir is None
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="imagefs-peers-")).resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    from seaweedfs import SeaweedServer

    def on_term(signum, _frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    rc = 1
    try:
        shutil.rmtree(work / "seaweedfs", ignore_errors=True)
        with SeaweedServer(work / "seaweedfs") as server:
            log(f"SeaweedFS at {server.endpoint}")
            server.make_bucket(hargs.bucket)
            obj = work / "data" / "object.bin"
            t0 = time.monotonic()
            harness.write_object_file(str(obj), hargs.size, hargs.seed)
            log(f"test object {hargs.size >> 20} MiB seed {hargs.seed} ready "
                f"({time.monotonic() - t0:.1f}s)")
            t0 = time.monotonic()
            env = {**os.environ, **server.environ(), "TQDM_DISABLE": "1"}
            store = f"s3://{hargs.bucket}/imagefs"
            cfg = ["--config", a.imagefs_config] if a.imagefs_config else []
            created = subprocess.run(
                [imagefs, "image", "create", *cfg, "--store", store, "--project", "bench",
                 "--name", "test.img", "--disk-format", "raw", str(obj)],
                env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if created.returncode:
                raise SystemExit(f"imagefs image create failed: {created.stderr.strip()}")
            image_id = created.stdout.strip().splitlines()[-1]
            log(f"imagefs image {image_id} created in {time.monotonic() - t0:.1f}s")
            mount_cmd = MOUNT_CMD.format(
                endpoint="{endpoint}", access_key="{access_key}", secret_key="{secret_key}",
                region="{region}", bucket=hargs.bucket, imagefs=imagefs,
                config=f"--config {a.imagefs_config} " if a.imagefs_config else "")
            cmd = [sys.executable, a.harness, *passthrough, "--out", a.out,
                   "--work-dir", str(work), "--s3-endpoint", server.endpoint,
                   "--metrics-url", server.metrics_url, "--access-key", server.access_key,
                   "--secret-key", server.secret_key, "--systems", a.systems,
                   "--system", a.system_name, "--mount-cmd", mount_cmd,
                   "--umount-cmd", "fusermount3 -u {mnt}",
                   "--object-path", "{mnt}/by-id/" + image_id,
                   "--list-path", "", "--write-path", "", "--requires", imagefs]
            log("running: " + " ".join(c if c != server.secret_key else "***" for c in cmd))
            # The harness handles SIGINT/SIGTERM itself and cleans up its mounts.
            proc = subprocess.Popen(cmd)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                rc = proc.wait()
                raise
            if not a.no_warm:
                log("imagefs with a warm cache (benchmarks/warm_cache.py)")
                runtime = hargs.fio_runtime or 15
                warm = warm_cache.run(imagefs, store, image_id, hargs.size, work, env,
                                      runtime, a.imagefs_config)
                warm.update(warm_cache.ceiling(hargs.size, work, runtime))
                out = Path(a.out)
                out.with_name(out.stem + "-warm.json").write_text(json.dumps(warm, indent=1))
                table = warm_cache.markdown(warm, a.system_name)
                out.with_name(out.stem + "-warm.md").write_text(table)
                print(table)
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
