"""Access control on a real --allow-other mount, as real unix users (docs/access.md).

The users and groups are made here (useradd); each user runs its whole batch of
operations in one process (tests/as_user.py under setpriv). The expected outcomes are
data written from Glance's rules: who may open each image by id, who sees it listed.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mount, StoreHandle, make_file, run_cli

HERE = Path(__file__).parent
AS_USER = HERE / "as_user.py"
MiB = 1 << 20

# The people of the test host: user -> groups. carol administers, qemu is the hypervisor.
USERS = {"alice": ["ifs-acme"], "bob": ["ifs-beta"], "carol": ["ifs-admins"],
         "qemu": ["ifs-kvm"], "mallory": [], "dave": ["ifs-acme", "ifs-beta"]}
ACCESS = """
[access]
admins = ["@ifs-admins"]
readers = ["@ifs-kvm"]
[access.projects]
acme = ["ifs-alice", "@ifs-acme"]
beta = ["@ifs-beta"]
"""
EVERYONE = set(USERS)

# name: (owner, visibility, members, status)
IMAGES = {
    "acme-private": ("acme", "private", {}, "active"),
    "acme-public": ("acme", "public", {}, "active"),
    "acme-community": ("acme", "community", {}, "active"),
    "acme-shared": ("acme", "shared", {}, "active"),
    "acme-pending": ("acme", "shared", {"beta": "pending"}, "active"),
    "acme-accepted": ("acme", "shared", {"beta": "accepted"}, "active"),
    "acme-rejected": ("acme", "shared", {"beta": "rejected"}, "active"),
    "acme-deactivated": ("acme", "public", {}, "deactivated"),
    "beta-private": ("beta", "private", {}, "active"),
}
ACME = {"alice", "dave"}
BETA = {"bob", "dave"}
# Glance's show rule: who may look each image up by id (stat, getfattr, open).
OPENABLE = {
    "acme-private": ACME | {"carol", "qemu"},
    "acme-public": EVERYONE,
    "acme-community": EVERYONE,
    "acme-shared": ACME | {"carol", "qemu"},
    "acme-pending": ACME | BETA | {"carol", "qemu"},
    "acme-accepted": ACME | BETA | {"carol", "qemu"},
    "acme-rejected": ACME | BETA | {"carol", "qemu"},
    "acme-deactivated": EVERYONE,  # listed and shown; only admins may open it
    "beta-private": BETA | {"carol", "qemu"},
}
# Glance's list rule, for by-id/ and tags/: owner, public, accepted members, admins.
LISTED = {
    "acme-private": ACME | {"carol"},
    "acme-public": EVERYONE - {"qemu"},
    "acme-community": ACME | {"carol"},
    "acme-shared": ACME | {"carol"},
    "acme-pending": ACME | {"carol"},
    "acme-accepted": ACME | BETA | {"carol"},
    "acme-rejected": ACME | {"carol"},
    "acme-deactivated": EVERYONE - {"qemu"},
    "beta-private": BETA | {"carol"},
}
# Who may enter projects/<p>/ and inbox/<p>/.
MEMBERS = {"acme": ACME | {"carol"}, "beta": BETA | {"carol"}}
# What each folder holds by its structure; the caller then sees what it may list there.
HOLDS = {
    "public": {n for n, (_, v, _, _) in IMAGES.items() if v == "public"},
    "community": {n for n, (_, v, _, _) in IMAGES.items() if v == "community"},
    "by-id": set(IMAGES),
    "tags/t": set(IMAGES),
    **{f"projects/{p}/{vis}": {n for n, (o, v, _, _) in IMAGES.items() if o == p and v == vis}
       for p in ("acme", "beta") for vis in ("private", "shared", "community", "public")},
    **{f"projects/{p}/{folder}": {n for n, (_, v, m, _) in IMAGES.items()
                                  if v == "shared" and m.get(p) == status}
       for p in ("acme", "beta")
       for folder, status in (("invitations", "pending"), ("shared-with-me", "accepted"))},
}


def folder_viewers(folder: str, image: str) -> set[str]:
    if folder in ("public", "community"):
        return (EVERYONE - {"qemu"}) if IMAGES[image][1] == folder else set()
    if folder.startswith("projects/"):
        return MEMBERS[folder.split("/")[1]]
    return LISTED[image]  # by-id/, tags/t/


def run_as(user: str, ops: list[list[str]]) -> list[object]:
    """Run ops as the unix user ifs-<user>, with its groups from the group database."""
    entry = pwd.getpwnam(f"ifs-{user}")
    result = subprocess.run(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
         "/usr/bin/python3", str(AS_USER)],
        input=json.dumps(ops), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def unix_users() -> Iterator[None]:
    groups = {g for gs in USERS.values() for g in gs}
    for group in sorted(groups):
        subprocess.run(["groupadd", "-f", group], check=True)
    made = []
    for user, member_of in USERS.items():
        name = f"ifs-{user}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            *(["-G", ",".join(member_of)] if member_of else []), name],
                           check=True)
            made.append(name)
    yield
    for name in made:
        subprocess.run(["userdel", name], check=False)
    for group in sorted(groups):
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@contextlib.contextmanager
def shared_host(config_text: str) -> Iterator[tuple[Path, StoreHandle, Path]]:
    """A folder every user can reach, holding a file:// store and a config."""
    root = Path(tempfile.mkdtemp(prefix="imagefs-access-"))
    root.chmod(0o755)
    (root / "store").mkdir()
    config = root / "imagefs.toml"
    config.write_text(config_text)
    try:
        yield root, StoreHandle("file", f"file://{root / 'store'}"), config
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mounted_for_everyone(store: StoreHandle, root: Path, config: Path) -> Iterator[Mount]:
    mount = Mount(store, root, extra=("--allow-other", "--config", str(config)))
    try:
        yield mount.start()
    finally:
        mount.stop()
        assert "Traceback" not in mount.log(), mount.log()


