"""Catalog records: the Glance v2 image fields, their validation and their JSON form."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from imagefs.errors import InvalidValue, ReadOnlyField

DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop")
CONTAINER_FORMATS = ("ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed")
VISIBILITIES = ("public", "community", "shared", "private")
STATUSES = ("queued", "saving", "uploading", "importing", "active", "deactivated",
            "killed", "deleted", "pending_delete")
MEMBER_STATUSES = ("pending", "accepted", "rejected")

# Glance's defaults for image_tag_quota and image_property_quota.
MAX_TAGS = 128
MAX_PROPERTIES = 128
MAX_NAME = 255
MAX_TAG = 255
MAX_PROPERTY_KEY = 255
MAX_PROPERTY_VALUE = 65535
MAX_INT32 = 2**31 - 1
MAX_MEMBERS = 128  # Glance's image_member_quota

CORE_FIELDS = (
    "id", "name", "status", "visibility", "owner", "disk_format", "container_format",
    "size", "virtual_size", "checksum", "os_hash_algo", "os_hash_value", "min_disk",
    "min_ram", "protected", "os_hidden", "tags", "created_at", "updated_at",
)
# Keys of Glance's JSON that are links or locations, never metadata.
LINK_FIELDS = ("self", "file", "schema", "locations", "direct_url")
RESERVED_KEYS = frozenset(CORE_FIELDS + LINK_FIELDS + ("location", "deleted", "deleted_at"))
RESERVED_PREFIX = "os_glance"
# Fields an admin may change after creation (ARCHITECTURE.md, "Metadata as xattrs").
MUTABLE_FIELDS = frozenset(("name", "visibility", "min_disk", "min_ram", "protected",
                            "os_hidden", "tags"))

_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,254}$")


def now_us() -> int:
    return time.time_ns() // 1000


def iso_time(us: int) -> str:
    """Glance's time format: ISO 8601, UTC, whole seconds."""
    return datetime.fromtimestamp(us // 1_000_000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_project(project: str) -> str:
    if not isinstance(project, str) or not _PROJECT_RE.match(project):
        raise InvalidValue(
            f"invalid project {project!r}: use 1-255 letters, digits, '_', '-', '.', '@', "
            "starting with a letter or digit")
    return project


def _is_text(value: str) -> bool:
    """Valid Unicode: no lone surrogates (which is how undecodable bytes arrive)."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def validate_name(name: str | None) -> str | None:
    if name is not None and not _is_text(name):
        raise InvalidValue(f"image name {name!r} is not UTF-8 text")
    if name is not None and len(name) > MAX_NAME:
        raise InvalidValue(f"image name is {len(name)} characters; Glance allows at most "
                           f"{MAX_NAME}")
    return name


def validate_choice(field: str, value: str | None, choices: tuple[str, ...],
                    nullable: bool = False) -> str | None:
    if value is None and nullable:
        return None
    if value not in choices:
        raise InvalidValue(f"invalid {field} {value!r}: expected one of {', '.join(choices)}")
    return value


def validate_int(field: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise InvalidValue(f"{field} must be an integer, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{field} must be an integer, not {value!r}")
    if not 0 <= value <= MAX_INT32:
        raise InvalidValue(f"{field} must be between 0 and {MAX_INT32}, not {value}")
    return value


def validate_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidValue(f"{field} must be true or false, not {value!r}")


def validate_tags(tags: Any) -> list[str]:
    if not isinstance(tags, (list, tuple)):
        raise InvalidValue("tags must be a list of strings")
    unique: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or not _is_text(tag):
            raise InvalidValue(f"invalid tag {tag!r}: tags are non-empty UTF-8 strings")
        if len(tag) > MAX_TAG:
            raise InvalidValue(f"tag {tag[:40]!r}... is {len(tag)} characters; at most {MAX_TAG}")
        if tag not in unique:
            unique.append(tag)
    if len(unique) > MAX_TAGS:
        raise InvalidValue(f"{len(unique)} tags; Glance allows at most {MAX_TAGS} per image")
    return unique


def validate_property(key: str, value: Any) -> tuple[str, str]:
    if not isinstance(key, str) or not key or len(key) > MAX_PROPERTY_KEY \
            or not _is_text(key):
        raise InvalidValue(f"invalid property key {key!r}: 1-{MAX_PROPERTY_KEY} characters "
                           "of UTF-8 text")
    if key in RESERVED_KEYS or key.startswith(RESERVED_PREFIX):
        raise ReadOnlyField(f"property key {key!r} is reserved by Glance")
    if not isinstance(value, str) or not _is_text(value):
        raise InvalidValue(f"property {key!r} must have a UTF-8 text value")
    if len(value) > MAX_PROPERTY_VALUE:
        raise InvalidValue(f"property {key!r} is longer than {MAX_PROPERTY_VALUE} characters")
    return key, value


def validate_properties(props: dict[str, str]) -> dict[str, str]:
    checked = dict(validate_property(k, v) for k, v in props.items())
    if len(checked) > MAX_PROPERTIES:
        raise InvalidValue(f"{len(checked)} properties; Glance allows at most {MAX_PROPERTIES}")
    return checked


@dataclasses.dataclass
class ImageRecord:
    """One image as the catalog knows it. Times are microseconds since the epoch."""

    id: str
    owner: str
    name: str | None = None
    status: str = "queued"
    visibility: str = "private"
    disk_format: str | None = None
    container_format: str | None = None
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    min_disk: int = 0
    min_ram: int = 0
    protected: bool = False
    os_hidden: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)
    properties: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: int = dataclasses.field(default_factory=now_us)
    updated_at: int = dataclasses.field(default_factory=now_us)
    # Image members (project -> pending/accepted/rejected); not part of the image JSON.
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    # When it entered pending_delete; it is purged once the grace period has passed.
    deleted_at: int | None = None

    @classmethod
    def new(cls, owner: str, **fields: Any) -> "ImageRecord":
        record = cls(id=str(uuid.uuid4()), owner=owner, **fields)
        record.validate()
        return record

    def validate(self) -> None:
        """Raise InvalidValue unless every field holds a value Glance would accept."""
        try:
            uuid.UUID(self.id)
        except (ValueError, TypeError, AttributeError):
            raise InvalidValue(f"invalid image id {self.id!r}: expected a UUID") from None
        validate_project(self.owner)
        validate_name(self.name)
        validate_choice("status", self.status, STATUSES)
        validate_choice("visibility", self.visibility, VISIBILITIES)
        validate_choice("disk_format", self.disk_format, DISK_FORMATS, nullable=True)
        validate_choice("container_format", self.container_format, CONTAINER_FORMATS,
                        nullable=True)
        self.min_disk = validate_int("min_disk", self.min_disk)
        self.min_ram = validate_int("min_ram", self.min_ram)
        self.protected = validate_bool("protected", self.protected)
        self.os_hidden = validate_bool("os_hidden", self.os_hidden)
        self.tags = validate_tags(self.tags)
        self.properties = validate_properties(self.properties)
        for project, status in self.members.items():
            validate_project(project)
            validate_choice("member status", status, MEMBER_STATUSES)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Compact form kept in manifests and the local catalog index."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def glance_json(self) -> dict[str, Any]:
        """The image as Glance's v2 API shows it: core fields, properties, links."""
        doc: dict[str, Any] = {}
        for key in CORE_FIELDS:
            value = getattr(self, key)
            if key in ("created_at", "updated_at"):
                value = iso_time(value)
            doc[key] = value
        doc.update(self.properties)
        doc["self"] = f"/v2/images/{self.id}"
        doc["file"] = f"/v2/images/{self.id}/file"
        doc["schema"] = "/v2/schemas/image"
        return doc

    def metadata_items(self) -> dict[str, str]:
        """Every metadata key with its text form, as the xattrs show them; nulls omitted."""
        items = {}
        for key, value in self.glance_json().items():
            if key in LINK_FIELDS or value is None:
                continue
            items[key] = json_text(value)
        return items

    @property
    def updated_mtime_ns(self) -> int:
        return self.updated_at * 1000

    @property
    def created_mtime_ns(self) -> int:
        return self.created_at * 1000


def json_text(value: Any) -> str:
    """A JSON value as Glance's JSON shows it, without quotes around strings."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_json(text: str, expected: str) -> Any:
    """JSON from an xattr value; anything else (nesting deep enough to overflow the
    parser's stack included) is InvalidValue saying what was `expected`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidValue(expected) from None


def parse_field(key: str, text: str) -> Any:
    """Turn the text an admin wrote for `key` into the typed value; validates it."""
    if key in ("min_disk", "min_ram"):
        return validate_int(key, text)
    if key in ("protected", "os_hidden"):
        return validate_bool(key, text)
    if key == "tags":
        return validate_tags(parse_json(text, 'tags must be a JSON array, e.g. ["ubuntu","lts"]'))
    if key == "name":
        return validate_name(text)
    if key == "visibility":
        return validate_choice(key, text, VISIBILITIES)
    if key == "disk_format":
        return validate_choice(key, text, DISK_FORMATS)
    if key == "container_format":
        return validate_choice(key, text, CONTAINER_FORMATS)
    if key in RESERVED_KEYS:
        raise ReadOnlyField(f"{key} is read-only")
    return validate_property(key, text)[1]
