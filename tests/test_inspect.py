"""Format detection, safety and completeness, on files made by qemu-img, xorriso and
Python: through `image create`, and in process for the many cases."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from oslo_utils.imageutils import format_inspector as fi

from conftest import make_file, need
from imagefs.errors import UnsafeImage
from imagefs.inspect_format import Detected, FormatDetector

MiB = 1 << 20


@pytest.mark.parametrize("fmt, qemu_fmt, options", [
    ("qcow2", "qcow2", []), ("vmdk", "vmdk", ["-o", "subformat=monolithicSparse"]),
    ("vmdk", "vmdk", ["-o", "subformat=streamOptimized"]), ("vhd", "vpc", []),
    ("vhdx", "vhdx", []), ("vdi", "vdi", []), ("raw", "raw", []),
])
def test_formats_and_virtual_size_detected(file_store, tmp_path, fmt, qemu_fmt, options):
    need("qemu-img")
    raw = make_file(tmp_path / "src.raw", 4 * MiB, seed=21)
    out = tmp_path / f"disk.{qemu_fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qemu_fmt, *options, str(raw),
                    str(out)], check=True)
    image_id = file_store.create(out, "acme")
    doc = json.loads(file_store.cli("image", "show", image_id, "--json").stdout)
    assert doc["disk_format"] == fmt
    assert doc["virtual_size"] >= 4 * MiB  # vhd rounds up to its CHS geometry


def test_iso_detected(file_store, tmp_path):
    need("xorriso")
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "hello.txt").write_text("hello")
    iso = tmp_path / "cd.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso),
                    str(tmp_path / "content")], check=True, capture_output=True)
    image_id = file_store.create(iso, "acme")
    doc = json.loads(file_store.cli("image", "show", image_id, "--json").stdout)
    assert doc["disk_format"] == "iso"


def _refused(file_store, path, *extra):
    result = file_store.cli("image", "create", "--project", "acme", *extra, str(path),
                            check=False)
    assert result.returncode == 1
    assert json.loads(file_store.cli("image", "list", "--json").stdout) == []
    store_dir = file_store.object_path("")
    assert not any((store_dir / "data").glob("*")), "refused data left in the store"
    return result.stderr


def test_qcow2_with_backing_file_is_refused(file_store, tmp_path):
    need("qemu-img")
    bad = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    "/etc/passwd", str(bad)], check=True)
    assert "safety checks" in _refused(file_store, bad)


def test_qcow2_with_data_file_is_refused(file_store, tmp_path):
    need("qemu-img")
    bad = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.bin'}", str(bad), "1M"], check=True)
    assert "safety checks" in _refused(file_store, bad)


def test_qed_is_refused(file_store, tmp_path):
    need("qemu-img")
    bad = tmp_path / "old.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(bad), "1M"], check=True)
    assert "qed" in _refused(file_store, bad)


def test_declared_format_must_match(file_store, tmp_path):
    need("qemu-img")
    qcow = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    assert "does not match" in _refused(file_store, qcow, "--disk-format", "raw")
    raw = make_file(tmp_path / "r.raw", 4096)
    assert "does not match" in _refused(file_store, raw, "--disk-format", "qcow2")


# -- images made here, shared with the fuzz tests --------------------------------------

def qemu_image(tmp_path: Path, qemu_fmt: str, *options: str, size: int = 4 * MiB,
               seed: int = 70) -> Path:
    """A `qemu_fmt` image holding `size` bytes of random data, so its tables are full."""
    need("qemu-img")
    raw = make_file(tmp_path / f"src-{seed}-{size}.raw", size, seed=seed)
    out = tmp_path / f"{qemu_fmt}-{'-'.join(options).replace('=', '_')}-{seed}.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qemu_fmt, *options, str(raw),
                    str(out)], check=True, capture_output=True)
    return out


def iso_image(tmp_path: Path, size: int = MiB, seed: int = 71) -> Path:
    need("xorriso")
    content = tmp_path / f"iso-content-{seed}"
    content.mkdir()
    make_file(content / "blob.bin", size, seed=seed)
    out = tmp_path / f"cd-{seed}.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(out), str(content)],
                   check=True, capture_output=True)
    return out


def _gpt_header(sectors: int, my_lba: int, alternate: int, entries_lba: int,
                disk_guid: bytes, entries_crc: int) -> bytes:
    fields = [b"EFI PART", 0x00010000, 92, 0, 0, my_lba, alternate, 34, sectors - 34,
              disk_guid, entries_lba, 128, 128, entries_crc]
    header = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(512, b"\0")


def gpt_disk(path: Path, size: int = MiB, seed: int = 72) -> Path:
    """A raw disk with a protective MBR, a GPT with one partition, and its backup GPT."""
    sectors = size // 512
    disk = bytearray(make_file(path, size, seed=seed).read_bytes())
    disk[:512] = bytes(512)
    disk[446:462] = struct.pack("<B3BB3BII", 0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1,
                                min(sectors - 1, 0xFFFFFFFF))
    disk[510:512] = b"\x55\xaa"
    linux = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le
    entry = struct.pack("<16s16sQQQ72s", linux, uuid.UUID(int=seed).bytes_le, 2048 % sectors,
                        sectors - 35, 0, "data".encode("utf-16-le"))
    entries = entry.ljust(128 * 128, b"\0")
    disk_guid = uuid.UUID(int=seed + 1).bytes_le
    for my_lba, other, entries_lba in ((1, sectors - 1, 2), (sectors - 1, 1, sectors - 33)):
        disk[entries_lba * 512:(entries_lba + 32) * 512] = entries
        disk[my_lba * 512:(my_lba + 1) * 512] = _gpt_header(
            sectors, my_lba, other, entries_lba, disk_guid, zlib.crc32(entries))
    path.write_bytes(disk)
    return path


def detect(data: bytes) -> Detected:
    """Inspect `data` in process, as the pipeline does."""
    detector = FormatDetector(io.BytesIO(data))
    while detector.read(8 * MiB):
        pass
    return detector.finish()


def refusal(data: bytes) -> str:
    with pytest.raises(UnsafeImage) as exc:
        detect(data)
    return str(exc.value)


# -- odd input never crashes the check -------------------------------------------------

README = Path(__file__).parent.parent / "README.md"


def test_a_text_file_is_raw(file_store):
    assert detect(README.read_bytes()) == Detected("raw", README.stat().st_size)
    image_id = file_store.create(README, "acme")
    doc = json.loads(file_store.cli("image", "show", image_id, "--json").stdout)
    assert doc["disk_format"] == "raw" and doc["size"] == README.stat().st_size


ODD = [AttributeError("no vmdktype"), IndexError("index out of range"),
       struct.error("unpack requires a buffer"), ValueError("bad"), KeyError("region"),
       RuntimeError("finished"), ZeroDivisionError("division by zero")]


def _raising(exc: Exception):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc", ODD, ids=lambda e: type(e).__name__)
def test_an_inspector_failing_on_other_data_did_not_match(monkeypatch, tmp_path, exc):
    qcow = qemu_image(tmp_path, "qcow2", size=MiB).read_bytes()
    monkeypatch.setattr(fi.VMDKInspector, "format_match", property(_raising(exc)))
    monkeypatch.setattr(fi.VHDXInspector, "eat_chunk", _raising(exc))
    assert detect(README.read_bytes()).disk_format == "raw"
    assert detect(qcow).disk_format == "qcow2"


@pytest.mark.parametrize("where", ["eat_chunk", "safety_check", "virtual_size"])
@pytest.mark.parametrize("exc", ODD, ids=lambda e: type(e).__name__)
def test_an_inspector_failing_on_its_own_format_refuses(monkeypatch, tmp_path, where, exc):
    qcow = qemu_image(tmp_path, "qcow2", size=MiB).read_bytes()
    if where == "eat_chunk":  # fail once the header has been read and matched
        real = fi.QcowInspector.eat_chunk

        def fail(self, chunk):
            real(self, chunk)
            raise exc
    elif where == "virtual_size":
        fail = property(_raising(exc))
    else:
        fail = _raising(exc)
    monkeypatch.setattr(fi.QcowInspector, where, fail)
    message = refusal(qcow)
    assert message.startswith("could not verify the qcow2 image: ")
    assert "\n" not in message


def test_a_sparse_descriptor_without_its_header_is_refused():
    """Text claiming to be monolithicSparse: the vmdk inspector fails on its size."""
    text = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
            'createType="monolithicSparse"\n\n# Extent description\n'
            'RW 2048 SPARSE "disk.vmdk"\n\n# The Disk Data Base\n#DDB\n')
    assert refusal(text.encode()).startswith("could not verify the vmdk image: ")


def test_an_absurd_virtual_size_is_refused(tmp_path):
    qcow = bytearray(qemu_image(tmp_path, "qcow2", size=MiB).read_bytes())
    qcow[24:32] = b"\xff" * 8
    assert "virtual size of 18446744073709551615 bytes" in refusal(bytes(qcow))


# -- images cut short are refused; whole ones pass -------------------------------------

def _vmware_stream_vmdk(tmp_path: Path) -> bytes:
    """A streamOptimized vmdk laid out as VMware writes it: grain directory after the
    data, so the header says "at the end" and the real one is in a footer."""
    data = bytearray(qemu_image(tmp_path, "vmdk", "-o", "subformat=streamOptimized")
                     .read_bytes())
    footer = bytes(data[:512])
    data[56:64] = b"\xff" * 8
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    return bytes(data) + marker + footer + bytes(512)


WHOLE = {
    "qcow2": lambda t: qemu_image(t, "qcow2").read_bytes(),
    "qcow2-compressed": lambda t: qemu_image(t, "qcow2", "-c").read_bytes(),
    "qcow2-v2-512b-clusters": lambda t: qemu_image(
        t, "qcow2", "-o", "compat=0.10,cluster_size=512").read_bytes(),
    "qcow2-1bit-refcounts": lambda t: qemu_image(t, "qcow2", "-o", "refcount_bits=1")
    .read_bytes(),
    "vmdk-sparse": lambda t: qemu_image(t, "vmdk", "-o", "subformat=monolithicSparse")
    .read_bytes(),
    "vmdk-stream": lambda t: qemu_image(t, "vmdk", "-o", "subformat=streamOptimized")
    .read_bytes(),
    "vmdk-stream-vmware": _vmware_stream_vmdk,
    "vhd": lambda t: qemu_image(t, "vpc").read_bytes(),
    "vhdx": lambda t: qemu_image(t, "vhdx").read_bytes(),
    "vhdx-1M-blocks": lambda t: qemu_image(t, "vhdx", "-o", "block_size=1M").read_bytes(),
    "vdi": lambda t: qemu_image(t, "vdi").read_bytes(),
    "vdi-static": lambda t: qemu_image(t, "vdi", "-o", "static=on").read_bytes(),
    "iso": lambda t: iso_image(t).read_bytes(),
    "gpt": lambda t: gpt_disk(t / "gpt.raw", 4 * MiB).read_bytes(),
    "raw-gpt-without-mbr": lambda t: bytes(512) + gpt_disk(t / "gpt.raw", 4 * MiB)
    .read_bytes()[512:],
}


@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_truncated_images_are_refused(tmp_path, kind):
    data = WHOLE[kind](tmp_path)
    fmt = kind.split("-")[0]
    assert detect(data).disk_format == ("raw" if fmt == "gpt" else fmt)
    for cut in (len(data) // 2, len(data) * 9 // 10):
        message = refusal(data[:cut])
        assert message.startswith(f"the {fmt} image looks truncated: ") and \
            message.endswith("; copy it again"), message
        assert f"the file has only {cut} bytes" in message or "does not end with" in message


@pytest.mark.parametrize("qemu_fmt, options, fmt", [
    ("qcow2", ["-o", "preallocation=metadata"], "qcow2"),
    ("qcow2", ["-o", "preallocation=falloc"], "qcow2"),
    ("qcow2", ["-o", "lazy_refcounts=on"], "qcow2"),
    ("vpc", ["-o", "subformat=fixed"], "raw"),  # the footer is last; Glance sees raw too
    ("vhdx", ["-o", "subformat=fixed"], "vhdx"),
    ("vmdk", ["-o", "subformat=monolithicSparse,zeroed_grain=on"], "vmdk"),
])
def test_other_whole_images_pass(tmp_path, qemu_fmt, options, fmt):
    assert detect(qemu_image(tmp_path, qemu_fmt, *options).read_bytes()).disk_format == fmt


def test_empty_images_made_by_qemu_img_pass(tmp_path):
    need("qemu-img")
    for qemu_fmt, fmt in [("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vpc", "vhd"),
                          ("vhdx", "vhdx"), ("vdi", "vdi")]:
        path = tmp_path / f"empty.{qemu_fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", qemu_fmt, str(path), "64M"],
                       check=True)
        assert detect(path.read_bytes()).disk_format == fmt


HUGE = 1 << 40
# (image, where in it, struct layout, values, what the refusal names)
PAST_THE_END = [
    ("qcow2", 40, ">Q", (HUGE,), "L1 table"),
    ("qcow2", 36, ">I", (1 << 28,), "L1 table"),
    ("qcow2", 48, ">Q", (HUGE,), "refcount table"),
    ("qcow2", 56, ">I", (1 << 20,), "refcount table"),
    ("qcow2", 60, ">IQ", (3, HUGE), "snapshot table"),
    ("vmdk-sparse", 56, "<Q", (HUGE // 512,), "grain directory"),
    ("vmdk-sparse", 48, "<Q", (HUGE // 512,), "redundant grain directory"),
    ("vmdk-sparse", 64, "<Q", (HUGE // 512,), "header and grain tables"),
    ("vmdk-stream", 56, "<Q", (HUGE // 512,), "grain directory"),
    ("vhd", 16, ">Q", (HUGE,), "dynamic disk header"),
    ("vhd", "dynamic+16", ">Q", (HUGE,), "block allocation table"),
    ("vhd", 48, ">Q4xI", (HUGE, 2), "data and footer"),  # now a fixed vhd of 1 TiB
    ("vhdx", (192 << 10) + 16 + 16, "<Q", (HUGE,), "block allocation table"),
    ("vhdx", (256 << 10) + 16 + 32 + 16, "<Q", (HUGE,), "metadata region"),
    ("vhdx", (64 << 10) + 72, "<Q", (HUGE,), "log"),
    ("vdi", 0x184, "<I", (1 << 20,), "last allocated block"),
    ("vdi", 0x154, "<I", (1 << 31,), "block map"),
    ("iso", 16 * 2048 + 80, "<I", (1 << 24,), "volume"),
    ("gpt", 512 + 32, "<Q", (HUGE,), "backup GPT header"),
    ("gpt", 512 + 72, "<Q", (HUGE,), "partition entry array"),
]


def patch(data: bytes, where: int, layout: str, values: tuple[int, ...]) -> bytes:
    """`values` packed into `data` at `where`; a GPT header gets its checksum back."""
    patched = bytearray(data)
    struct.pack_into(layout, patched, where, *values)
    if patched[512:520] == b"EFI PART":
        struct.pack_into("<I", patched, 512 + 16, 0)
        struct.pack_into("<I", patched, 512 + 16, zlib.crc32(patched[512:512 + 92]))
    return bytes(patched)


@pytest.mark.parametrize("kind, where, layout, values, what", PAST_THE_END,
                         ids=[f"{c[0]}-{c[4]}" for c in PAST_THE_END])
def test_metadata_past_the_end_is_refused(tmp_path, kind, where, layout, values, what):
    data = WHOLE[kind](tmp_path)
    if where == "dynamic+16":
        where = struct.unpack_from(">Q", data, 16)[0] + 16
    message = refusal(patch(data, where, layout, values))
    assert f"looks truncated: its {what} ends at byte" in message, message


def test_a_vmware_stream_vmdk_cut_before_its_footer_is_refused(tmp_path):
    data = _vmware_stream_vmdk(tmp_path)
    assert detect(data).disk_format == "vmdk"
    message = refusal(data[:-512])
    assert "does not end with the footer and end-of-stream marker" in message


def test_a_dynamic_vhd_needs_its_footer_copy(tmp_path):
    data = WHOLE["vhd"](tmp_path)
    assert "does not end with the copy of its footer" in refusal(data[:-512])
    assert detect(data[:-1]).disk_format == "vhd"  # some writers end with a 511-byte copy
