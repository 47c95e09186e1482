"""`imagefs image import`: a folder or an S3 prefix becomes a catalog, resumably."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import LONG, IMAGEFS, make_file, need
from imagefs.catalog_store import CatalogStore
from imagefs.config import Settings
from imagefs.errors import StoreUnavailable
from imagefs.importer import ImportOptions, _LocalReader, _SourceUnreadable, run_import
from imagefs.stores.file import FileStore

MiB = 1 << 20
# Run the CLI with every upload held for a moment between its data and its manifest:
# a kill then lands mid-upload, as it would in a long import of big files.
SLOW_UPLOADS = """
import sys, time
import imagefs.pipeline as pipeline
staged = pipeline.stage_data
def slow(*args, **kwargs):
    result = staged(*args, **kwargs)
    time.sleep(0.2)
    return result
pipeline.stage_data = slow
from imagefs.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def qemu_img(*args: str) -> None:
    need("qemu-img")
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """path -> (result, reason), from the summary's per-file lines."""
    lines = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(imported|would import|already imported|skipped|refused|failed)"
                         r" +(\S+): (.*)$", line)
        if match:
            lines[match.group(2)] = (match.group(1), match.group(3))
    return lines


def skipped(lines: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {path: why for path, (result, why) in lines.items() if result == "skipped"}


def imported(store, project: str = "acme") -> dict[str, dict]:
    """imagefs_import_source -> the image's Glance JSON, for every image made by import."""
    images = json.loads(store.cli("image", "list", "--project", project, "--json").stdout)
    sources = [i["imagefs_import_source"] for i in images]
    assert len(sources) == len(set(sources)), f"a file was imported twice: {sources}"
    return {i["imagefs_import_source"]: i for i in images}


def check_image(store, image: dict, data: bytes, disk_format: str, show: bool = True) -> None:
    """The image's Glance fields (as `image show` gives them, or as listed) and the bytes
    in the store are the file's."""
    shown = json.loads(store.cli("image", "show", image["id"], "--json").stdout) if show \
        else image
    assert shown["status"] == "active" and shown["disk_format"] == disk_format
    assert shown["size"] == len(data)
    assert shown["checksum"] == hashlib.md5(data).hexdigest()
    assert shown["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert store.read_object(f"data/{image['id']}") == data


def make_folder(root: Path) -> dict[str, str]:
    """A folder as found on an old hypervisor: images of each format and what is not one.

    Returns file name -> the disk format it holds."""
    need("xorriso")
    root.mkdir()
    make_file(root / "debian.raw", 2 * MiB + 512, seed=1)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(root / "debian.raw"),
             str(root / "ubuntu.qcow2"))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(root / "debian.raw"),
             str(root / "win.vmdk"))
    (root / "cd").mkdir()
    (root / "cd/readme.txt").write_text("rescue")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(root / "rescue.iso"),
                    str(root / "cd")], check=True, capture_output=True)
    (root / "cd/readme.txt").unlink()
    (root / "cd").rmdir()
    qemu_img("create", "-f", "qcow2", "-b", "ubuntu.qcow2", "-F", "qcow2",
             str(root / "overlay.qcow2"))
    (root / "empty.raw").touch()
    (root / ".hidden.qcow2").write_bytes((root / "ubuntu.qcow2").read_bytes())
    (root / "upload.raw.part").write_bytes(b"half")
    (root / "latest.qcow2").symlink_to("ubuntu.qcow2")
    os.mkfifo(root / "pipe")
    (root / "old").mkdir()
    make_file(root / "old/nested.img", MiB, seed=2)
    return {"debian.raw": "raw", "ubuntu.qcow2": "qcow2", "win.vmdk": "vmdk",
            "rescue.iso": "iso"}


ARGS = ("image", "import", "--project", "acme", "--visibility", "community", "--tag",
        "adopted", "--property", "os_distro=debian")


