"""Is the whole image there? Container metadata must fit inside the data that arrived.

A copy cut short (an interrupted transfer, a full disk) keeps an intact header, so format
inspection passes it, and it fails only once a guest reads the part that is missing. The
checks here take what a container's header, its tables near the start and its footer say
must exist, and compare that with the size of the data. They use only what streamed past
once: the first HEAD bytes, the last TAIL bytes and the total size (`StreamSample`).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Iterator

from imagefs.errors import UnsafeImage

# Covers qemu's vhdx BAT (at 2 MiB) and the tables qemu puts near the start of qcow2 and
# vmdk; a larger table is checked as far as it lies in here.
HEAD = 4 << 20
# A streamOptimized vmdk ends with a footer marker, a footer and an end-of-stream marker.
TAIL = 3 * 512
SECTOR = 512


class StreamSample:
    """The first HEAD bytes, the last TAIL bytes and the size of a stream, kept as it passes.

    Costs one slice per read: the inspectors already look at every byte.
    """

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = b""
        self.size = 0

    def add(self, data: bytes) -> None:
        if len(self.head) < HEAD:
            self.head += data[:HEAD - len(self.head)]
        self.tail = data[-TAIL:] if len(data) >= TAIL else (self.tail + data)[-TAIL:]
        self.size += len(data)


def check_complete(fmt: str, sample: StreamSample) -> None:
    """Raise UnsafeImage if the `fmt` image in `sample` refers to data past its end."""
    checks = _CHECKS.get(fmt)
    problem = next(checks(sample), None) if checks else None
    if problem:
        raise UnsafeImage(f"the {fmt} image looks truncated: {problem}; copy it again")


def _fields(buf: bytes | bytearray, layout: str, offset: int) -> tuple | None:
    """`layout` unpacked at `offset`, or None if `buf` holds too little (or offset < 0)."""
    if offset < 0 or offset + struct.calcsize(layout) > len(buf):
        return None
    return struct.unpack_from(layout, buf, offset)


def _ends(what: str, start: int, length: int, size: int) -> Iterator[str]:
    if length > 0 and start + length > size:
        yield f"its {what} ends at byte {start + length} but the file has only {size} bytes"


def _starts(what: str, start: int, size: int) -> Iterator[str]:
    if start >= size:
        yield f"{what} at byte {start} but the file has only {size} bytes"


def _in_head(sample: StreamSample, start: int, length: int) -> bytes | bytearray | None:
    """The bytes [start, start+length) if the head holds them all."""
    if start < 0 or length <= 0 or start + length > len(sample.head):
        return None
    return sample.head[start:start + length]


def _entries(table: bytes | bytearray, layout: str) -> tuple[int, ...]:
    """A table's entries (layout: byte order and one struct code) up to the last nonzero.

    Tables are mostly unallocated zeros; this keeps the scan to the part in use.
    """
    width = struct.calcsize(layout)
    count = -(-len(table.rstrip(b"\0")) // width)
    return struct.unpack(f"{layout[0]}{count}{layout[1:]}", table[:count * width])


# -- qcow2 (docs/interop/qcow2.txt in qemu) ---------------------------------------------

_QCOW2_HEADER = ">4sIQIIQIIQQIIQ"
_QCOW2_BITMAPS, _QCOW2_CRYPTO = 0x23852875, 0x0537BE77
_QCOW2_REFT_MASK = 0xFFFFFFFFFFFFFE00


def _qcow2(s: StreamSample) -> Iterator[str]:
    header = _fields(s.head, _QCOW2_HEADER, 0)
    if header is None or not 9 <= header[4] <= 21:  # qemu opens no other cluster size
        return
    (_, version, _, _, cluster_bits, _, _, l1_size, l1_offset, rt_offset, rt_clusters,
     snapshots, snapshots_offset) = header
    cluster = 1 << cluster_bits
    yield from _ends("L1 table", l1_offset, 8 * l1_size, s.size)
    yield from _ends("refcount table", rt_offset, rt_clusters * cluster, s.size)
    yield from _ends("snapshot table", snapshots_offset, 40 * snapshots, s.size)  # 40: least
    yield from _qcow2_extensions(s, version, cluster)
    yield from _qcow2_used_clusters(s, version, cluster, rt_offset, rt_clusters * cluster)


def _qcow2_extensions(s: StreamSample, version: int, cluster: int) -> Iterator[str]:
    """Regions named by header extensions: the bitmap directory, the encryption header."""
    header_length = _fields(s.head, ">I", 100) if version >= 3 else (72,)
    if header_length is None:
        return
    position, end = header_length[0], min(cluster, len(s.head))  # all in the first cluster
    while position + 8 <= end and (extension := _fields(s.head, ">II", position))[0]:
        kind, length = extension
        if kind == _QCOW2_BITMAPS and (bitmaps := _fields(s.head, ">IIQQ", position + 8)):
            yield from _ends("bitmap directory", bitmaps[3], bitmaps[2], s.size)
        elif kind == _QCOW2_CRYPTO and (crypto := _fields(s.head, ">QQ", position + 8)):
            yield from _ends("encryption header", crypto[0], crypto[1], s.size)
        position += 8 + (length + 7) // 8 * 8


def _qcow2_used_clusters(s: StreamSample, version: int, cluster: int, rt_offset: int,
                         rt_length: int) -> Iterator[str]:
    """Refcount blocks, and the last cluster in use by the refcount blocks in the head."""
    order = _fields(s.head, ">I", 96) if version >= 3 else (4,)
    table = _in_head(s, rt_offset, min(rt_length, len(s.head) - rt_offset) // 8 * 8)
    if order is None or order[0] > 6 or table is None:
        return
    bits = 1 << order[0]
    blocks = [entry & _QCOW2_REFT_MASK for entry in _entries(table, ">Q")]
    if any(blocks):
        yield from _ends("last refcount block", max(blocks), cluster, s.size)
    last_in_block: dict[int, int] = {}  # block offset -> last entry in use, -1 for none
    last_used = -1
    for index, offset in enumerate(blocks):
        if not offset or offset % cluster:
            continue
        if offset not in last_in_block:
            last_in_block[offset] = _last_nonzero_entry(_in_head(s, offset, cluster), bits)
        if last_in_block[offset] >= 0:
            last_used = index * (cluster * 8 // bits) + last_in_block[offset]
    if last_used >= 0:
        yield from _starts("its refcounts mark a cluster in use", last_used * cluster, s.size)


def _last_nonzero_entry(block: bytes | bytearray | None, bits: int) -> int:
    """Index of the last nonzero refcount in `block`; -1 if none (or not in the head).

    Entries narrower than a byte fill each byte from its lowest bit, as in qemu.
    """
    used = block.rstrip(b"\0") if block is not None else b""
    if not used:
        return -1
    return ((len(used) - 1) * 8 + used[-1].bit_length() - 1) // bits


# -- vmdk (VMware's Virtual Disk Format 5.0; qemu block/vmdk.c) -------------------------

_VMDK_HEADER = "<4sIIQQQQIQQQ"
_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_REDUNDANT_GD, _VMDK_COMPRESSED, _VMDK_MARKERS = 1 << 1, 1 << 16, 1 << 17
_VMDK_MAX_GTES = 512  # qemu refuses bigger grain tables


def _vmdk(s: StreamSample) -> Iterator[str]:
    header = _fields(s.head, _VMDK_HEADER, 0)
    # A text descriptor has no tables; its extents are other files, which Glance refuses.
    if header is None or header[0] != b"KDMV":
        return
    if header[9] == _VMDK_GD_AT_END:  # streamOptimized: the real header is in the footer
        header = _vmdk_footer(s.tail)
        if header is None:
            yield ("it does not end with the footer and end-of-stream marker that a "
                   "streamOptimized vmdk whose grain directory follows the data ends with")
            return
    _, _, flags, capacity, grain, _, _, per_gt, rgd_sector, gd_sector, overhead = header
    if not grain or not per_gt:
        return
    gd_length = 4 * -(-capacity // (grain * per_gt))
    yield from _ends("grain directory", gd_sector * SECTOR, gd_length, s.size)
    if flags & _VMDK_REDUNDANT_GD:
        yield from _ends("redundant grain directory", rgd_sector * SECTOR, gd_length, s.size)
    if not flags & _VMDK_COMPRESSED:
        yield from _ends("header and grain tables", 0, overhead * SECTOR, s.size)
    directory = _in_head(s, gd_sector * SECTOR, gd_length)
    if directory is not None and per_gt <= _VMDK_MAX_GTES:
        yield from _vmdk_grains(s, _entries(directory, "<I"), per_gt, grain, flags)


def _vmdk_footer(tail: bytes) -> tuple | None:
    """The footer's copy of the header, if the tail is footer marker, footer, EOS marker."""
    marker = _fields(tail, "<QII", 0)
    header = _fields(tail, _VMDK_HEADER, SECTOR)
    end = _fields(tail, "<QII", 2 * SECTOR)
    if len(tail) < TAIL or marker[1:] != (0, 3) or header[0] != b"KDMV" or end != (0, 0, 0):
        return None
    return header


