"""A real, throwaway multi-process SeaweedFS cluster with an S3 gateway, for tests.

    with SeaweedCluster(tmp_path / "cluster") as s3:
        s3.make_bucket("images")
        s3.client().put_object(Bucket="images", Key="k", Body=b"...")
        s3.kill_volume(s3.volume_locations(s3.object_volume_ids("images", "k")[0])[0])
        s3.client().get_object(Bucket="images", Key="k")  # served by the other replica

Unlike seaweedfs.SeaweedServer (one `weed server` process), every part runs as
its own process, so single parts can be killed: one `weed master`, three
`weed volume` servers and one `weed filer -s3` (filer plus S3 gateway in one
process). All bind to 127.0.0.1 only, on explicit free ports, with S3
authentication on. SeaweedCluster is a SeaweedServer subclass and reuses its
client side (client(), make_bucket(), environ(), s3_counters(), the
readiness round-trip), so it fits wherever a SeaweedServer does.

Things about weed 4.x (4.48 here) clusters that shape this module:

* Flags. `weed master -peers=none` is single-master mode: no Raft election,
  the master serves at once. -defaultReplication=001 stores each volume twice
  on different servers of one rack, so all volume servers get the same
  -dataCenter and -rack. Every process gets -port and -port.grpc (= port +
  10000, weed's default, set explicitly anyway); volume servers and the filer
  find the master as ip:port and derive its gRPC port as port + 10000.
  `weed volume -mserver` is deprecated in favour of -master. -ip and -ip.bind
  default to a non-loopback address, so both are set everywhere. The filer's
  S3 gateway has its own -s3.port.grpc, and opens Iceberg (8181) and Lance
  (9101) ports unless -s3.port.iceberg=0 -s3.port.lance=0. Global flags
  (-logtostderr, -config_dir) go before the subcommand.
* Volume growth. master.toml is read from -config_dir; [master.volume_growth]
  copy_2 (the count for 001) defaults to 6, i.e. 12 volume files per new
  bucket, since each bucket is its own collection. It is lowered to 1 (one
  volume, two copies per bucket), so -max stays small; volume files are sparse.
* Unix sockets. The filer and its S3 gateway create
  /tmp/seaweedfs-filer-<port>.sock and /tmp/seaweedfs-s3-<port>.sock; master
  and volume servers create none. A SIGKILLed weed leaves them behind, so stop()
  removes every /tmp/seaweedfs-*-<port>.sock for all ports used.
* Readiness. Processes retry connecting to the master, but the filer backs off
  about 7 s after its first failed try, so the master starts first and the rest
  once its /dir/status answers. The cluster is ready when that lists every volume
  server (a volume server's first heartbeat already carries its volume list)
  and an S3 create-bucket/put/get round-trip works: the put needs a volume
  grown on two servers, so it proves replication works. Start takes about 3 s
  on a 2-core machine, as for SeaweedServer: the S3 gateway inside
  `weed filer -s3` starts 2 s after the filer.
* Metrics. The filer's -metricsPort also serves the S3 gateway's metrics (one
  registry per process), so s3_counters() works unchanged.
* Failures. The master drops a SIGKILLed volume server as soon as its heartbeat
  stream breaks (well under a second, no heartbeat timeout), marks the volumes
  that lost a copy unwritable, and grows new volumes on the servers left, so
  writes go on with two of three servers. Reads go on from the other copy, even
  GETs in flight at the kill (the filer has no chunk cache by default, so reads
  do reach the volume servers). With no copy left a GET fails with a 500
  InternalError, the first one only after ~13 s of the filer retrying. weed
  does not re-replicate: a volume stays at one copy until its server comes back
  (restart_volume() reuses the server's -dir and ports), when it reports its
  volumes in its first heartbeat and they are writable again.
* Stop. On SIGTERM master and volume servers (with -preStopSeconds=0) exit in
  about 2 s; the filer never does (it waits for gRPC streams, then hangs, as in
  SeaweedServer). stop() signals all processes at once and SIGKILLs whatever
  is left after a shared grace period (3 s), so it takes about 3 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from seaweedfs import (
    GRPC_OFFSET,
    HOST,
    SOCKET_DIR,
    SeaweedServer,
    _free_ports,
    _signal_group,
    _weed,
)

_RACK = ["-dataCenter=dc1", "-rack=rack1"]  # one rack for all, so 001 can place both copies


class SeaweedCluster(SeaweedServer):
    """weed master, `volumes` weed volume servers and weed filer -s3, on free loopback ports.

    Files in `workdir`: master.log, volume<i>.log, filer.log (the filer and
    S3 gateway; also `log_path`), s3.json (the identity), master.toml, and the
    data directories master/, volume<i>/ and filer/.
    """

    def __init__(self, workdir: Path, ready_timeout: float = 60.0, *, volumes: int = 3,
                 volume_max: int = 10, replication: str = "001") -> None:
        super().__init__(workdir, ready_timeout)
        if volumes < 2:
            raise ValueError("replication needs at least 2 volume servers")
        self.volume_count = volumes
        self.volume_max = volume_max  # volume slots per server; each bucket takes 1 on 2 servers
        self.replication = replication
        self._master: subprocess.Popen[bytes] | None = None
        self._volumes: list[subprocess.Popen[bytes] | None] = [None] * volumes
        # self._proc (SeaweedServer's) is the filer + S3 gateway, which
        # SeaweedServer._wait_ready watches during the round-trip.

    # -- addresses and files -------------------------------------------------

    @property
    def master_url(self) -> str:
        return f"http://{HOST}:{self._port('master')}"

    @property
    def filer_url(self) -> str:
        return f"http://{HOST}:{self._port('filer')}"

    def volume_address(self, i: int) -> str:
        """Volume server i as the master names it (ip:port)."""
        return f"{HOST}:{self._port(f'volume{i}')}"

    def volume_dir(self, i: int) -> Path:
        return self.workdir / f"volume{i}"

    @property
    def log_path(self) -> Path:
        """The filer's log, where the S3 gateway logs; see log_paths for all."""
        return self.workdir / "filer.log"

    @property
    def log_paths(self) -> dict[str, Path]:
        names = ["master", *(f"volume{i}" for i in range(self.volume_count)), "filer"]
        return {name: self.workdir / f"{name}.log" for name in names}

    @property
    def volume_pids(self) -> list[int | None]:
        """Pid of each volume server, None for one that is not running."""
        return [p.pid if p is not None and p.poll() is None else None for p in self._volumes]

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start all processes; return once all volume servers are registered and S3 works."""
        if self._master is not None or self._proc is not None:
            raise RuntimeError("SeaweedFS cluster already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = self.volume_count
        ports = _free_ports(with_grpc=3 + n, plain=1)  # metrics has no gRPC port
        master, filer, s3 = ports[:3]
        self._ports = {"master": master, "filer": filer, "s3": s3, "metrics": ports[-1],
                       **{f"volume{i}": port for i, port in enumerate(ports[3:3 + n])}}
        identity = {"name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (self.workdir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n")
        for name in ("master", "filer", *(f"volume{i}" for i in range(n))):
            (self.workdir / name).mkdir(exist_ok=True)
        started = time.monotonic()
        try:
            self._master = self._spawn("master", [
                "master", f"-port={master}", f"-port.grpc={master + GRPC_OFFSET}",
                f"-mdir={self.workdir / 'master'}", "-peers=none",
                f"-defaultReplication={self.replication}", "-volumeSizeLimitMB=64",
                "-telemetry=false"])
            # The filer backs off ~7 s when its first connection to the master
            # fails, so it starts only once the master answers.
            self._wait_registered([], started + self.ready_timeout)
            for i in range(n):
                self._volumes[i] = self._spawn_volume(i)
            self._proc = self._spawn("filer", [
                "filer", f"-port={filer}", f"-port.grpc={filer + GRPC_OFFSET}",
                f"-master={HOST}:{master}", f"-defaultStoreDir={self.workdir / 'filer'}",
                f"-metricsPort={self._port('metrics')}",  # also serves the S3 gateway's metrics
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + GRPC_OFFSET}",
                f"-s3.config={self.workdir / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-s3.autoCreateBucket=false"])  # as on AWS: a PUT to a missing bucket fails
            self._wait_registered(range(n), started + self.ready_timeout)
            self._wait_ready()  # SeaweedServer's S3 round-trip, watching the filer
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM every process, SIGKILL what is left after `grace` seconds in all.

        The filer never exits on SIGTERM, so this takes `grace` seconds. Safe to
        call twice, or after a start() that failed halfway.
        """
        procs = [p for p in (self._proc, *self._volumes, self._master) if p is not None]
        self._proc = self._master = None
        self._volumes = [None] * self.volume_count
        running = [p for p in procs if p.poll() is None]  # a reaped pid may be another's now
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Not the metrics port: its port + 10000 was never reserved, so a socket named
        # after that could belong to someone else's weed.
        self._remove_sockets(*(port for name, port in self._ports.items() if name != "metrics"))

    def kill_volume(self, i: int, *, wait: bool = True) -> None:
        """SIGKILL volume server i; with `wait`, return once the master has dropped it."""
        proc, self._volumes[i] = self._volumes[i], None
        if proc is None:
            raise RuntimeError(f"volume server {i} is not running")
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if wait:
            deadline = time.monotonic() + self.ready_timeout
            while self.volume_address(i) in self.registered_volume_servers():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"master still lists killed volume server {i} after "
                                       f"{self.ready_timeout:g} s; {self._log_tail()}")
                time.sleep(0.1)

    def restart_volume(self, i: int) -> None:
        """(Re)start volume server i on its old port and -dir; return once it is registered.

        A running server is SIGKILLed first.
        """
        if self._master is None:
            raise RuntimeError("SeaweedFS cluster not started")
        if self._volumes[i] is not None:
            self.kill_volume(i)
        self._remove_sockets(self._port(f"volume{i}"))
        self._volumes[i] = self._spawn_volume(i)
        self._wait_registered([i], time.monotonic() + self.ready_timeout)

    # -- what the master and filer know --------------------------------------

    def registered_volume_servers(self) -> set[str]:
        """ip:port of every volume server the master currently lists (/dir/status)."""
        status = self._get_json(f"{self.master_url}/dir/status")
        return {node["Url"]
                for dc in status["Topology"].get("DataCenters") or []
                for rack in dc.get("Racks") or []
                for node in rack.get("DataNodes") or []}

    def volume_locations(self, volume_id: int) -> list[int]:
        """Indices of the live volume servers holding volume_id (master's /dir/lookup)."""
        answer = self._get_json(f"{self.master_url}/dir/lookup?volumeId={volume_id}")
        by_address = {self.volume_address(i): i for i in range(self.volume_count)}
        return sorted(by_address[loc["url"]] for loc in answer.get("locations") or [])

    def object_volume_ids(self, bucket: str, key: str) -> list[int]:
        """Ids of the volumes holding an S3 object's chunks (filer's entry metadata)."""
        path = urllib.parse.quote(f"/buckets/{bucket}/{key}")
        entry = self._get_json(f"{self.filer_url}{path}?metadata=true")
        return sorted({chunk["fid"]["volume_id"] for chunk in entry.get("chunks") or []})

    # -- internals -----------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        command = [_weed(), "-logtostderr",  # else weed also writes glog files into /tmp
                   f"-config_dir={self.workdir}",  # where the master finds master.toml
                   *args[:1], f"-ip={HOST}", f"-ip.bind={HOST}", *args[1:]]
        # weed falls back to AWS_* credentials and reads WEED_* as config overrides.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        with open(self.workdir / f"{name}.log", "ab") as log:  # appends across restarts
            return subprocess.Popen(command, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _spawn_volume(self, i: int) -> subprocess.Popen[bytes]:
        port = self._port(f"volume{i}")
        return self._spawn(f"volume{i}", [
            "volume", f"-port={port}", f"-port.grpc={port + GRPC_OFFSET}",
            f"-dir={self.volume_dir(i)}", f"-max={self.volume_max}",
            f"-master={HOST}:{self._port('master')}", *_RACK, "-preStopSeconds=0"])

    def _wait_registered(self, indices: range | list[int], deadline: float) -> None:
        """Poll the master until it answers and lists the volume servers `indices`.

        Fails early if any process died.
        """
        wanted = {self.volume_address(i) for i in indices}
        last_error: Exception | None = None
        while True:
            self._check_alive()
            try:
                if wanted <= self.registered_volume_servers():
                    return
            except (OSError, ValueError, KeyError) as e:  # master not up yet
                last_error = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"volume servers {sorted(wanted)} not registered with the "
                                   f"master after {self.ready_timeout:g} s (last error: "
                                   f"{last_error!r}); {self._log_tail()}")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        named = {"master": self._master, "filer": self._proc,
                 **{f"volume{i}": p for i, p in enumerate(self._volumes)}}
        for name, proc in named.items():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"weed {name} exited with code {proc.returncode}; "
                                   f"{self._log_tail()}")

    @staticmethod
    def _get_json(url: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as e:  # weed answers errors (unknown volume...) in JSON
            body = e.read()
            if not body.startswith(b"{"):
                raise
        answer: dict[str, Any] = json.loads(body)
        return answer

    @staticmethod
    def _remove_sockets(*ports: int) -> None:
        """A killed weed leaves its unix sockets behind; they are named after its ports.

        Only the filer's and S3 gateway's HTTP ports have sockets in this cluster
        (`weed server` also makes *-grpc-<port + 10000>.sock ones); all are swept.
        """
        for port in [*ports, *(p + GRPC_OFFSET for p in ports)]:
            for path in SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def _log_tail(self, lines: int = 15) -> str:
        parts = []
        for path in self.log_paths.values():
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError as e:
                parts.append(f"cannot read {path}: {e}")
                continue
            parts.append(f"last lines of {path}:\n" + "\n".join(tail))
        return "\n".join(parts)
