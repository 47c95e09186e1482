"""The one file-name rule (ARCHITECTURE.md, "File names"), so scripts can rely on it."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from imagefs.records import DISK_FORMATS, ImageRecord

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255
# What a file name ends with when it holds a disk image: Glance's disk formats, and .img
# (cloud images ship as .img whatever their format).
DISK_EXTENSIONS = tuple(f".{f}" for f in DISK_FORMATS) + (".img",)


# Control characters (C0, DEL, C1: Unicode's "Cc") and the bidirectional controls, which
# make a listing show a name other than it is ("photo\u202egpj.exe" shows as
# "photoexe.jpg"), and "/".
_UNSAFE = re.compile("[/\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_component(text: str) -> str:
    """Make `text` a safe single path component: no '/', NUL or control characters."""
    cleaned = _UNSAFE.sub("_", text)
    if cleaned in (".", ".."):
        cleaned = "_" + cleaned
    return cleaned


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", "surrogateescape")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max(max_bytes, 0)].decode("utf-8", "ignore")


def split_extension(name: str, disk_format: str | None) -> tuple[str, str]:
    """(stem, extension): the format's extension, kept in the case the name has it."""
    ext = f".{disk_format}" if disk_format else ""
    if ext and name.lower().endswith(ext.lower()) and len(name) > len(ext):
        return name[: -len(ext)], name[-len(ext):]
    return name, ext


def is_temporary(name: str) -> bool:
    """Dotfiles and the names tools write under (`x.part`, `x.tmp`, `x~`): never images,
    neither in the inbox nor in a bulk import."""
    return name.startswith(".") or name.endswith((".part", ".tmp", "~"))


def image_name(file_name: str) -> str:
    """The image name a file name gives (inbox upload, mv, `image create`).

    One known disk-format extension is stripped, so `golden.img` and `golden.qcow2` both
    name the image `golden`, shown again with its detected format's extension.
    """
    lower = file_name.lower()
    for ext in DISK_EXTENSIONS:
        if lower.endswith(ext) and len(file_name) > len(ext):
            return file_name[:-len(ext)]
    return file_name


def _split(image: ImageRecord) -> tuple[str, str]:
    """(stem, extension) of the natural name; the extension includes its dot."""
    return split_extension(clean_component(image.name) if image.name else image.id,
                           image.disk_format)


def _compose(stem: str, suffix: str, ext: str) -> str:
    room = MAX_NAME_BYTES - len((suffix + ext).encode("utf-8", "surrogateescape"))
    return _truncate_utf8(stem, room) + suffix + ext


def natural_name(image: ImageRecord) -> str:
    stem, ext = _split(image)
    return _compose(stem, "", ext)


def assign_names(images: Iterable[ImageRecord]) -> dict[str, ImageRecord]:
    """Names for the images of one folder; the newest image keeps a contested name.

    Older images with the same name get `~<first 8 characters of id>` before the
    extension (the whole id if even that is taken).
    """
    newest_first = sorted(images, key=lambda i: (i.created_at, i.id), reverse=True)
    names: dict[str, ImageRecord] = {}
    losers = []
    for image in newest_first:
        name = natural_name(image)
        if name in names:
            losers.append(image)
        else:
            names[name] = image
    for image in losers:
        stem, ext = _split(image)
        for suffix in (f"~{image.id[:8]}", f"~{image.id}"):
            name = _compose(stem, suffix, ext)
            if name not in names:
                names[name] = image
                break
        else:
            log.warning("image %s has no free name in its folder; reach it through by-id/",
                        image.id)
    return names