BASE = "settle_time = 0.3\nrefresh_interval = 0.5\n"


@pytest.fixture(scope="module")
def world(unix_users, tmp_path_factory) -> Iterator[tuple[Mount, StoreHandle, dict[str, str]]]:
    """A file:// catalog holding every kind of image, mounted for everyone."""
    with shared_host(BASE + ACCESS) as (root, store, config):
        src = make_file(tmp_path_factory.mktemp("img") / "x.raw", 8192, seed=1)
        ids = _populate(store, src)
        with mounted_for_everyone(store, root, config) as mount:
            yield mount, store, ids


def _populate(store: StoreHandle, src: Path) -> dict[str, str]:
    ids = {}
    for name, (owner, visibility, members, status) in IMAGES.items():
        ids[name] = store.create(src, owner, "--name", name, "--visibility", visibility,
                                 "--tag", "t")
        for project, answer in members.items():
            store.cli("member", "add", ids[name], project)
            if answer != "pending":
                store.cli("member", "set", ids[name], project, answer)
        if status == "deactivated":
            store.cli("image", "deactivate", ids[name])
    return ids


def _matrix(mount: Mount, ids: dict[str, str], user: str) -> list[tuple[list[str], object]]:
    """(op, expected outcome) for one caller: every image by id and by path, every folder."""
    cases: list[tuple[list[str], object]] = []
    for name, image_id in ids.items():
        owner, visibility = IMAGES[name][:2]
        seen = user in OPENABLE[name]
        by_id = str(mount / f"by-id/{image_id}")
        cases.append((["stat", by_id], "ok" if seen else "ENOENT"))
        cases.append((["getfattr", by_id, "user.glance.name"], "ok" if seen else "ENOENT"))
        opens = "ok" if IMAGES[name][3] == "active" or user == "carol" else "EACCES"
        cases.append((["read", by_id], opens if seen else "ENOENT"))
        path = str(mount / f"projects/{owner}/{visibility}/{name}.raw")
        cases.append((["stat", path], "ok" if user in MEMBERS[owner] else "ENOENT"))
        changes = user in MEMBERS[owner]  # owner's members and admins change an image
        cases.append((["setfattr", by_id, f"user.glance.by_{user}", "x"],
                      "ok" if changes else "EACCES" if seen else "ENOENT"))
        if not changes:  # refused deletes change nothing; allowed ones are tested apart
            cases.append((["rm", by_id], "EACCES" if seen else "ENOENT"))
        cases.append((["mv", by_id, by_id + "-renamed"], "EPERM" if seen else "ENOENT"))
    for folder, held in HOLDS.items():
        if folder.startswith("projects/") and user not in MEMBERS[folder.split("/")[1]]:
            cases.append((["ls", str(mount / folder)], "ENOENT"))
            continue
        names = {n for n in held if user in folder_viewers(folder, n)}
        shown = sorted(ids[n] if folder == "by-id" else f"{n}.raw" for n in names)
        if folder == "tags/t" and not shown:
            cases.append((["ls", str(mount / folder)], "ENOENT"))  # no tag t for them
        else:
            cases.append((["ls", str(mount / folder)], shown))
    cases.append((["ls", str(mount / "projects")],
                  sorted(p for p, members in MEMBERS.items() if user in members)))
    cases.append((["ls", str(mount / "inbox")],
                  sorted(p for p, members in MEMBERS.items() if user in members)))
    for project, members in MEMBERS.items():
        cases.append((["cp", str(mount / f"inbox/{project}/matrix-{user}.part")],
                      "ok" if user in members else "ENOENT"))
    return cases