def _vmdk_grains(s: StreamSample, directory: tuple[int, ...], per_gt: int, grain: int,
                 flags: int) -> Iterator[str]:
    """Grain tables past the end, and the last grain the tables in the head point to."""
    tables = sorted({sector * SECTOR for sector in directory if sector})
    if not tables:
        return
    yield from _ends("last grain table", tables[-1], 4 * per_gt, s.size)
    last = 0
    for offset in tables:
        table = _in_head(s, offset, 4 * per_gt)
        if table is not None:
            last = max(last, *_entries(table, "<I"), 0)
    if last <= 1:  # 1 marks a zeroed grain
        return
    start = last * SECTOR
    if not flags & _VMDK_COMPRESSED:
        yield from _ends("last grain", start, grain * SECTOR, s.size)
    elif flags & _VMDK_MARKERS and (marker := _fields(s.head, "<QI", start)):
        yield from _ends("last grain", start, 12 + marker[1], s.size)  # LBA, size, data
    else:
        yield from _starts("a grain table points to a grain", start, s.size)


# -- vhd (Microsoft's Virtual Hard Disk Image Format Specification) ---------------------

_VHD_FIXED = 2
_VHD_COOKIE = b"conectix"


def _vhd(s: StreamSample) -> Iterator[str]:
    footer = _fields(s.head, ">8sIIQ24xQ4xI", 0)
    if footer is None:
        return
    _, _, _, data_offset, current_size, disk_type = footer
    if disk_type == _VHD_FIXED:
        yield from _ends("data and footer", 0, current_size + SECTOR, s.size)
        return
    # Some old writers made 511-byte footers.
    if not (s.tail[-SECTOR:].startswith(_VHD_COOKIE)
            or s.tail[-SECTOR + 1:].startswith(_VHD_COOKIE)):
        yield "it does not end with the copy of its footer that a dynamic vhd ends with"
        return
    yield from _ends("dynamic disk header", data_offset, 1024, s.size)
    dynamic = _fields(s.head, ">8s8xQ4xI", data_offset)
    if dynamic and dynamic[0] == b"cxsparse":
        yield from _ends("block allocation table", dynamic[1], 4 * dynamic[2], s.size)


