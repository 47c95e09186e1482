"""The CLI contract: create/list/show/set/delete, JSON forms, and one-line errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import make_file, run_cli


def test_create_show_list_set_delete(store, tmp_path):
    src = make_file(tmp_path / "ubuntu.img", 3 << 20, seed=11)
    image_id = store.create(src, "acme", "--name", "ubuntu", "--tag", "lts", "--property",
                            "os_distro=ubuntu", "--visibility", "shared", "--min-disk", "2")
    doc = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert doc["id"] == image_id and doc["status"] == "active" and doc["owner"] == "acme"
    assert doc["disk_format"] == "raw" and doc["container_format"] == "bare"
    assert doc["size"] == 3 << 20 and doc["virtual_size"] == 3 << 20
    assert doc["os_hash_algo"] == "sha512" and len(doc["os_hash_value"]) == 128
    assert doc["tags"] == ["lts"] and doc["os_distro"] == "ubuntu" and doc["min_disk"] == 2
    assert doc["visibility"] == "shared" and doc["protected"] is False

    listed = json.loads(store.cli("image", "list", "--json").stdout)
    assert [d["id"] for d in listed] == [image_id]
    assert json.loads(store.cli("image", "list", "--project", "other", "--json").stdout) == []
    table = store.cli("image", "list").stdout
    assert "ubuntu" in table and image_id in table

    store.cli("image", "set", image_id, "--name", "noble", "--tag", "new", "--remove-tag",
              "lts", "--property", "hw=virtio", "--remove-property", "os_distro",
              "--protected")
    doc = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert doc["name"] == "noble" and doc["tags"] == ["new"] and doc["hw"] == "virtio"
    assert "os_distro" not in doc and doc["protected"] is True

    refused = store.cli("image", "delete", image_id, check=False)
    assert refused.returncode == 1 and "protected" in refused.stderr
    store.cli("image", "set", image_id, "--unprotected")
    deleted = store.cli("image", "delete", image_id)
    assert "restorable" in deleted.stderr
    assert json.loads(store.cli("image", "show", image_id, "--json").stdout)["status"] == \
        "pending_delete"
    assert store.cli("image", "scrub").stdout.startswith("purged 0 ")  # still in its grace
    store.cli("image", "restore", image_id)
    assert json.loads(store.cli("image", "show", image_id, "--json").stdout)["status"] == \
        "active"
    store.cli("image", "delete", "--now", image_id)
    gone = store.cli("image", "show", image_id, check=False)
    assert gone.returncode == 1 and "no image with id" in gone.stderr
    assert store.has_object(f"manifests/{image_id}.msgpack") is False
    assert not store.has_object(f"data/{image_id}") and not store.has_object(f"blocks/{image_id}")


def test_scrub_purges_after_the_grace_period(file_store, tmp_path):
    image_id = file_store.create(make_file(tmp_path / "a.raw", 4096), "acme")
    file_store.cli("image", "delete", image_id)
    config = tmp_path / "grace.toml"
    config.write_text("delete_grace = 0.0\n")
    assert file_store.cli("image", "scrub", "--config", str(config)).stdout.startswith(
        "purged 1 deleted image whose")
    assert file_store.cli("image", "show", image_id, check=False).returncode == 1


def test_create_json_prints_glance_form(file_store, tmp_path):
    src = make_file(tmp_path / "a.raw", 4096)
    doc = json.loads(file_store.cli("image", "create", "--project", "p", "--json",
                                    str(src)).stdout)
    assert doc["name"] == "a" and doc["schema"] == "/v2/schemas/image"  # less its .raw
    assert doc["file"] == f"/v2/images/{doc['id']}/file"


@pytest.mark.parametrize("args, message", [
    (["image", "list", "--store", "nope://x"], "unknown store scheme"),
    (["image", "list", "--store", "file:///does/not/exist"], "does not exist"),
    (["image", "create", "--store", "file:///tmp", "--project", "p", "/no/such/file"],
     "no such file"),
    (["image", "create", "--store", "file:///tmp", "--project", "bad project", "/etc/hostname"],
     "invalid project"),
    (["image", "create", "--store", "file:///tmp", "--project", "p", "--property",
      "checksum=1", "/etc/hostname"], "reserved"),
    (["image", "create", "--store", "file:///tmp", "--project", "p", "--name", "x" * 256,
      "/etc/hostname"], "at most 255"),
    (["image", "show", "--store", "file:///tmp", "0000"], "no image with id"),
    (["image", "list"], "no store given"),
])
def test_bad_input_is_one_line(args, message):
    result = run_cli(*args, check=False, env={"IMAGEFS_CONFIG": "/dev/null"})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_s3_errors_are_one_line(s3_server, s3_store, tmp_path):
    src = make_file(tmp_path / "a.raw", 4096)
    cases = [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, s3_store.url, "access denied"),
        ({}, "s3://no-such-bucket-here/x", "bucket does not exist"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, s3_store.url, "unavailable"),
    ]
    for env, url, message in cases:
        result = run_cli("image", "create", "--store", url, "--project", "p", str(src),
                         check=False, env={**s3_server.environ(), **env}, timeout=60)
        assert result.returncode == 1, result
        assert message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_config_file_supplies_the_store(file_store, tmp_path):
    config = tmp_path / "imagefs.toml"
    config.write_text(f'store = "{file_store.url}"\n')
    make = make_file(tmp_path / "c.raw", 4096)
    image_id = run_cli("image", "create", "--project", "p", str(make),
                       env={"IMAGEFS_CONFIG": str(config)}).stdout.strip()
    listed = run_cli("image", "list", "--config", str(config), "--json").stdout
    assert image_id in listed


def test_help_explains():
    out = run_cli("mount", "--help").stdout
    assert "--cache-size" in out and "--allow-other" in out and "every local user" in out
    assert "image" in run_cli("--help").stdout


def test_scrub_sweeps_what_crashes_left(file_store, tmp_path):
    """Objects no manifest names (an upload or purge cut short) go once a day old."""
    image_id = file_store.create(make_file(tmp_path / "kept.raw", 4096, seed=3), "acme")
    root = Path(file_store.url.removeprefix("file://"))
    orphan = "0f1e2d3c-0000-4000-8000-000000000000"
    old = [root / f"data/{orphan}", root / f"blocks/{orphan}",
           root / f"data/{image_id}.tmp-deadbeef"]
    fresh = root / "data/0f1e2d3c-1111-4000-8000-000000000000"
    for path in old + [fresh]:
        path.write_bytes(b"left by a crash")
    day_ago = time.time() - 2 * 86400
    for path in old:
        os.utime(path, (day_ago, day_ago))
    result = file_store.cli("image", "scrub")
    assert "removed 3 objects" in result.stderr
    assert not any(p.exists() for p in old) and fresh.exists()
    assert (root / f"data/{image_id}").exists() and (root / f"blocks/{image_id}").exists()
