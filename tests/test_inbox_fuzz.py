"""Mutated, truncated and odd files copied into a real mount's inbox.

Each must end as a published image or a `<name>.error` report, promptly and without a
traceback, and the daemon must stay up. The quick size copies QUICK_FILES mutants (the
seeds and mutations of test_fuzz_formats); IMAGEFS_LONG=1 copies LONG_FILES.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from conftest import LONG, need
from test_fuzz_formats import make_seeds, mutant
from test_inbox import config, published, wait
from test_inspect import README, qemu_image

from imagefs.naming import image_name

MiB = 1 << 20
QUICK_FILES, LONG_FILES = 100, 1000
DEADLINE = 600 if LONG else 240  # for all files to settle, upload and be decided


def _mutants(tmp_path: Path, count: int) -> dict[str, bytes]:
    seeds = make_seeds(tmp_path)
    kinds = sorted(seeds)
    rng = random.Random(20)
    files: dict[str, bytes] = {}
    while len(files) < count:
        kind = kinds[len(files) % len(kinds)]
        data, _ = mutant(seeds[kind], rng)
        if data:  # an empty file waits in the inbox for its data, by design
            files[f"m{len(files):04d}-{kind}.img"] = data
    return files


def _settle(inbox: Path, names: set[str]) -> set[str]:
    """Wait until every name has left the inbox; return those that left a report."""
    deadline = time.monotonic() + DEADLINE
    while True:
        listing = set(os.listdir(inbox))
        if not names & listing:
            return {name for name in names if name + ".error" in listing}
        assert time.monotonic() < deadline, \
            f"still in the inbox after {DEADLINE}s: {sorted(names & listing)[:10]}"
        time.sleep(0.2)


def test_mutated_files_are_published_or_reported(file_store, mount, tmp_path):
    (tmp_path / "seeds").mkdir()
    files = _mutants(tmp_path / "seeds", LONG_FILES if LONG else QUICK_FILES)
    m = mount(file_store, extra=config(tmp_path, settle_time=0.2))
    inbox = m / "inbox/acme"
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    reported = _settle(inbox, set(files))

    file_of = {image_name(name): name for name in files}  # the image name drops the .img
    images = {file_of[os.getxattr(m / "by-id" / image_id, "user.glance.name").decode()]:
              image_id for image_id in os.listdir(m / "by-id")}
    assert set(images) == set(files) - reported
    for name, image_id in images.items():
        assert (m / "by-id" / image_id).read_bytes() == files[name], name
    for name in reported:
        assert (inbox / f"{name}.error").read_text().startswith(f"{name} was not published: ")
    assert images and reported, "expected both outcomes among the mutants"
    assert "retrying" not in m.log(), "an inspection failure was taken for a store failure"
    assert m.process.poll() is None and os.listdir(m.path)


def test_a_text_file_is_published_promptly_as_raw(file_store, mount, tmp_path):
    m = mount(file_store, extra=config(tmp_path))
    started = time.monotonic()
    subprocess.run(["cp", str(README), str(m / "inbox/acme/")], check=True)
    image_id = published(m / "inbox/acme/README.md")
    assert time.monotonic() - started < 15, "not prompt: was the upload retried?"
    assert os.getxattr(m / f"by-id/{image_id}", "user.glance.disk_format") == b"raw"
    assert (m / f"by-id/{image_id}").read_bytes() == README.read_bytes()
    assert "retrying" not in m.log()


def test_a_truncated_qcow2_is_reported_and_refused(file_store, mount, tmp_path):
    need("qemu-img")
    qcow = qemu_image(tmp_path, "qcow2", size=32 * MiB)
    mapping = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(qcow)],
                                        check=True, capture_output=True, text=True).stdout)
    assert max(e["offset"] + e["length"] for e in mapping if "offset" in e) > 30 * MiB, \
        "the L2 table and refcounts should point far past the cut"
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(qcow.read_bytes()[:MiB])

    m = mount(file_store, extra=config(tmp_path))
    subprocess.run(["cp", str(cut), str(m / "inbox/acme/")], check=True)
    result = wait(m / "inbox/acme/cut.qcow2")
    assert result.returncode == 1, result
    report = (m / "inbox/acme/cut.qcow2.error").read_text()
    assert "the qcow2 image looks truncated" in report and "copy it again" in report
    assert os.listdir(m / "by-id") == []

    created = file_store.cli("image", "create", "--project", "acme", str(cut), check=False)
    assert created.returncode == 1
    assert len(created.stderr.splitlines()) == 1, created.stderr
    assert "the qcow2 image looks truncated" in created.stderr