def test_every_caller_sees_exactly_what_glance_would_show(world):
    mount, store, ids = world
    failures, checked = [], 0
    for user in USERS:
        cases = _matrix(mount, ids, user)
        outcomes = run_as(user, [op for op, _ in cases])
        for (op, expected), got in zip(cases, outcomes, strict=True):
            checked += 1
            if got != expected:
                failures.append(f"{user}: {' '.join(op)}: expected {expected}, got {got}")
    print(f"access matrix: {checked} checks for {len(USERS)} callers")
    assert not failures, "\n".join(failures[:40])
    for project in MEMBERS:  # the matrix left temp files, never committed
        for name in os.listdir(mount / f"inbox/{project}"):
            os.unlink(mount / f"inbox/{project}/{name}")


def test_the_kernel_cache_never_answers_for_another_caller(world):
    mount, _store, ids = world
    path = str(mount / "projects/acme/private/acme-private.raw")
    by_id = str(mount / f"by-id/{ids['acme-private']}")
    for first, second in (("alice", "bob"), ("bob", "alice")):
        outcomes = {u: run_as(u, [["stat", path], ["stat", by_id]]) for u in (first, second)}
        assert outcomes["alice"] == ["ok", "ok"], (first, outcomes)
        assert outcomes["bob"] == ["ENOENT", "ENOENT"], (first, outcomes)
    assert run_as("bob", [["stat", str(mount / "projects/beta")]]) == ["ok"]
    assert run_as("alice", [["stat", str(mount / "projects/beta")]]) == ["ENOENT"]


def test_sharing_through_the_filesystem(world, tmp_path):
    mount, store, _ids = world
    image_id = store.create(make_file(tmp_path / "s.raw", 4096, seed=2), "acme",
                            "--name", "golden", "--visibility", "shared")
    mine = str(mount / "projects/acme/shared/golden.raw")
    invitation = str(mount / "projects/beta/invitations/golden.raw")
    accepted = str(mount / "projects/beta/shared-with-me/golden.raw")
    _wait(lambda: run_as("alice", [["stat", mine]]) == ["ok"])
    assert run_as("bob", [["setfattr", mine, "user.imagefs.members", '["beta"]']]) == \
        ["ENOENT"]
    assert run_as("alice", [["setfattr", mine, "user.imagefs.members", '["beta","beta"]'],
                            ["setfattr", mine, "user.imagefs.members",
                             json.dumps([f"p{i}" for i in range(129)])],
                            ["setfattr", mine, "user.imagefs.members", '["beta"]']]) == \
        ["EINVAL", "EINVAL", "ok"]
    invited, moved = run_as("bob", [["ls", str(mount / "projects/beta/invitations")],
                                    ["mv", invitation, accepted]])
    assert "golden.raw" in invited and moved == "ok"
    assert run_as("bob", [["stat", accepted], ["read", accepted]]) == ["ok", "ok"]
    shown = json.loads(store.cli("image", "show", image_id, "--json").stdout)
    assert shown["id"] == image_id
    assert store.cli("member", "list", image_id).stdout.split() == ["beta", "accepted"]
    # the owner cannot answer for the member: it cannot even see projects/beta/
    assert run_as("alice", [["rm", accepted]]) == ["ENOENT"]
    assert run_as("bob", [["rm", accepted]]) == ["ok"]  # a member rejects
    assert store.cli("member", "list", image_id).stdout.split() == ["beta", "rejected"]
    assert run_as("bob", [["stat", str(mount / f"by-id/{image_id}")]]) == ["ok"]  # by id
    assert run_as("alice", [["getfattr", mine, "user.imagefs.members"]]) == ["ok"]


