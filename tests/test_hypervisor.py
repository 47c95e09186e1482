"""docs/hypervisors.md, run as written: qemu with cache=none, overlays, locks, libvirt XML."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import make_file, need

MiB = 1 << 20
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "hypervisors.md"


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def golden(file_store, mount, tmp_path):
    """A qcow2 image on a mount, with the raw bytes it holds."""
    raw = make_file(tmp_path / "golden.raw", 8 * MiB, seed=21)
    qcow = tmp_path / "golden.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    image_id = file_store.create(qcow, "acme", "--name", "golden")
    m = mount(file_store)
    return m / f"by-id/{image_id}", raw


def test_qemu_reads_an_image_with_cache_none(golden, tmp_path):
    image, raw = golden
    out = tmp_path / "out.raw"
    # -T none: the source is opened with O_DIRECT, as cache=none does
    qemu_img("convert", "-T", "none", "-f", "qcow2", "-O", "raw", str(image), str(out))
    assert out.read_bytes() == raw.read_bytes()
    info = qemu_img("info", "--force-share", "-f", "qcow2", str(image)).stdout
    assert "virtual size: 8 MiB" in info


def test_a_local_overlay_on_a_backing_file_on_the_mount(golden, tmp_path):
    image, raw = golden
    overlay = tmp_path / "vm1.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay))
    subprocess.run(["qemu-io", "-t", "none", "-f", "qcow2", "-c", "write -P 0xab 0 64k",
                    str(overlay)], check=True, capture_output=True)
    out = tmp_path / "out.raw"
    qemu_img("convert", "-T", "none", "-f", "qcow2", "-O", "raw", str(overlay), str(out))
    data = out.read_bytes()
    assert data[:64 << 10] == b"\xab" * (64 << 10)
    assert data[64 << 10:] == raw.read_bytes()[64 << 10:]
    # and the image under it is untouched
    assert hashlib.md5(image.read_bytes()).hexdigest() == \
        os.getxattr(image, "user.glance.checksum").decode()


def test_many_readers_share_an_image_and_writers_are_refused(golden):
    image, _raw = golden
    holders = [subprocess.Popen(["qemu-io", "-r", "-t", "none", "-f", "qcow2", str(image)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        # with two VMs holding it (qemu's shared locks), a third opens and reads it
        third = subprocess.run(["qemu-io", "-r", "-t", "none", "-f", "qcow2", "-c",
                                "read 0 64k", str(image)], capture_output=True, text=True)
        assert third.returncode == 0, third.stderr
        assert "read 65536/65536 bytes" in third.stdout
        writer = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(image)],
                                capture_output=True, text=True)
        assert writer.returncode != 0
        assert "Read-only file system" in writer.stderr + writer.stdout
    finally:
        for holder in holders:
            out, err = holder.communicate("quit\n", timeout=30)
            assert holder.returncode == 0, err


def test_the_guides_libvirt_xml_is_valid(tmp_path):
    need("virt-xml-validate")
    blocks = re.findall(r"```xml\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 2
    for n, block in enumerate(blocks):
        path = tmp_path / f"domain-{n}.xml"
        path.write_text(block)
        result = subprocess.run(["virt-xml-validate", str(path), "domain"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