@pytest.mark.parametrize("kind", ["file", "s3"] if LONG else ["file"])
def test_import_a_folder_of_mixed_files(kind, request, tmp_path):
    """On S3 with IMAGEFS_LONG=1; the default suite covers S3 with the prefix import."""
    store = request.getfixturevalue(f"{kind}_store")
    formats = make_folder(tmp_path / "images")
    src = tmp_path / "images"
    first = store.cli(*ARGS, str(src), check=False)
    assert first.returncode == 1, first.stderr  # the unsafe overlay was refused
    lines = summary(first)
    assert {p for p, (r, _) in lines.items() if r == "imported"} == set(formats)
    assert lines["overlay.qcow2"][0] == "refused" and "backing" in lines["overlay.qcow2"][1]
    assert skipped(lines) == {
        "empty.raw": "empty", ".hidden.qcow2": "a dotfile or temporary name",
        "upload.raw.part": "a dotfile or temporary name",
        "latest.qcow2": "the same file as ubuntu.qcow2", "pipe": "not a regular file",
        "old/": "a folder (--recursive imports what is in it)"}
    assert first.stdout.splitlines()[-1] == (
        f"4 imported ({sum((src / f).stat().st_size for f in formats)} bytes), "
        "0 already imported, 6 skipped, 1 refused, 0 failed")

    images = imported(store)
    assert set(images) == {str(src / f) for f in formats}
    for name, fmt in formats.items():
        image = images[str(src / name)]
        check_image(store, image, (src / name).read_bytes(), fmt)
        assert image["name"] == name.rsplit(".", 1)[0]  # the file name less its extension
        assert image["visibility"] == "community" and image["tags"] == ["adopted"]
        assert image["os_distro"] == "debian" and image["owner"] == "acme"
        assert lines[name][1].startswith(f"image {image['id']} ")


def test_dry_run_then_a_recursive_rerun(file_store, tmp_path):
    formats = make_folder(tmp_path / "images")
    src = tmp_path / "images"
    dry = file_store.cli(*ARGS, "--dry-run", str(src))
    assert {p: r for p, (r, _) in summary(dry).items() if r == "would import"} == dict.fromkeys(
        [*formats, "overlay.qcow2"], "would import")
    assert summary(dry)["ubuntu.qcow2"][1] == "as 'ubuntu'"
    assert dry.stdout.splitlines()[-1].startswith("5 would be imported (")
    assert not file_store.has_object("imagefs-catalog.msgpack")  # nothing written at all

    assert file_store.cli(*ARGS, str(src), check=False).returncode == 1
    images = imported(file_store)
    os.utime(src / "debian.raw", ns=(0, 1))  # the file changed since it was imported
    again = file_store.cli(*ARGS, "--recursive", str(src), check=False)
    lines = summary(again)
    assert lines["old/nested.img"][0] == "imported"
    assert lines["debian.raw"] == ("imported", lines["debian.raw"][1])
    assert lines["debian.raw"][1].endswith(
        f"; a new version of the file image {images[str(src / 'debian.raw')]['id']} came from")
    for name in ("ubuntu.qcow2", "win.vmdk", "rescue.iso"):
        assert lines[name] == ("already imported", f"image {images[str(src / name)]['id']}")
    assert again.stdout.splitlines()[-1].endswith(
        "3 already imported, 5 skipped, 1 refused, 0 failed")
    everything = json.loads(file_store.cli("image", "list", "--json").stdout)
    assert len(everything) == 6  # 4, a new version of one, and the nested file
    nested = next(i for i in everything
                  if i["imagefs_import_source"] == str(src / "old/nested.img"))
    assert nested["name"] == "old/nested"  # its path, less the extension
    check_image(file_store, nested, (src / "old/nested.img").read_bytes(), "raw")


