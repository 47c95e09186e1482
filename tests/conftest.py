"""Fixtures: stores (file:// and a real SeaweedFS S3 server), CLI runs and real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagefs.mountinfo import is_mounted
from seaweedfs import SeaweedServer

IMAGEFS = [sys.executable, "-m", "imagefs"]
# IMAGEFS_LONG=1 runs the soak, fuzz and crash tests at their full size (docs/reliability.md);
# the default suite runs each at a quick size.
LONG = os.environ.get("IMAGEFS_LONG") == "1"


@dataclass
class StoreHandle:
    """A store under test and how to reach it from a subprocess."""

    kind: str
    url: str
    env: dict[str, str] = field(default_factory=dict)
    server: SeaweedServer | None = None
    bucket: str = ""

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `imagefs ARGS --store URL`; image commands only."""
        return run_cli(*args, "--store", self.url, check=check,
                       env={**self.env, **(env or {})}, timeout=timeout)

    def create(self, path: Path, project: str = "acme", *extra: str) -> str:
        return self.cli("image", "create", "--project", project, *extra,
                        str(path)).stdout.strip()

    def object_path(self, key: str) -> Path:
        assert self.kind == "file"
        return Path(self.url.removeprefix("file://")) / key

    def read_object(self, key: str) -> bytes:
        if self.kind == "file":
            return self.object_path(key).read_bytes()
        assert self.server is not None
        return self.server.client().get_object(Bucket=self.bucket,
                                               Key=f"imagefs/{key}")["Body"].read()

    def has_object(self, key: str) -> bool:
        if self.kind == "file":
            return self.object_path(key).exists()
        assert self.server is not None
        listed = self.server.client().list_objects_v2(Bucket=self.bucket,
                                                      Prefix=f"imagefs/{key}")
        return any(o["Key"] == f"imagefs/{key}" for o in listed.get("Contents", []))

    def write_object(self, key: str, data: bytes) -> None:
        if self.kind == "file":
            self.object_path(key).write_bytes(data)
            return
        assert self.server is not None
        self.server.client().put_object(Bucket=self.bucket, Key=f"imagefs/{key}", Body=data)


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([*IMAGEFS, *args], capture_output=True, text=True, env=full_env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"imagefs {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def _s3_store(server: SeaweedServer) -> StoreHandle:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.make_bucket(bucket)
    return StoreHandle("s3", f"s3://{bucket}/imagefs", server.environ(), server, bucket)


@pytest.fixture
def file_store(tmp_path: Path) -> StoreHandle:
    root = tmp_path / "store"
    root.mkdir()
    return StoreHandle("file", f"file://{root}")


@pytest.fixture
def s3_store(s3_server: SeaweedServer) -> StoreHandle:
    return _s3_store(s3_server)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    """Every test that takes `store` runs against file:// and against real S3."""
    if request.param == "file":
        return request.getfixturevalue("file_store")
    return request.getfixturevalue("s3_store")


class Mount:
    """A real mount of the daemon in the foreground, always unmounted at the end."""

    def __init__(self, store: StoreHandle, root: Path, cache_dir: Path | None = None,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 prelude: str = "") -> None:
        self.store = store
        self.path = root / f"mnt-{uuid.uuid4().hex[:6]}"
        self.path.mkdir()
        self.cache_dir = cache_dir or root / "cache"
        self.log_path = root / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.log_path.touch()
        self.extra = extra
        self.env = {**os.environ, **store.env, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        # Python run in the daemon before it starts: the way tests inject faults.
        self.command = [*IMAGEFS] if not prelude else [
            sys.executable, "-c",
            f"import sys\n{prelude}\nfrom imagefs.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))"]
        self.tracebacks_expected = False

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the daemon without waiting for its mount (`start` waits)."""
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*self.command, "mount", "--foreground", "--store", self.store.url, "--cache-dir",
             str(self.cache_dir), *self.extra, str(self.path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self.process

    def start(self, timeout: float = 30) -> "Mount":
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not is_mounted(self.path):
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mount not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def stats(self) -> dict[str, int]:
        import json
        return json.loads(os.getxattr(self.path, "user.imagefs.stats"))

    def __truediv__(self, other: str) -> Path:
        return self.path / other


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder every local user can reach (pytest's tmp dirs are root-only).

    Request it before `mount` so it is removed after the mounts in it are gone.
    """
    path = Path(tempfile.mkdtemp(prefix="imagefs-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Mount]]:
    """Mounts made by a test; unmounted (lazily, then killed) even when it fails.

    A daemon log with a traceback fails the test, unless the test expects one.
    """
    made: list[Mount] = []
    yield made
    for mount in made:
        mount.stop()
    for mount in made:
        text = mount.log()
        if "Traceback" in text and not mount.tracebacks_expected:
            pytest.fail(f"daemon logged a traceback:\n{text}")


@pytest.fixture
def mount(tmp_path: Path, mounts: list[Mount]):
    """mount(store, **kw) -> a started Mount that the test does not need to stop."""

    def start(store: StoreHandle, root: Path | None = None,
              **kwargs) -> Mount:  # type: ignore[no-untyped-def]
        m = Mount(store, root or tmp_path, **kwargs)
        mounts.append(m)
        return m.start()

    return start


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """Deterministic pseudo-random content, so failures are reproducible."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, 1 << 20)
            f.write(rng.randbytes(n))
            remaining -= n
    return path


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed; run the README's test command")