def test_glance_policies_for_changes(world, tmp_path):
    mount, store, _ids = world
    src = make_file(tmp_path / "p.raw", 4096, seed=3)
    image_id = store.create(src, "acme", "--name", "policy")
    protected = store.create(src, "acme", "--name", "kept", "--protected")
    private = str(mount / "projects/acme/private/policy.raw")
    _wait(lambda: run_as("alice", [["stat", private],
                                   ["stat", str(mount / f"by-id/{protected}")]]) == ["ok"] * 2)
    assert run_as("alice", [
        ["mv", private, str(mount / "projects/acme/public/policy.raw")],  # publicize: admins
        ["mv", private, str(mount / "projects/acme/community/policy.raw")],  # communitize: ok
        ["setfattr", str(mount / f"by-id/{image_id}"), "user.glance.status", "deactivated"],
        ["rm", str(mount / f"by-id/{protected}")],
    ]) == ["EACCES", "ok", "EACCES", "EPERM"]
    assert run_as("bob", [["rm", str(mount / f"by-id/{image_id}")]]) == ["EACCES"]
    assert run_as("carol", [
        ["mv", str(mount / "projects/acme/community/policy.raw"),
         str(mount / "projects/acme/public/policy.raw")],
        ["rm", str(mount / f"by-id/{protected}")],  # protected: no one deletes it
    ]) == ["ok", "EPERM"]
    assert json.loads(store.cli("image", "show", image_id, "--json").stdout)["visibility"] \
        == "public"
    assert run_as("alice", [["rm", str(mount / f"by-id/{image_id}")]]) == ["ok"]
    log = mount.log()
    assert "publicizing an image is for admins only" in log
    assert f"only members of project acme (the owner) and admins change image {image_id}" \
        in log


def test_deactivated_images_open_for_admins_only(world, tmp_path):
    mount, store, _ids = world
    image_id = store.create(make_file(tmp_path / "d.raw", 4096, seed=4), "acme",
                            "--name", "paused", "--visibility", "public")
    by_id = str(mount / f"by-id/{image_id}")
    _wait(lambda: run_as("alice", [["stat", by_id]]) == ["ok"])
    assert run_as("carol", [["setfattr", by_id, "user.glance.status", "deactivated"]]) == \
        ["ok"]
    assert run_as("alice", [["stat", by_id], ["read", by_id],
                            ["ls", str(mount / "public")]])[:2] == ["ok", "EACCES"]
    assert "paused.raw" in run_as("bob", [["ls", str(mount / "public")]])[0]
    assert run_as("carol", [["read", by_id]]) == ["ok"]
    store.cli("image", "reactivate", image_id)
    _wait(lambda: run_as("alice", [["read", by_id]]) == ["ok"])


def test_the_reader_role_opens_by_id_and_lists_nothing(world):
    mount, _store, ids = world
    ops = [["read", str(mount / f"by-id/{ids[n]}")] for n in IMAGES if n != "acme-deactivated"]
    ops += [["ls", str(mount / "by-id")], ["ls", str(mount / "public")],
            ["ls", str(mount / "projects")], ["ls", str(mount / "inbox")],
            ["setfattr", str(mount / f"by-id/{ids['acme-public']}"), "user.glance.x", "y"],
            ["cp", str(mount / "inbox/acme/x.raw")]]
    assert run_as("qemu", ops) == ["ok"] * (len(IMAGES) - 1) + [[], [], [], [], "EACCES",
                                                                  "ENOENT"]
    image = mount / f"by-id/{ids['acme-private']}"
    entry = pwd.getpwnam("ifs-qemu")
    info = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                           "--init-groups", "qemu-img", "info", "--output=json", str(image)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and json.loads(info.stdout)["format"] == "raw", info.stderr


def test_the_daemon_counters_and_status_are_for_admins_only(world):
    """They count every project's images and name every caller's refusals."""
    mount, _store, _ids = world
    ops = [["getfattr", str(mount.path), key]
           for key in ("user.imagefs.stats", "user.imagefs.daemon")]
    for user in ("alice", "mallory", "qemu"):
        assert run_as(user, ops) == ["ENODATA", "ENODATA"], user
    assert run_as("carol", ops) == ["ok", "ok"]