def test_interrupted_imports_resume_and_import_each_file_once(file_store, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for n in range(20):
        make_file(src / f"vm{n:02}.raw", 64 << 10, seed=n)
    store_root = Path(file_store.url.removeprefix("file://"))
    command = [sys.executable, "-c", SLOW_UPLOADS, "image", "import", "--store",
               file_store.url, "--project", "acme", "--jobs", "1", str(src)]

    def objects(folder: str) -> int:
        path = store_root / folder
        return len([n for n in os.listdir(path) if ".tmp-" not in n]) if path.exists() else 0

    def run_until(stop: signal.Signals, manifests: int) -> subprocess.CompletedProcess[str]:
        """Start a slow import; send `stop` once it has published that many images and
        the next one is in the store without its manifest (caught mid-upload)."""
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 60
        while not (objects("manifests") >= manifests and objects("data") > objects("manifests")):
            assert process.poll() is None and time.monotonic() < deadline, \
                "the import finished before it could be interrupted"
            time.sleep(0.01)
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    ctrl_c = run_until(signal.SIGINT, 3)
    assert ctrl_c.returncode == 130, ctrl_c.stderr
    done = objects("manifests")
    assert ctrl_c.stdout.splitlines()[-1] == (
        f"interrupted: {20 - done} more files not imported yet; run the same command again "
        "to finish")
    assert sum(r == "imported" for r, _ in summary(ctrl_c).values()) == done

    killed = run_until(signal.SIGKILL, done + 3)
    assert killed.returncode == -signal.SIGKILL
    assert objects("data") > objects("manifests")  # the killed upload's data, no manifest
    done = objects("manifests")

    rest = file_store.cli("image", "import", "--project", "acme", str(src))
    lines = summary(rest)
    assert sum(r == "already imported" for r, _ in lines.values()) == done
    assert sum(r == "imported" for r, _ in lines.values()) == 20 - done
    images = imported(file_store)
    assert set(images) == {str(p) for p in src.iterdir()}
    for path in src.iterdir():
        check_image(file_store, images[str(path)], path.read_bytes(), "raw", show=False)
    assert summary(file_store.cli("image", "import", "--project", "acme", str(src))) == {
        p.name: ("already imported", f"image {images[str(p)]['id']}") for p in src.iterdir()}


def test_import_an_s3_prefix(s3_store, tmp_path):
    """Objects under a prefix, streamed by ranged GETs; the store's own prefix never."""
    client = s3_store.server.client()
    raw = make_file(tmp_path / "a.raw", 8 * MiB + 100, seed=3)  # more than one ranged GET
    qcow = tmp_path / "b.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    objects = {"legacy/a.raw": raw.read_bytes(), "legacy/b.qcow2": qcow.read_bytes(),
               "legacy/.trash.raw": b"x" * 512, "legacy/empty.raw": b"", "legacy/deep/": b"",
               "legacy/deep/c.raw": b"c" * 4096, "legacy/deep/d.raw": b"d" * 4096}
    for key, body in objects.items():
        client.put_object(Bucket=s3_store.bucket, Key=key, Body=body)
    prefix = f"s3://{s3_store.bucket}/legacy/"

    first = s3_store.cli("image", "import", "--project", "acme", "--jobs", "3", prefix)
    lines = summary(first)
    assert lines["a.raw"][0] == lines["b.qcow2"][0] == "imported"
    assert skipped(lines) == {".trash.raw": "a dotfile or temporary name",
                              "empty.raw": "empty",
                              "deep/": "a folder (--recursive imports what is in it)"}
    assert first.stdout.splitlines()[-1] == (
        f"2 imported ({len(objects['legacy/a.raw']) + len(objects['legacy/b.qcow2'])} bytes), "
        "0 already imported, 3 skipped, 0 refused, 0 failed")
    images = imported(s3_store)
    check_image(s3_store, images[f"s3://{s3_store.bucket}/legacy/a.raw"],
                objects["legacy/a.raw"], "raw", show=False)
    check_image(s3_store, images[f"s3://{s3_store.bucket}/legacy/b.qcow2"],
                objects["legacy/b.qcow2"], "qcow2", show=False)
    assert images[f"s3://{s3_store.bucket}/legacy/b.qcow2"]["name"] == "b"

    # The whole bucket: the same objects are the same sources; imagefs/ is the store.
    whole = s3_store.cli("image", "import", "--project", "acme", "--recursive",
                         f"s3://{s3_store.bucket}")
    lines = summary(whole)
    assert lines["imagefs/"] == ("skipped", "the store this import writes to")
    assert lines["legacy/a.raw"][0] == lines["legacy/b.qcow2"][0] == "already imported"
    assert lines["legacy/deep/c.raw"][0] == lines["legacy/deep/d.raw"][0] == "imported"
    images = imported(s3_store)
    assert len(images) == 4
    assert images[f"s3://{s3_store.bucket}/legacy/deep/c.raw"]["name"] == "legacy/deep/c"
    check_image(s3_store, images[f"s3://{s3_store.bucket}/legacy/deep/d.raw"],
                objects["legacy/deep/d.raw"], "raw", show=False)


