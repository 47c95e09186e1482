"""The inode number spaces of a mount, in one place so they can never overlap.

Numbers are derived from what they name (a folder's path, an image's id, an inbox
entry's id), so they are stable across remounts and hosts and need no table:

    1                     the mount root
    bit 60 set            a folder (hash of its path)
    bit 61 set            an image file (high bits of its id)
    bit 59 set            an inbox file (hash of its entry id)
"""

from __future__ import annotations

import hashlib
import uuid

ROOT_INODE = 1
_INBOX_BIT = 1 << 59
_DIR_BIT = 1 << 60
_FILE_BIT = 1 << 61


def _hash64(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def dir_inode(path: tuple[str, ...]) -> int:
    return ROOT_INODE if not path else _DIR_BIT | (_hash64("\0".join(path)) & (_DIR_BIT - 1))


def image_inode(image_id: str) -> int:
    return _FILE_BIT | ((uuid.UUID(image_id).int >> 64) & (_FILE_BIT - 1))


def inbox_inode(entry_id: str) -> int:
    return _INBOX_BIT | (_hash64(entry_id) & (_INBOX_BIT - 1))


def is_inbox_inode(inode: int) -> bool:
    return inode & ~(_INBOX_BIT - 1) == _INBOX_BIT
