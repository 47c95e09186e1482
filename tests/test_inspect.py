"""Format detection and safety, on files made by qemu-img, through `image create`."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import make_file, need

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
