"""Pure unit tests: records, names, sizes, config, retry. No FUSE, no server."""

from __future__ import annotations

import json

import pytest

from imagefs.config import load_settings, parse_size
from imagefs.errors import InvalidValue, ReadOnlyField, StoreUnavailable
from imagefs.naming import assign_names, natural_name
from imagefs.records import ImageRecord, parse_field
from imagefs.retry import Backoff, retry


def image(name, fmt="qcow2", created=1, **kw):
    return ImageRecord.new("acme", name=name, disk_format=fmt, created_at=created, **kw)


class TestRecords:
    def test_glance_json_has_glance_keys_and_types(self):
        rec = image("u", tags=["a"], properties={"os_distro": "ubuntu"}, min_ram=512)
        doc = rec.glance_json()
        assert doc["min_ram"] == 512 and doc["protected"] is False
        assert doc["tags"] == ["a"] and doc["os_distro"] == "ubuntu"
        assert doc["self"] == f"/v2/images/{rec.id}"
        assert doc["created_at"].endswith("Z") and "T" in doc["created_at"]
        assert doc["virtual_size"] is None

    def test_metadata_items_are_text_and_skip_nulls_and_links(self):
        items = image("u", tags=["a", "b"]).metadata_items()
        assert items["tags"] == '["a","b"]'
        assert items["protected"] == "false" and items["min_disk"] == "0"
        assert "virtual_size" not in items and "self" not in items and "file" not in items

    @pytest.mark.parametrize("fields, message", [
        ({"name": "x" * 256}, "at most 255"),
        ({"tags": ["t"] * 0 + [f"t{i}" for i in range(129)]}, "at most 128"),
        ({"tags": ["x" * 256]}, "at most 255"),
        ({"properties": {f"k{i}": "v" for i in range(129)}}, "at most 128"),
        ({"properties": {"checksum": "x"}}, "reserved"),
        ({"properties": {"os_glance_import": "x"}}, "reserved"),
        ({"disk_format": "exe"}, "disk_format"),
        ({"visibility": "everyone"}, "visibility"),
        ({"min_ram": -1}, "between"),
    ])
    def test_validation_refuses_what_glance_refuses(self, fields, message):
        with pytest.raises((InvalidValue, ReadOnlyField), match=message):
            ImageRecord.new("acme", **fields)

    def test_parse_field(self):
        assert parse_field("min_ram", "2048") == 2048
        assert parse_field("protected", "true") is True
        assert parse_field("tags", '["x"]') == ["x"]
        with pytest.raises(InvalidValue):
            parse_field("min_disk", "-3")
        with pytest.raises(ReadOnlyField):
            parse_field("checksum", "abc")

    def test_round_trip(self):
        rec = image("u", members={"beta": "accepted"})
        assert ImageRecord.from_dict(rec.to_dict()) == rec


class TestNaming:
    def test_extension_appended_unless_present(self):
        assert natural_name(image("ubuntu")) == "ubuntu.qcow2"
        assert natural_name(image("ubuntu.QCOW2")) == "ubuntu.QCOW2"
        assert natural_name(image("disk", "iso")) == "disk.iso"

    def test_unsafe_characters_and_dots(self):
        assert natural_name(image("a/b\0c\x01d", "raw")) == "a_b_c_d.raw"
        assert natural_name(image(".", "raw")) == "_..raw"
        assert natural_name(image("..", "raw")) == "_...raw"

    def test_empty_or_null_name_is_id(self):
        for name in ("", None):
            rec = image(name, "raw")
            assert natural_name(rec) == f"{rec.id}.raw"

    def test_truncated_to_255_bytes_keeping_extension(self):
        name = natural_name(image("é" * 250, "vmdk"))
        assert len(name.encode()) <= 255 and name.endswith(".vmdk")
        name.encode().decode()  # still valid UTF-8

    def test_collisions_newest_keeps_name(self):
        old, new, newest = image("u", created=1), image("u", created=2), image("u", created=3)
        names = assign_names([old, newest, new])
        assert names["u.qcow2"] is newest
        assert names[f"u~{new.id[:8]}.qcow2"] is new
        assert names[f"u~{old.id[:8]}.qcow2"] is old

    def test_collision_tie_broken_by_id(self):
        a, b = image("u", created=5), image("u", created=5)
        winner = max(a, b, key=lambda r: r.id)
        assert assign_names([a, b])["u.qcow2"] is winner