# -- vhdx (Microsoft's [MS-VHDX]) -------------------------------------------------------

_VHDX_HEADERS = (64 << 10, 128 << 10)
_VHDX_REGION_TABLES = (192 << 10, 256 << 10)
_VHDX_MAX_ENTRIES = 2047
_VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
_VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
_VHDX_LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
_VHDX_PRESENT = (6, 7)  # payload block fully / partially present; sector bitmap present
_MiB = 1 << 20


def _vhdx(s: StreamSample) -> Iterator[str]:
    for at in _VHDX_HEADERS:
        header = _fields(s.head, "<4s64xIQ", at)
        if header and header[0] == b"head":
            yield from _ends("log", header[2], header[1], s.size)
    regions: dict[uuid.UUID, tuple[int, int]] = {}
    for at in _VHDX_REGION_TABLES:
        for guid, offset, length in _vhdx_entries(s, at, "<4s4xI", b"regi", "<16sQI4x"):
            name = {_VHDX_BAT: "block allocation table",
                    _VHDX_METADATA: "metadata region"}.get(guid, f"region {guid}")
            yield from _ends(name, offset, length, s.size)
            regions.setdefault(guid, (offset, length))
    if _VHDX_BAT in regions and _VHDX_METADATA in regions:
        yield from _vhdx_blocks(s, regions[_VHDX_BAT], regions[_VHDX_METADATA][0])