def test_unreadable_files_fail_alone(world_dir):
    """Run as nobody: a file it may not read fails, the others are imported."""
    src = world_dir / "src"
    src.mkdir(mode=0o755)
    make_file(src / "ok.raw", 8192).chmod(0o644)
    make_file(src / "secret.raw", 8192).chmod(0o600)
    (world_dir / "store").mkdir()
    os.chown(world_dir / "store", 65534, 65534)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *IMAGEFS, "image",
         "import", "--store", f"file://{world_dir}/store", "--project", "acme", str(src)],
        capture_output=True, text=True, cwd="/")
    assert result.returncode == 1, result.stderr
    lines = summary(result)
    assert lines["ok.raw"][0] == "imported"
    assert lines["secret.raw"] == ("failed", "unreadable: Permission denied")
    assert result.stdout.splitlines()[-1].endswith("0 refused, 1 failed")


def test_quota_and_a_file_that_changes_while_read(file_store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        make_file(src / f"q{n}.raw", 4096, seed=n)
    config = tmp_path / "quota.toml"
    config.write_text('[quotas.acme]\nimages = 2\n')
    result = file_store.cli("image", "import", "--project", "acme", "--config", str(config),
                            str(src), check=False)
    assert result.returncode == 1
    lines = summary(result)
    assert [lines[f"q{n}.raw"][0] for n in range(3)] == ["imported", "imported", "failed"]
    assert "over its images quota" in lines["q2.raw"][1]

    # A tool still writing the file: what was read is not what is there at the end.
    growing = make_file(tmp_path / "growing.raw", 4096)
    reader = _LocalReader(growing, growing.stat())
    with open(growing, "ab") as f:
        f.write(b"more")
    with pytest.raises(_SourceUnreadable, match="changed while it was read"):
        while reader.read(1 << 20):
            pass


def test_progress_bar_on_a_terminal(file_store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(2):
        make_file(src / f"p{n}.raw", 4096, seed=n)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    result = subprocess.run([*IMAGEFS, "image", "import", "--store", file_store.url,
                             "--project", "acme", str(src)], stderr=follower,
                            stdout=subprocess.PIPE, text=True, timeout=60)
    os.close(follower)
    shown = b""
    while True:
        try:
            piece = os.read(leader, 65536)
        except OSError:  # EIO: nothing left on the terminal
            break
        if not piece:
            break
        shown += piece
    os.close(leader)
    assert result.returncode == 0
    assert b"import:" in shown and b"0/2 files" in shown and b"8.00k" in shown, shown
    assert "2 imported (8192 bytes)" in result.stdout


def test_import_refuses_what_it_cannot_read(file_store, tmp_path):
    missing = file_store.cli("image", "import", "--project", "acme", str(tmp_path / "nope"),
                             check=False)
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    bad_tag = file_store.cli("image", "import", "--project", "acme", "--tag", "t" * 256,
                             str(tmp_path), check=False)
    assert bad_tag.returncode == 1 and "at most 255" in bad_tag.stderr


def test_a_store_failure_stops_the_run(tmp_path):
    """The catalog's store failing fails every later file the same way: stop, and say so."""

    class FailingStore(FileStore):
        writers = 0

        def open_writer(self, key):
            if key.startswith("data/"):
                self.writers += 1
                if self.writers == 2:
                    raise StoreUnavailable("data: the store is unavailable")
            return super().open_writer(key)

    src = tmp_path / "src"
    src.mkdir()
    for n in range(4):
        make_file(src / f"s{n}.raw", 4096, seed=n)
    (tmp_path / "store").mkdir()
    catalog = CatalogStore(FailingStore(str(tmp_path / "store")))
    report = run_import(catalog, Settings(), str(src), ImportOptions(project="acme"))
    assert [(o.path, o.result) for o in report.outcomes] == [("s0.raw", "imported"),
                                                            ("s1.raw", "failed")]
    assert report.exit_status() == 1 and report.not_done == 2
    assert report.lines()[-1] == ("stopped: data: the store is unavailable: 2 more files not "
                                  "imported yet; run the same command again to finish")