class TestConfig:
    @pytest.mark.parametrize("text, value", [("512M", 512 << 20), ("10G", 10 << 30),
                                             ("4096", 4096), ("1.5K", 1536), ("2GiB", 2 << 30)])
    def test_sizes(self, text, value):
        assert parse_size(text) == value

    @pytest.mark.parametrize("text", ["", "ten", "5X", "-1G"])
    def test_bad_sizes(self, text):
        with pytest.raises(InvalidValue):
            parse_size(text)

    def test_file_then_flags(self, tmp_path, monkeypatch):
        path = tmp_path / "c.toml"
        path.write_text('store = "file:///a"\ncache_size = "1G"\n[s3]\nregion = "eu-west-1"\n')
        monkeypatch.setenv("IMAGEFS_CONFIG", str(path))
        settings = load_settings(None, {"store": "file:///b"})
        assert settings.store == "file:///b" and settings.cache_size == 1 << 30
        assert settings.s3.region == "eu-west-1"

    def test_unknown_key_is_an_error(self, tmp_path):
        path = tmp_path / "c.toml"
        path.write_text('cache_sise = "1G"\n')
        with pytest.raises(InvalidValue, match="cache_sise"):
            load_settings(str(path))


class TestRetry:
    def test_retries_temporary_failures_then_succeeds(self):
        calls = []

        @retry(lambda e: isinstance(e, ConnectionError), deadline=5, backoff=Backoff(0.001),
               sleep=lambda s: None)
        def flaky():
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionError("boom")
            return "ok"

        assert flaky() == "ok" and len(calls) == 3

    def test_final_failures_are_not_retried(self):
        calls = []

        @retry(lambda e: isinstance(e, ConnectionError), sleep=lambda s: None)
        def broken():
            calls.append(1)
            raise KeyError("x")

        with pytest.raises(KeyError):
            broken()
        assert len(calls) == 1

    def test_deadline_bounds_the_wait(self):
        @retry(lambda e: True, deadline=0.05, backoff=Backoff(0.01))
        def down():
            raise ConnectionError("down")

        with pytest.raises(StoreUnavailable, match="still failing"):
            down()


def test_json_text_of_tags_is_a_json_array():
    assert json.loads(image("u", tags=["a b", "c"]).metadata_items()["tags"]) == ["a b", "c"]


def test_example_config_loads():
    from pathlib import Path
    example = Path(__file__).parent.parent / "mountscripts/imagefs.toml.example"
    settings = load_settings(str(example))
    assert settings.cache_size == 20 << 30 and settings.s3.part_size == 16 << 20
    assert settings.access is not None and settings.access.projects["acme"] == ["alice", "@acme"]
    assert settings.quotas["acme"].images == 100 and settings.quotas["*"].staging == 20 << 30


class TestErrnoTable:
    def test_every_domain_error_has_its_errno(self):
        import errno

        from imagefs import errors
        assert errors.errno_for(errors.UnsafeImage("x")) == errno.EINVAL  # via InvalidValue
        assert errors.errno_for(errors.ReadOnlyField("x")) == errno.EPERM
        assert errors.errno_for(errors.StoreNotFound("x")) == errno.ENOENT
        assert errors.errno_for(errors.QuotaExceeded("x")) == errno.EDQUOT
        assert errors.errno_for(errors.StagingFull("x")) == errno.ENOSPC
        assert errors.errno_for(RuntimeError("a bug")) == errno.EIO


class TestQuotas:
    def test_refuses_only_what_goes_over(self):
        from imagefs.errors import QuotaExceeded
        from imagefs.quotas import Quota, Quotas, Usage
        quotas = Quotas({"acme": Quota(images=2, stored=100), "*": Quota(staging=10)})
        quotas.check("acme", Usage(1, 50), Usage(1, 50))  # exactly at the limit
        with pytest.raises(QuotaExceeded, match="over its stored quota"):
            quotas.check("acme", Usage(1, 50), Usage(0, 51))
        with pytest.raises(QuotaExceeded, match="over its images quota"):
            quotas.check("acme", Usage(2, 0), Usage(1, 0))
        quotas.check("acme", Usage(5, 500), Usage(0, 0))  # over already: nothing added
        with pytest.raises(QuotaExceeded, match=r"\[quotas.beta\] staging"):
            quotas.check("beta", Usage(), Usage(0, 0, 11))
        assert not Quotas({}).limits("acme")