def _vhdx_entries(s: StreamSample, at: int, header: str, signature: bytes,
                  entry: str) -> Iterator[tuple[uuid.UUID, int, int]]:
    """(GUID, offset, length) of each entry of a region table or the metadata table."""
    table = _fields(s.head, header, at)
    if not table or table[0] != signature:
        return
    first = 16 if signature == b"regi" else 32
    for index in range(min(table[1], _VHDX_MAX_ENTRIES)):
        fields = _fields(s.head, entry, at + first + 32 * index)
        if fields is None:
            return
        yield uuid.UUID(bytes_le=fields[0]), fields[1], fields[2]


def _vhdx_blocks(s: StreamSample, bat: tuple[int, int], metadata: int) -> Iterator[str]:
    """The last block in use, as far as the block allocation table lies in the head.

    Every chunk_ratio payload blocks the table has one entry for a 1 MiB sector bitmap.
    """
    items = {guid: _fields(s.head, "<I", metadata + offset)
             for guid, offset, _ in _vhdx_entries(s, metadata, "<8s2xH", b"metadata",
                                                  "<16sII")}
    block_size, sector = items.get(_VHDX_FILE_PARAMETERS), items.get(_VHDX_LOGICAL_SECTOR)
    table = _in_head(s, bat[0], min(bat[1], len(s.head) - bat[0]) // 8 * 8)
    if not block_size or not sector or not block_size[0] or table is None:
        return
    chunk_ratio = (1 << 23) * sector[0] // block_size[0]
    entries = _entries(table, "<Q")
    present = [i for i, entry in enumerate(entries) if entry & 7 in _VHDX_PRESENT]
    if not present:
        return
    last = max(present, key=lambda i: entries[i] >> 20)
    is_bitmap = last % (chunk_ratio + 1) == chunk_ratio
    yield from _ends("last block", entries[last] >> 20 << 20,
                     _MiB if is_bitmap else block_size[0], s.size)


# -- vdi (qemu block/vdi.c), iso (ECMA-119), gpt (UEFI 2.10, chapter 5) -----------------

_VDI_VERSION_1_1 = 0x00010001


def _vdi(s: StreamSample) -> Iterator[str]:
    version = _fields(s.head, "<I", 0x44)
    layout = _fields(s.head, "<II28xIIII", 0x154)
    if version != (_VDI_VERSION_1_1,) or layout is None:
        return
    map_offset, data_offset, block_size, block_extra, blocks, allocated = layout
    yield from _ends("block map", map_offset, 4 * blocks, s.size)
    yield from _ends("last allocated block", data_offset,
                     allocated * (block_size + block_extra), s.size)


_ISO_PVD = 16 * 2048


def _iso(s: StreamSample) -> Iterator[str]:
    pvd = _fields(s.head, "<B5s74xI44xH", _ISO_PVD)
    if pvd and pvd[:2] == (1, b"CD001"):
        yield from _ends("volume", 0, pvd[2] * pvd[3], s.size)


_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = "<8s4sII4xQQ16x16xQIII"


def _gpt(s: StreamSample) -> Iterator[str]:
    """A GPT at LBA 1, for 512-byte or 4 KiB sectors, if its header checksum holds."""
    for sector in (SECTOR, 4096):
        header = _fields(s.head, _GPT_HEADER, sector)
        if header is None or header[0] != _GPT_SIGNATURE or not _gpt_valid(s, sector, header):
            continue
        _, _, _, _, _, alternate, entries_lba, entries, entry_size, _ = header
        yield from _ends("partition entry array", entries_lba * sector, entries * entry_size,
                         s.size)
        yield from _ends("backup GPT header", alternate * sector, sector, s.size)
        return


def _gpt_valid(s: StreamSample, sector: int, header: tuple) -> bool:
    _, _, length, checksum, my_lba = header[:5]
    if my_lba != 1 or not 92 <= length <= sector:
        return False
    raw = bytearray(s.head[sector:sector + length])
    raw[16:20] = bytes(4)
    return zlib.crc32(raw) == checksum


_CHECKS: dict[str, Callable[[StreamSample], Iterator[str]]] = {
    "qcow2": _qcow2, "vmdk": _vmdk, "vhd": _vhd, "vhdx": _vhdx, "vdi": _vdi, "iso": _iso,
    "gpt": _gpt, "raw": _gpt,
}