def test_quotas_stop_one_project_filling_the_store(unix_users, tmp_path):
    quotas = '[quotas.acme]\nimages = 2\nstored = "3M"\n[quotas.beta]\nstaging = "1M"\n'
    with shared_host(BASE + ACCESS + quotas) as (root, store, config):
        store.create(make_file(tmp_path / "q.raw", MiB, seed=5), "acme")
        with mounted_for_everyone(store, root, config) as mount:
            inbox = mount / "inbox/acme"
            big = make_file(tmp_path / "big.raw", 3 * MiB, seed=6)
            copy = subprocess.run(["cp", str(big), str(inbox / "big.raw")],
                                  capture_output=True, text=True)
            assert copy.returncode != 0 and "Disk quota exceeded" in copy.stderr
            _wait(lambda: (inbox / "big.raw.error").exists())
            assert "over its stored quota" in (inbox / "big.raw.error").read_text()
            small = make_file(tmp_path / "small.raw", MiB, seed=7)
            subprocess.run(["cp", str(small), str(inbox / "second.raw")], check=True)
            waited = run_cli("inbox", "wait", str(inbox / "second.raw"), "--timeout", "60",
                             check=False)
            assert waited.returncode == 0, waited.stdout
            third = subprocess.run(["cp", str(small), str(inbox / "third.raw")],
                                   capture_output=True, text=True)
            assert third.returncode != 0 and "Disk quota exceeded" in third.stderr
            beta = make_file(tmp_path / "b.raw", 2 * MiB, seed=8)
            staging = subprocess.run(["cp", str(beta), str(mount / "inbox/beta/b.raw")],
                                     capture_output=True, text=True)
            assert staging.returncode != 0 and "Disk quota exceeded" in staging.stderr
            refused = run_cli("image", "create", "--store", store.url, "--config", str(config),
                              "--project", "acme", str(small), check=False)
            assert refused.returncode == 1 and "over its images quota" in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
            images = json.loads(store.cli("image", "list", "--json").stdout)
            assert sorted(i["size"] for i in images) == [MiB, MiB]  # nothing stored touched


HOSTILE = ["../../etc/passwd", "a/b", ".", "..", "", "x" * 300, "ctl\x01\x7fchars",
           "rtl\u202eoverride", "emoji \U0001F600", "spaces  and\ttabs"]


def test_hostile_names_are_shown_safely_or_refused(world, tmp_path):
    mount, store, _ids = world
    src = make_file(tmp_path / "h.raw", 4096, seed=9)
    made = {}
    for name in HOSTILE:
        result = store.cli("image", "create", "--project", "beta", "--name", name, str(src),
                           check=False)
        if len(name) > 255:
            assert result.returncode == 1 and "at most 255" in result.stderr
        else:
            assert result.returncode == 0, (name, result.stderr)
            made[name] = result.stdout.strip()
    folder = mount / "projects/beta/private"
    _wait(lambda: len(run_as("bob", [["ls", str(folder)]])[0]) >= len(made) + 1)
    listed = run_as("bob", [["ls", str(folder)]])[0]
    for name in listed:
        assert "/" not in name and name not in (".", ".."), name
        assert not any(ord(c) < 32 or ord(c) == 127 for c in name), name
        target = (folder / name).resolve()
        assert str(target).startswith(str(mount.path)), name
    assert f"{made['']}.raw" in listed  # an empty name shows the id
    assert ".._.._etc_passwd.raw" in listed and "a_b.raw" in listed
    inbox = os.fsencode(mount / "inbox/beta")
    outcomes = run_as("bob", [["cp", os.fsdecode(inbox + b"/bad\xff.raw")],
                              ["cp", str(mount / "inbox/beta" / ("y" * 255))]])
    assert outcomes == ["EINVAL", "ok"]
    os.unlink(mount / "inbox/beta" / ("y" * 255))
    for image_id in made.values():
        store.cli("image", "delete", "--now", image_id)


