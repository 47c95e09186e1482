"""Prometheus metrics at http://HOST:PORT/metrics, when `metrics_listen` asks for them.

Values are read when Prometheus scrapes, from the daemon's status document (the one
`imagefs status` reads, with the counters of `user.imagefs.stats` in it), so no counter
is kept twice; only the store fetch latency is a histogram the reader fills as it goes.
Each daemon has its own registry (several can run in one process, as in tests), and the
HTTP server is prometheus_client's, in threads of its own: a scrape never runs on the
FUSE loop except for the one quick hop that reads the values (see Daemon.status).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily,
                                    Metric)
from prometheus_client.registry import Collector

from imagefs.config import listen_address
from imagefs.errors import InvalidValue

log = logging.getLogger(__name__)
PREFIX = "imagefs_"

# The daemon's counters (user.imagefs.stats) -> metric, help, and the label, if several
# counters are one metric. `images` and `read_errors` are the families imagefs_images
# and imagefs_read_errors_total; a test compares every counter with its metric.
COUNTERS: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "memory_hits": ("cache_hits", "Cache lookups answered, by tier", ("tier", "memory")),
    "lmdb_hits": ("cache_hits", "Cache lookups answered, by tier", ("tier", "lmdb")),
    "memory_misses": ("cache_misses", "Cache lookups that went to the next tier (memory "
                      "-> lmdb -> store), by tier", ("tier", "memory")),
    "lmdb_misses": ("cache_misses", "Cache lookups that went to the next tier (memory "
                    "-> lmdb -> store), by tier", ("tier", "lmdb")),
    "reads": ("reads", "Image read requests answered (the kernel's, after its page "
              "cache)", None),
    "read_bytes": ("read_bytes", "Bytes of images returned to readers (what the kernel's "
                   "page cache answered never reaches the daemon)", None),
    "store_requests": ("store_fetches", "Chunk fetches from the store (ranged GETs)", None),
    "store_bytes": ("store_fetched_bytes", "Bytes fetched from the store", None),
    "corrupt_chunks": ("corrupt_chunks", "Chunks from the store that failed their hashes",
                       None),
    "damaged_cache_entries": ("cache_damaged_entries", "Cached chunks that failed their "
                              "page checksums (dropped and refetched)", None),
    "read_timeouts": ("read_timeouts", "Reads answered EIO after read_timeout", None),
    "evictions_probation": ("cache_evictions", "Chunks evicted from the cache to stay "
                            "under its cap, by segment", ("segment", "probation")),
    "evictions_protected": ("cache_evictions", "Chunks evicted from the cache to stay "
                            "under its cap, by segment", ("segment", "protected")),
    "evicted_bytes": ("cache_evicted_bytes", "Bytes evicted from the cache", None),
    "store_timeouts": ("store_timeouts", "Store calls abandoned at their deadline", None),
    "abandoned_threads": ("abandoned_threads", "Threads ever abandoned in a stuck store "
                          "call", None),
}
# Counters that are gauges: they go down as well as up.
GAUGES: dict[str, tuple[str, str]] = {
    "cache_bytes": ("cache_bytes", "Bytes of chunks in the cache"),
    "cache_cap": ("cache_cap_bytes", "The cache's size cap (cache_size)"),
    "cache_protected_bytes": ("cache_protected_bytes", "Bytes of chunks read again after "
                              "they came in (evicted last)"),
    "catalog_generation": ("catalog_generation", "Changes applied to the catalog in memory"),
    "stuck_threads": ("stuck_threads", "Abandoned store calls that have not returned yet"),
}


class DaemonCollector(Collector):
    """The daemon's status document, as metric families, read at each scrape.

    `status()` is None while the daemon unmounts: the scrape then has no imagefs_ values.
    """

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        doc = self._status()
        if doc is None:
            return
        yield InfoMetricFamily(PREFIX + "daemon", "The mount this daemon serves",
                               {"store": doc["store"], "mountpoint": doc["mountpoint"],
                                "version": doc["version"]})
        yield from _counters(doc["counters"])
        yield _labelled(CounterMetricFamily, "read_errors", "Image reads that failed, by "
                        "the errno the reader got", "errno", doc["counters"]["read_errors"])
        catalog, inbox = doc["catalog"], doc["inbox"]
        yield _labelled(GaugeMetricFamily, "images", "Images in the catalog, by status",
                        "status", catalog["by_status"])
        yield _gauge("catalog_refresh_age_seconds", "Seconds since the last successful "
                     "catalog refresh (since the start, if none succeeded yet)",
                     catalog["refresh_age"])
        yield _counter("catalog_refreshes", "Successful catalog refreshes",
                       catalog["refreshes"])
        yield _counter("catalog_refresh_failures", "Catalog refreshes that failed",
                       catalog["refresh_failures"])
        yield _labelled(GaugeMetricFamily, "inbox_entries", "Files in the inbox, by state",
                        "state", inbox["by_state"])
        yield _counter("uploads", "Inbox files published as images", inbox["published"])
        yield _counter("uploaded_bytes", "Bytes of inbox files published",
                       inbox["published_bytes"])
        yield _counter("upload_failures", "Inbox files refused (reported as <name>.error)",
                       inbox["failed"])
        yield _counter("upload_retries", "Upload attempts that failed on store or disk "
                       "trouble and are tried again", inbox["retried"])
        yield _gauge("staging_bytes", "Bytes staged in the inbox spool", inbox["staging_bytes"])
        yield _gauge("staging_cap_bytes", "The inbox spool's limit (spool_size)",
                     inbox["staging_cap"])


def _counter(name: str, text: str, value: float) -> Metric:
    return CounterMetricFamily(PREFIX + name, text, value=value)


def _gauge(name: str, text: str, value: float) -> Metric:
    return GaugeMetricFamily(PREFIX + name, text, value=value)


def _labelled(kind: type[Metric], name: str, text: str, label: str,
              values: dict[str, float]) -> Metric:
    family = kind(PREFIX + name, text, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _counters(counters: dict[str, Any]) -> Iterator[Metric]:
    families: dict[str, Metric] = {}
    for key, (name, text, label) in COUNTERS.items():
        if label is None:
            yield _counter(name, text, counters[key])
            continue
        if name not in families:
            families[name] = CounterMetricFamily(PREFIX + name, text, labels=[label[0]])
        families[name].add_metric([label[1]], counters[key])
    yield from families.values()
    for key, (name, text) in GAUGES.items():
        yield _gauge(name, text, counters[key])


class MetricsServer:
    """The /metrics endpoint of one daemon: its registry and its HTTP server."""

    def __init__(self, listen: str, status: Callable[[], dict[str, Any] | None],
                 *collectors: Collector) -> None:
        """Bind now, so a busy port stops the mount before it exists."""
        host, port = listen_address(listen)
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(status))
        ProcessCollector(namespace="imagefs", registry=self.registry)
        for collector in collectors:
            self.registry.register(collector)
        try:
            self._server, _thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise InvalidValue(f"metrics_listen {listen}: {reason}") from None
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/metrics"
        log.info("serving Prometheus metrics at %s", self.url)

    def close(self) -> None:
        """Stop serving, without waiting: the server notices within half a second, and
        an unmount has no reason to wait that long (scrapes meanwhile get no imagefs_
        values, see DaemonCollector)."""
        def stop() -> None:
            self._server.shutdown()
            self._server.server_close()

        threading.Thread(target=stop, name="metrics shutdown", daemon=True).start()
