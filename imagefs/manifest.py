"""The per-image manifest: the catalog record plus what is needed to verify its data.

Store layout (keys relative to the store root):
  data/<id>                  the image bytes, immutable once written
  blocks/<id>                sha256 digests, one per verification block, concatenated
  manifests/<id>.msgpack     this manifest; written last, so it is the commit point
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack

from imagefs.errors import ManifestDamaged
from imagefs.records import ImageRecord

FORMAT_VERSION = 1
BLOCK_ALGO = "sha256"
DIGEST_SIZE = 32
MANIFEST_PREFIX = "manifests/"
DATA_PREFIX = "data/"
BLOCKS_PREFIX = "blocks/"
MANIFEST_SUFFIX = ".msgpack"


def data_key(image_id: str) -> str:
    return f"{DATA_PREFIX}{image_id}"


def blocks_key(image_id: str) -> str:
    return f"{BLOCKS_PREFIX}{image_id}"


def manifest_key(image_id: str) -> str:
    return f"{MANIFEST_PREFIX}{image_id}{MANIFEST_SUFFIX}"


def image_id_of(key: str) -> str | None:
    """The image id a manifest key names, or None for anything else under manifests/."""
    name = key[len(MANIFEST_PREFIX):] if key.startswith(MANIFEST_PREFIX) else ""
    return name[: -len(MANIFEST_SUFFIX)] if name.endswith(MANIFEST_SUFFIX) else None


@dataclasses.dataclass
class Manifest:
    record: ImageRecord
    block_size: int
    blocks_sha256: str
    block_algo: str = BLOCK_ALGO

    @property
    def block_count(self) -> int:
        size = self.record.size or 0
        return -(-size // self.block_size)

    def encode(self) -> bytes:
        return msgpack.packb({
            "format": FORMAT_VERSION,
            "image": self.record.to_dict(),
            "data_key": data_key(self.record.id),
            "blocks_key": blocks_key(self.record.id),
            "block_size": self.block_size,
            "block_algo": self.block_algo,
            "blocks_sha256": self.blocks_sha256,
        })

    @classmethod
    def decode(cls, raw: bytes, where: str = "manifest") -> "Manifest":
        try:
            doc: dict[str, Any] = msgpack.unpackb(raw)
            if doc.get("format") != FORMAT_VERSION:
                raise ManifestDamaged(f"{where}: unsupported manifest format {doc.get('format')!r}")
            if doc.get("block_algo") != BLOCK_ALGO:
                raise ManifestDamaged(f"{where}: unsupported block hash {doc.get('block_algo')!r}")
            record = ImageRecord.from_dict(doc["image"])
            record.validate()
            return cls(record=record, block_size=int(doc["block_size"]),
                       blocks_sha256=str(doc["blocks_sha256"]))
        except ManifestDamaged:
            raise
        except Exception as exc:
            raise ManifestDamaged(f"{where} is damaged: {exc}") from exc


def check_block_table(manifest: Manifest, table: bytes) -> bytes:
    """Return `table` if it is the block list the manifest names, else raise StoreError."""
    if hashlib.sha256(table).hexdigest() != manifest.blocks_sha256 or \
            len(table) != manifest.block_count * DIGEST_SIZE:
        raise ManifestDamaged(f"block table of image {manifest.record.id} does not match its "
                         "manifest")
    return table