def test_anonymous_none_shows_unmapped_users_nothing(unix_users, tmp_path):
    config = BASE + ACCESS.replace("[access]\n", '[access]\nanonymous = "none"\n')
    with shared_host(config) as (root, store, config_path):
        image_id = store.create(make_file(tmp_path / "a.raw", 4096, seed=10), "acme",
                                "--visibility", "public")
        with mounted_for_everyone(store, root, config_path) as mount:
            assert run_as("mallory", [["ls", str(mount / "public")],
                                      ["stat", str(mount / f"by-id/{image_id}")]]) == \
                [[], "ENOENT"]
            assert run_as("bob", [["stat", str(mount / f"by-id/{image_id}")]]) == ["ok"]


def _wait(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)



def test_review_holes_stay_closed(world, tmp_path):
    """What a security review found; each must stay fixed."""
    mount, store, ids = world
    inbox = mount / "inbox/acme"
    # 1. a member cannot publish an upload as public; an admin can
    assert run_as("alice", [["cp", str(inbox / "evil.part")],
                            ["setfattr", str(inbox / "evil.part"), "user.glance.visibility",
                             "public"],
                            ["setfattr", str(inbox / "evil.part"), "user.glance.visibility",
                             "community"]]) == ["ok", "EACCES", "ok"]
    assert run_as("carol", [["setfattr", str(inbox / "evil.part"), "user.glance.visibility",
                             "public"]]) == ["ok"]
    os.unlink(inbox / "evil.part")
    # 2. the cache and the spool are the daemon's alone
    for path in (mount.cache_dir / "lmdb", mount.cache_dir / "spool"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert run_as("mallory", [["read", str(mount.cache_dir / "lmdb/data.mdb")]]) == ["EACCES"]
    # 3. a request's gid is not a group membership (a setgid program cannot keep one)
    admins = grp.getgrnam("ifs-admins").gr_gid
    entry = pwd.getpwnam("ifs-mallory")
    as_admins_gid = subprocess.run(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={admins}", "--clear-groups",
         "stat", str(mount / f"by-id/{ids['beta-private']}")], capture_output=True, text=True)
    assert as_admins_gid.returncode != 0 and "No such file" in as_admins_gid.stderr
    # 4. statfs tells a caller about its own images only
    counts = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                             "--init-groups", "stat", "-f", "-c", "%c", str(mount.path)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert counts == [str(len(run_as("mallory", [["ls", str(mount / "by-id")]])[0]))]
    # 5. deeply nested JSON is EINVAL for the owner, EACCES for anyone else, never EIO
    deep = "[" * 60000
    public = str(mount / f"by-id/{ids['acme-public']}")
    assert run_as("mallory", [["setfattr", public, "user.imagefs.members", deep],
                              ["setfattr", public, "user.glance.tags", deep]]) == \
        ["EACCES", "EACCES"]
    assert run_as("alice", [["setfattr", public, "user.glance.tags", deep]]) == ["EINVAL"]
    # 6. names: no bidirectional controls, no names over 255 bytes in the inbox
    assert run_as("alice", [["cp", str(inbox / "photo\u202egpj.part")],
                            ["cp", str(inbox / ("x" * 300))]]) == ["EINVAL", "EINVAL"]
    # 7. a missing xattr is routine: not logged as a refusal
    run_as("bob", [["getfattr", public, "security.selinux"]])
    assert "security.selinux" not in mount.log()


def test_cached_public_entries_go_when_the_image_stops_being_public(unix_users, tmp_path):
    """The kernel may cache public/ and by-id/ entries; a change must reach it at once."""
    config = BASE + "entry_timeout = 30\n" + ACCESS
    with shared_host(config) as (root, store, config_path):
        image_id = store.create(make_file(tmp_path / "p.raw", 4096, seed=11), "acme",
                                "--name", "pub", "--visibility", "public")
        with mounted_for_everyone(store, root, config_path) as mount:
            paths = [str(mount / "public/pub.raw"), str(mount / f"by-id/{image_id}")]
            assert run_as("bob", [["stat", p] for p in paths]) == ["ok", "ok"]  # now cached
            store.cli("image", "set", image_id, "--visibility", "private")  # another host
            _wait(lambda: run_as("mallory", [["stat", p] for p in paths]) == ["ENOENT"] * 2,
                  timeout=10)  # a refresh (0.5 s) and the invalidation, not 30 s
            assert run_as("alice", [["stat", str(mount / "projects/acme/private/pub.raw")]]) \
                == ["ok"]
