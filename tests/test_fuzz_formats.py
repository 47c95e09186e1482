"""Fuzzing the format checks: real images with mutated headers, through the upload pipeline.

Each mutant must be published with a sane record, or refused (UnsafeImage is an
InvalidValue) leaving nothing in the store; any other exception is a bug. The seeds are
small images made once per session by qemu-img, xorriso and a GPT written in Python, and
a text vmdk descriptor (text once crashed the vmdk inspector). The
quick size runs QUICK_EXAMPLES mutants per seed, derandomized; IMAGEFS_LONG=1 runs
LONG_EXAMPLES per seed with fresh randomness.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import LONG
from imagefs import manifest as mf
from imagefs.catalog_store import CatalogStore
from imagefs.errors import InvalidValue
from imagefs.pipeline import discard, upload_image
from imagefs.records import DISK_FORMATS, ImageRecord
from imagefs.stores.file import FileStore
from test_inspect import gpt_disk, iso_image, qemu_image

KiB, MiB = 1 << 10, 1 << 20
QUICK_EXAMPLES, LONG_EXAMPLES = 100, 1500
BLOCK_SIZE = 256 * KiB
T = TypeVar("T")


@dataclass(frozen=True)
class Seed:
    kind: str
    data: bytes
    hot: tuple[tuple[int, int], ...]  # byte ranges whose fields the checks read


def _u(layout: str, data: bytes, offset: int) -> int:
    return struct.unpack_from(layout, data, offset)[0]


def _hot(kind: str, data: bytes) -> list[tuple[int, int]]:
    """Where the fields are: headers, table starts, footers; mutations aim there."""
    end = len(data)
    if kind == "qcow2":
        l1, refcounts = _u(">Q", data, 40), _u(">Q", data, 48)
        block = _u(">Q", data, refcounts)
        return [(0, 512), (l1, l1 + 64), (refcounts, refcounts + 64), (block, block + 64)]
    if kind.startswith("vmdk"):
        directory = _u("<Q", data, 56) * 512
        table = _u("<I", data, directory) * 512
        return [(0, 512), (512, 1024), (directory, directory + 64), (table, table + 64),
                (end - 1536, end)]
    if kind == "vhd":
        dynamic = _u(">Q", data, 16)
        bat = _u(">Q", data, dynamic + 16)
        return [(0, 512), (dynamic, dynamic + 1024), (bat, bat + 64), (end - 512, end)]
    if kind == "vhdx":
        return [(0, 64), (64 * KiB, 64 * KiB + 128), (128 * KiB, 128 * KiB + 128),
                (192 * KiB, 192 * KiB + 128), (256 * KiB, 256 * KiB + 128),
                (2 * MiB, 2 * MiB + 64), (3 * MiB, 3 * MiB + 256),
                (3 * MiB + 64 * KiB, 3 * MiB + 64 * KiB + 64)]
    if kind == "vdi":
        return [(0, 512), (512, 576)]
    if kind == "text":
        return [(0, end)]
    if kind == "iso":
        return [(0, 512), (32 * KiB, 34 * KiB), (34 * KiB, 34 * KiB + 64)]
    assert kind == "gpt"
    return [(0, 512), (512, 604), (1024, 1152), (end - 512, end - 420)]


def _descriptor(path: Path) -> Path:
    """Text that the vmdk inspector reads as a descriptor (and Glance refuses)."""
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             'createType="monolithicFlat"', "", "# Extent description",
             'RW 2048 FLAT "disk-flat.vmdk" 0', "", "# The Disk Data Base", "#DDB"]
    lines += [f'ddb.comment{n} = "{"x" * 40}"' for n in range(24)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_seeds(tmp: Path) -> dict[str, Seed]:
    """One small image of each kind, with data in it so its tables point somewhere."""
    small = 256 * KiB
    paths = {
        "qcow2": qemu_image(tmp, "qcow2", size=small),
        "vmdk-sparse": qemu_image(tmp, "vmdk", "-o", "subformat=monolithicSparse",
                                  size=small),
        "vmdk-stream": qemu_image(tmp, "vmdk", "-o", "subformat=streamOptimized",
                                  size=small),
        "vhd": qemu_image(tmp, "vpc", size=small),
        "vhdx": qemu_image(tmp, "vhdx", "-o", "block_size=1M", size=small),
        "vdi": qemu_image(tmp, "vdi", size=small),
        "iso": iso_image(tmp, size=64 * KiB),
        "gpt": gpt_disk(tmp / "gpt.raw", MiB),
        "text": _descriptor(tmp / "descriptor.vmdk"),
    }
    seeds = {}
    for kind, path in paths.items():
        data = path.read_bytes()
        seeds[kind] = Seed(kind, data, tuple(_hot(kind, data)))
    return seeds


class Picker(Protocol):
    """What mutant() draws with: random.Random, or hypothesis through _Drawn."""

    def randint(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...


EDGES = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1,
         2**64 - 1, 1 << 40)
EDITS = ("flip", "set", "set", "bytes", "splice", "zero")
ENDINGS = ("keep", "keep", "truncate", "truncate-near-field", "extend")


def mutant(seed: Seed, pick: Picker) -> tuple[bytes, list[str]]:
    """`seed` with one to four header fields mutated, and perhaps cut or extended."""
    data = bytearray(seed.data)
    steps = []
    for _ in range(pick.randint(1, 4)):
        start, stop = pick.choice(seed.hot)
        at = pick.randint(start, stop - 1)
        edit = pick.choice(EDITS)
        if edit == "flip":
            data[at] ^= 1 << pick.randint(0, 7)
        elif edit == "set":
            width, order = pick.choice((1, 2, 4, 8)), pick.choice(("little", "big"))
            value = pick.choice(EDGES + (None,))
            value = pick.randint(0, (1 << 8 * width) - 1) if value is None else value
            new = (value & ((1 << 8 * width) - 1)).to_bytes(width, order)
            data[at:at + width] = new[:len(data) - at]
        elif edit == "bytes":
            new = bytes(pick.randint(0, 255) for _ in range(pick.randint(1, 16)))
            data[at:at + len(new)] = new[:len(data) - at]
        elif edit == "splice":  # bytes from another field, as a confused writer might
            source, length = pick.randint(0, len(data) - 1), pick.randint(1, 64)
            new = bytes(data[source:source + length])
            data[at:at + len(new)] = new[:len(data) - at]
        else:
            length = min(pick.randint(1, 512), len(data) - at)
            data[at:at + length] = bytes(length)
        steps.append(f"{edit}@{at}")
    ending = pick.choice(ENDINGS)
    if ending == "truncate":
        del data[pick.randint(0, len(data)):]
    elif ending == "truncate-near-field":
        start, stop = pick.choice(seed.hot)
        del data[pick.randint(start, stop):]
    elif ending == "extend":
        data += bytes(pick.randint(1, 4096))
    steps.append(f"{ending}->{len(data)}")
    return bytes(data), steps


class _Drawn:
    """random.Random's randint and choice, drawn through hypothesis so failures shrink."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def randint(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    return make_seeds(tmp_path_factory.mktemp("seeds"))


