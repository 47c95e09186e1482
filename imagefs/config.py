"""Settings: defaults, the TOML config file, and command-line overrides (in that order)."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from imagefs.access import AccessSettings
from imagefs.errors import InvalidValue
from imagefs.quotas import Quota
from imagefs.records import validate_project

DEFAULT_CONFIG = Path("/etc/imagefs/imagefs.toml")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """'512M', '10G', '4096' -> bytes (binary units, as `du -h` and qemu-img use)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidValue(f"size must not be negative: {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise InvalidValue(f"invalid size {value!r}: use a number with an optional unit, "
                           "e.g. 512M or 10G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: float) -> str:
    """Binary units, as cache_size and spool_size are written: 512B, 77.9G."""
    unit = "B"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            break
        n /= 1024
    return f"{n:.0f}B" if unit == "B" else f"{n:.1f}{unit}"


@dataclasses.dataclass
class S3Settings:
    """Anything left None falls back to boto3's standard chain (env, profiles, IMDS)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "path"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    profile: str | None = None
    max_connections: int = 16
    part_size: int = 16 << 20


@dataclasses.dataclass
class Settings:
    store: str | None = None
    cache_dir: Path | None = None
    cache_size: int = 10 << 30
    chunk_size: int = 4 << 20
    # The unit of the sha256 check of fetched data (a 10 GiB image has a 1.3 MB block
    # table); cached data is checked by the cache's 4 KiB page checksums instead.
    block_size: int = 256 << 10
    memory_cache: int = 256 << 20
    prefetch_max: int = 64 << 20
    # The kernel's readahead for the mount (its bdi's read_ahead_kb; 0: the kernel's
    # 128 KiB). Larger means fewer, larger FUSE reads from sequential readers.
    read_ahead: int = 1 << 20
    # A cached chunk read again this long after it came in is protected from eviction;
    # re-reads sooner (one pass reading a chunk in pieces) are not reuse (cache.py).
    cache_reuse_gap: float = 10.0
    refresh_interval: float = 10.0
    # Refreshes read the change log; this often they list every manifest as well, to
    # catch changes the log missed (a writer that died between manifest and log entry).
    full_refresh_interval: float = 3600.0
    # A read that needs the store answers EIO after this long, whatever the store does.
    read_timeout: float = 10.0
    # rm, mv and setfattr on catalog files answer within this long.
    gesture_timeout: float = 30.0
    delete_grace: float = 86400.0
    spool_dir: Path | None = None
    spool_size: int = 20 << 30
    settle_time: float = 3.0
    entry_timeout: float = 1.0
    allow_other: bool = False
    foreground: bool = False
    log_level: str = "INFO"
    log_file: Path | None = None
    # Where `imagefs mount` mounts without a MOUNTPOINT argument (imagefs@.service).
    mountpoint: Path | None = None
    # mount -o ro: the kernel refuses every change (inbox uploads, rm, mv, setfattr).
    read_only: bool = False
    # "HOST:PORT": serve Prometheus metrics at http://HOST:PORT/metrics (metrics.py).
    metrics_listen: str | None = None
    projects: list[str] = dataclasses.field(default_factory=list)
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)
    # None: no [access] table, so every caller sees everything (docs/access.md).
    access: AccessSettings | None = None
    quotas: dict[str, Quota] = dataclasses.field(default_factory=dict)

    def effective_cache_dir(self) -> Path:
        """The cache dir, defaulting to one per store so two catalogs never share one."""
        if self.cache_dir:
            return Path(self.cache_dir)
        import hashlib
        tag = hashlib.sha256((self.store or "").encode()).hexdigest()[:12]
        base = Path("/var/cache/imagefs") if os.geteuid() == 0 else \
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagefs"
        return base / tag


_SIZE_KEYS = {"cache_size", "chunk_size", "block_size", "memory_cache", "prefetch_max",
              "read_ahead", "spool_size"}


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidValue(f"{where}: expected a list of user names and @group names")
    return value


def _access(value: Any, where: str) -> AccessSettings:
    if not isinstance(value, dict):
        raise InvalidValue(f"{where}: [access] must be a table")
    access = AccessSettings()
    for key, item in value.items():
        if key in ("admins", "readers"):
            setattr(access, key, _names(item, f"{where} [access] {key}"))
        elif key == "projects":
            if not isinstance(item, dict):
                raise InvalidValue(f"{where}: [access.projects] must be a table")
            access.projects = {p: _names(v, f"{where} [access.projects] {p}")
                               for p, v in item.items()}
            for project in access.projects:
                validate_project(project)
        elif key == "anonymous":
            if item not in ("public", "none"):
                raise InvalidValue(f"{where}: [access] anonymous must be \"public\" or "
                                   f"\"none\", not {item!r}")
            access.anonymous = item
        else:
            raise InvalidValue(f"{where}: unknown setting {key!r} in [access]")
    return access


def _quotas(value: Any, where: str) -> dict[str, Quota]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InvalidValue(f"{where}: [quotas] holds one table per project: [quotas.acme]")
    quotas = {}
    for project, limits in value.items():
        if project != "*":
            validate_project(project)
        unknown = set(limits) - {"images", "stored", "staging"}
        if unknown:
            raise InvalidValue(f"{where}: unknown quota {sorted(unknown)[0]!r} for {project} "
                               "(images, stored, staging)")
        images = limits.get("images")
        if images is not None and (isinstance(images, bool) or not isinstance(images, int)
                                   or images < 0):
            raise InvalidValue(f"{where}: [quotas.{project}] images must be a count")
        quotas[project] = Quota(
            images, *(parse_size(limits[k]) if k in limits else None
                      for k in ("stored", "staging")))
    return quotas


def _apply(target: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise InvalidValue(f"{where}: unknown setting {key!r}")
        if key == "s3":
            if not isinstance(value, dict):
                raise InvalidValue(f"{where}: [s3] must be a table")
            _apply(target.s3, value, f"{where} [s3]")
            continue
        if key == "access":
            target.access = _access(value, where)
            continue
        if key == "quotas":
            target.quotas = _quotas(value, where)
            continue
        if key in _SIZE_KEYS or key == "part_size":
            value = parse_size(value)
        elif key in ("cache_dir", "log_file", "spool_dir", "mountpoint") and value is not None:
            value = Path(value)
        setattr(target, key, value)


def listen_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9464', '[::1]:9464', ':9464' (every address) -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidValue(f"metrics_listen {text!r}: expected HOST:PORT, e.g. "
                           "127.0.0.1:9464")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def config_path(explicit: str | None) -> Path | None:
    """--config, else $IMAGEFS_CONFIG, else /etc/imagefs/imagefs.toml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("IMAGEFS_CONFIG"):
        return Path(os.environ["IMAGEFS_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def load_settings(explicit_config: str | None = None,
                  overrides: dict[str, Any] | None = None) -> Settings:
    settings = Settings()
    path = config_path(explicit_config)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise InvalidValue(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidValue(f"config file {path} is not valid TOML: {exc}") from None
        _apply(settings, data, str(path))
    _apply(settings, {k: v for k, v in (overrides or {}).items() if v is not None}, "option")
    for key in ("read_timeout", "gesture_timeout", "refresh_interval",
                "full_refresh_interval", "settle_time", "cache_reuse_gap"):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidValue(f"{key} must be a positive number of seconds, not {value!r}")
    if settings.metrics_listen is not None:
        listen_address(settings.metrics_listen)
    if settings.block_size <= 0 or settings.chunk_size % settings.block_size:
        raise InvalidValue(f"chunk_size ({settings.chunk_size}) must be a multiple of "
                           f"block_size ({settings.block_size})")
    return settings