def _files(root: Path) -> set[Path]:
    """The store's objects, less its change log (which records every publish)."""
    return {path for path in root.rglob("*") if path.is_file()
            and path.relative_to(root).parts[0] != "changes"}


def upload_one(catalog: CatalogStore, root: Path, data: bytes) -> str | None:
    """Upload `data`; check the published image, or that a refusal left nothing.

    Returns the refusal's message, or None once the published image is checked and gone.
    """
    before = _files(root)
    record = ImageRecord.new(owner="acme", name="fuzzed", status="saving")
    try:
        upload_image(catalog, io.BytesIO(data), record, BLOCK_SIZE)
    except InvalidValue as exc:
        assert _files(root) == before, "a refused upload left objects in the store"
        assert "\n" not in str(exc)
        return str(exc)
    published = catalog.load(record.id).record
    assert published.status == "active" and published.disk_format in DISK_FORMATS
    assert published.size == len(data)
    assert 0 <= (published.virtual_size or 0) < 2**63
    assert (root / mf.data_key(record.id)).read_bytes() == data
    discard(catalog.store, record.id)
    assert _files(root) == before
    return None


SETTINGS = settings(max_examples=LONG_EXAMPLES if LONG else QUICK_EXAMPLES,
                    derandomize=not LONG, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", ["qcow2", "vmdk-sparse", "vmdk-stream", "vhd", "vhdx",
                                  "vdi", "iso", "gpt", "text"])
def test_mutated_images_are_published_sanely_or_refused(seeds, tmp_path, kind):
    root = tmp_path / "store"
    root.mkdir()
    catalog = CatalogStore(FileStore(str(root)))
    first = ImageRecord.new(owner="acme", name="seed", status="saving")
    upload_image(catalog, io.BytesIO(b"seed"), first, BLOCK_SIZE)  # the store's own objects
    discard(catalog.store, first.id)
    refusal = upload_one(catalog, root, seeds[kind].data)
    assert (refusal is None) == (kind != "text"), refusal  # Glance takes no flat extents
    outcomes = {"published": 0, "refused": 0}

    @SETTINGS
    @given(st.data())
    def fuzz(drawn: st.DataObject) -> None:
        data, steps = mutant(seeds[kind], _Drawn(drawn))
        note(f"{kind}: {' '.join(steps)}")
        outcomes["refused" if upload_one(catalog, root, data) else "published"] += 1

    fuzz()
    assert outcomes["refused"], "no mutant was refused: are the mutations reaching fields?"
