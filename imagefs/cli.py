"""The `imagefs` command line: image administration, mount and umount.

The CLI talks to the store directly and acts as an admin. Every failure a user can cause
ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from imagefs import __version__
from imagefs import manifest as mf
from imagefs.admin import CatalogAdmin
from imagefs.catalog_store import CatalogStore
from imagefs.config import Settings, load_settings
from imagefs.errors import ImageNotFound, ImagefsError, InvalidValue, StoreNotFound
from imagefs.naming import image_name
from imagefs.quotas import Quotas, Usage, stored_usage
from imagefs.records import (CONTAINER_FORMATS, DISK_FORMATS, MEMBER_STATUSES, VISIBILITIES,
                             ImageRecord, iso_time, validate_property)
from imagefs.store_init import init_hint, init_store
from imagefs.stores import Store, open_store

log = logging.getLogger("imagefs")

EPILOG = """\
Settings come from a TOML file (--config, $IMAGEFS_CONFIG, or /etc/imagefs/imagefs.toml);
flags override it. S3 credentials and endpoint follow boto3's standard chain
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...) unless the
config's [s3] table sets them. See docs/guide.md for examples.
"""


def _property(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return validate_property(key, value)
    except ImagefsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--stor` is a typo, not `--store`); a typo is named alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args: Any = None,
                         namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Refuse what is left over, here, so the error shows this (sub)command's usage.

        After an unknown flag argparse hands the flag's value to a positional, and the
        real positional is left over; only the flags are the user's mistake.
        """
        parsed, extra = super().parse_known_args(args, namespace)
        flags = [a for a in extra if a.startswith("-")]
        if extra:
            known = [o for o in self._option_string_actions if o.startswith("--")]
            self.error("unrecognized arguments: "
                       + " ".join(_with_hint(a, known) for a in flags or extra))
        return parsed, []


def _with_hint(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word.split("=")[0], known, n=1) \
        if word.startswith("-") else []
    return f"{word} (did you mean {close[0]}?)" if close else word


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file to read")
    parser.add_argument("--store", metavar="URL",
                        help="file:///DIR or s3://BUCKET[/PREFIX] (config: store)")
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint for non-AWS servers (config: [s3] endpoint_url)")
    parser.add_argument("--debug", action="store_true", help="log debug details")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imagefs", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A Glance-style image catalog served as a FUSE filesystem.")
    parser.add_argument("--version", action="version", version=f"imagefs {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    image = top.add_parser("image", help="create, list, show, change and delete images")
    verbs = image.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser(
        "create", help="upload a local file as a new image; prints its id",
        description="Upload FILE as a new active image. The format is detected (and "
                    "checked for safety, as Glance does) unless --disk-format is given; "
                    "md5, sha512 and per-block hashes are computed while streaming.")
    _add_common(create)
    create.add_argument("file", metavar="FILE")
    create.add_argument("--project", required=True, help="owner project")
    create.add_argument("--name", help="image name (default: the file name)")
    create.add_argument("--visibility", choices=VISIBILITIES, default="private")
    create.add_argument("--disk-format", choices=DISK_FORMATS,
                        help="declared format; refused if the data is something else")
    create.add_argument("--container-format", choices=CONTAINER_FORMATS, default="bare")
    create.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    create.add_argument("--property", action="append", default=[], type=_property,
                        metavar="KEY=VALUE", help="custom property (repeatable)")
    create.add_argument("--min-disk", type=int, default=0, metavar="GB")
    create.add_argument("--min-ram", type=int, default=0, metavar="MB")
    create.add_argument("--protected", action="store_true", help="refuse deletion")
    create.add_argument("--hidden", action="store_true",
                        help="os_hidden: left out of listings, still reachable by id")
    create.add_argument("--json", action="store_true", help="print the image as Glance JSON")

    lister = verbs.add_parser("list", help="list images (all projects unless --project)")
    _add_common(lister)
    lister.add_argument("--project", help="only images owned by this project")
    lister.add_argument("--json", action="store_true", help="print a JSON array of images")

    show = verbs.add_parser("show", help="show one image, by id or by its unique name")
    _add_common(show)
    show.add_argument("image", metavar="ID_OR_NAME")
    show.add_argument("--json", action="store_true", help="print the image as Glance JSON")

    delete = verbs.add_parser(
        "delete", help="delete an image (protected images refuse)",
        description="Delete as Glance's delayed delete does: the image disappears at once, "
                    "stays restorable for delete_grace seconds (config; default one day), "
                    "then a scrub (any mount, or `imagefs image scrub`) purges its data.")
    _add_common(delete)
    delete.add_argument("image_id", metavar="ID")
    delete.add_argument("--now", action="store_true", help="purge at once, no grace period")

    restore = verbs.add_parser("restore", help="bring back a deleted image before its purge")
    _add_common(restore)
    restore.add_argument("image_id", metavar="ID")

    scrub = verbs.add_parser(
        "scrub", help="purge deleted images whose grace period is over",
        description="Purge deleted images whose grace period is over (says how many), "
                    "and remove data and block tables that no manifest names once they are "
                    "old enough: what uploads and purges cut short by a crash leave behind.")
    _add_common(scrub)
    scrub.add_argument("--leftovers-older-than", type=float, default=86400.0,
                       metavar="SECONDS", help="age before an unnamed object is removed "
                       "(default one day)")

    for verb, text in (("deactivate", "make an image unreadable for everyone but admins "
                                      "(it stays listed)"),
                       ("reactivate", "make a deactivated image readable again")):
        sub = verbs.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}, as "
                               "Glance's admin-only image actions do.")
        _add_common(sub)
        sub.add_argument("image_id", metavar="ID")

    setter = verbs.add_parser("set", help="change an image's metadata")
    _add_common(setter)
    setter.add_argument("image_id", metavar="ID")
    setter.add_argument("--name")
    setter.add_argument("--visibility", choices=VISIBILITIES)
    setter.add_argument("--min-disk", type=int, metavar="GB")
    setter.add_argument("--min-ram", type=int, metavar="MB")
    prot = setter.add_mutually_exclusive_group()
    prot.add_argument("--protected", dest="protected", action="store_true", default=None)
    prot.add_argument("--unprotected", dest="protected", action="store_false")
    hide = setter.add_mutually_exclusive_group()
    hide.add_argument("--hidden", dest="os_hidden", action="store_true", default=None,
                      help="os_hidden: left out of listings, still reachable by id")
    hide.add_argument("--unhidden", dest="os_hidden", action="store_false")
    setter.add_argument("--property", action="append", default=[], type=_property,
                        metavar="KEY=VALUE", help="set a custom property (repeatable)")
    setter.add_argument("--remove-property", action="append", default=[], metavar="KEY")
    setter.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    setter.add_argument("--remove-tag", action="append", default=[], metavar="TAG")
    setter.add_argument("--json", action="store_true", help="print the image as Glance JSON")

    adopt = verbs.add_parser(
        "import", help="make every file of a folder or S3 prefix an image (resumable)",
        description="Create one image per file of SOURCE (a folder, or s3://BUCKET/PREFIX/), "
                    "named by the file name less a disk-format extension, each detected and "
                    "checked as `image create` does. Run it again after an interruption: "
                    "files already imported (recognised by path, size and mtime, or ETag) "
                    "are skipped. Ends with a summary; exit 1 if a file was refused or failed.")
    _add_common(adopt)
    adopt.add_argument("source", metavar="SOURCE", help="a folder, or s3://BUCKET/PREFIX/")
    adopt.add_argument("--project", required=True, help="owner project")
    adopt.add_argument("--visibility", choices=VISIBILITIES, default="private")
    adopt.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    adopt.add_argument("--property", action="append", default=[], type=_property,
                       metavar="KEY=VALUE", help="custom property (repeatable)")
    adopt.add_argument("--recursive", action="store_true",
                       help="also files in folders (named by their path, e.g. 'debian/12')")
    adopt.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="upload N files at a time (default 1)")
    adopt.add_argument("--dry-run", action="store_true",
                       help="say what would be imported and skipped; reads no image data, "
                       "writes nothing")

    member = top.add_parser("member", help="share shared-visibility images with projects")
    member_verbs = member.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("add", "invite a project (status pending)"),
                       ("set", "set a member's status (accept or reject for it)"),
                       ("remove", "stop sharing with a project"),
                       ("list", "list an image's members")):
        sub = member_verbs.add_parser(verb, help=text)
        _add_common(sub)
        sub.add_argument("image_id", metavar="ID")
        if verb != "list":
            sub.add_argument("project", metavar="PROJECT")
        if verb == "set":
            sub.add_argument("status", choices=MEMBER_STATUSES)

    inbox = top.add_parser("inbox", help="follow uploads written into a mount's inbox")
    inbox_verbs = inbox.add_subparsers(dest="verb", required=True, metavar="VERB")
    wait = inbox_verbs.add_parser(
        "wait", help="wait until an inbox file is published or rejected",
        description="Block until PATH (a file in <mnt>/inbox/<project>/) is published "
                    "(prints the image id, exit 0) or rejected (prints the reason, exit 1). "
                    "Exit 2: not an inbox file, or --timeout passed.")
    wait.add_argument("path", metavar="PATH")
    wait.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="give up after this long (default: wait forever)")
    wait.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    cache = top.add_parser("cache", help="work with a mount's local cache")
    cache_verbs = cache.add_subparsers(dest="verb", required=True, metavar="VERB")
    warm = cache_verbs.add_parser(
        "warm", help="read images through a mount so their chunks are cached",
        description="Read each FILE (images on an imagefs mount, e.g. by-id/<id>) front to "
                    "back so its chunks land in the mount's LMDB cache: later reads, "
                    "even with the store unreachable, are local. Shows a progress bar.")
    warm.add_argument("files", nargs="+", metavar="FILE")
    warm.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_cache_control(cache_verbs)

    store = top.add_parser("store", help="set up a store")
    store_verbs = store.add_subparsers(dest="verb", required=True, metavar="VERB")
    init = store_verbs.add_parser(
        "init", help="create the bucket (or directory) and stamp it as an imagefs catalog",
        description="Create the S3 bucket, or the file:// directory, unless it exists, and "
                    "write the catalog marker that tells mounts which catalog the store "
                    "holds. Safe to run again: an existing store keeps its images.")
    _add_common(init)

    doctor = top.add_parser(
        "doctor", help="check what a mount on this host needs, one line per check",
        description="Check /dev/fuse, fusermount3, user_allow_other (with --allow-other), "
                    "the cache dir's space and permissions, the config file's permissions "
                    "when it holds secrets, and the store: reachable, credentials, bucket, "
                    "writable, catalog marker, clock skew. Exit 1 if any check FAILs.")
    _add_common(doctor)
    doctor.add_argument("--cache-dir", metavar="DIR", help="the cache dir the mount will use")
    doctor.add_argument("--allow-other", action="store_true", default=None,
                        help="check for a mount with --allow-other")

    mount = top.add_parser(
        "mount", help="mount the catalog", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount the image catalog at MOUNTPOINT (default: the config's "
                    "mountpoint). Returns once the mount is ready (the daemon keeps "
                    "running) unless --foreground.",
        epilog="--allow-other: a host shared by several users needs an [access] table in "
               "the config (users and groups -> projects, admins, readers; see "
               "docs/access.md); without one, every local user can read every image through "
               "an --allow-other mount.")
    _add_common(mount)
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    mount.add_argument("-o", dest="options", action="append", metavar="KEY[=VALUE],...",
                       help="any setting by its config key, as mount(8) takes options: "
                       "-o cache_size=20G,read_timeout=5,allow_other,config=FILE")
    mount.add_argument("--cache-dir", metavar="DIR",
                       help="LMDB cache directory (default: /var/cache/imagefs/<store hash>)")
    mount.add_argument("--cache-size", metavar="SIZE",
                       help="hard cap of cached data, e.g. 512M, 10G (default 10G)")
    mount.add_argument("--foreground", action="store_true", default=None,
                       help="stay in the foreground and log to stderr")
    mount.add_argument("--allow-other", action="store_true", default=None,
                       help="let other local users use the mount (see below)")
    mount.add_argument("--log-file", metavar="FILE",
                       help="daemon log (default: imagefs.log in the cache dir)")
    mount.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(config: metrics_listen; default off)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    install = top.add_parser(
        "install", help="install the mount(8) helper and the systemd units",
        description="Install /sbin/mount.fuse.imagefs and /sbin/mount.imagefs (for mount -t "
                    "fuse.imagefs and fstab) and imagefs@.service and imagefs.service in "
                    "/etc/systemd/system, all running this imagefs. Safe to run again: "
                    "says what it installed, updated or left unchanged.")
    install.add_argument("--root", metavar="DIR", default="/",
                         help="install under DIR instead of / (as DESTDIR)")
    install.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    status = top.add_parser(
        "status", help="how a mount is doing: store, cache, catalog, uploads, errors",
        description="For MOUNTPOINT, or every imagefs mount on this host: the store, cache "
                    "use and cap, hit ratio, catalog age and image count, inbox uploads, "
                    "the daemon's recent errors, its log file and metrics URL. Read from "
                    "the daemon itself (admins only under an [access] table).")
    status.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    status.add_argument("--json", action="store_true",
                        help="print JSON: one object for MOUNTPOINT, else a list")
    status.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    umount = top.add_parser("umount", help="unmount a mounted catalog")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("--lazy", action="store_true", help="detach even if busy")
    umount.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives; they override the config file's."""
    overrides: dict[str, Any] = {
        "store": getattr(args, "store", None),
        "cache_dir": getattr(args, "cache_dir", None),
        "cache_size": getattr(args, "cache_size", None),
        "foreground": getattr(args, "foreground", None),
        "allow_other": getattr(args, "allow_other", None),
        "log_file": getattr(args, "log_file", None),
        "metrics_listen": getattr(args, "metrics_listen", None),
    }
    if getattr(args, "endpoint_url", None):
        overrides["s3"] = {"endpoint_url": args.endpoint_url}
    return overrides


def _settings(args: argparse.Namespace, options: dict[str, Any] | None = None) -> Settings:
    """The settings for a command; `options` (mount -o) override its flags."""
    overrides = _overrides(args)
    for key, value in (options or {}).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) \
            else value
    settings = load_settings(getattr(args, "config", None), overrides)
    if getattr(args, "debug", False):
        settings.log_level = "DEBUG"
    if not settings.store:
        raise InvalidValue("no store given: pass --store file:///DIR or s3://BUCKET/PREFIX "
                           "(or set store in the config file)")
    return settings


def _store(settings: Settings) -> Store:
    return open_store(settings.store or "", settings.s3, max(settings.read_timeout, 30.0))


def _catalog(settings: Settings) -> CatalogStore:
    store = _store(settings)
    try:
        store.check()
    except StoreNotFound as exc:
        raise StoreNotFound(f"{exc}; {init_hint(store.url)}") from None
    return CatalogStore(store)


def _find_image(catalog: CatalogStore, wanted: str) -> mf.Manifest:
    """The image with id `wanted`, else the one image named `wanted`."""
    if _is_uuid(wanted):
        try:
            return catalog.load(wanted)
        except ImageNotFound:
            pass
    named = sorted((m for m in catalog.load_all() if m.record.name == wanted),
                   key=lambda m: m.record.created_at)
    if len(named) == 1:
        return named[0]
    if named:
        ids = ", ".join(f"{m.record.id} ({m.record.owner}, {m.record.status})" for m in named)
        raise InvalidValue(f"{len(named)} images are named {wanted!r}: {ids}; give an id")
    raise ImageNotFound(f"no image with id or name {wanted!r}")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _print_image(record: ImageRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record.glance_json(), indent=2, sort_keys=True))
        return
    width = max(len(k) for k in record.metadata_items())
    for key, value in sorted(record.metadata_items().items()):
        print(f"{key:<{width}}  {value}")


def cmd_image_create(args: argparse.Namespace) -> int:
    from imagefs.pipeline import upload_image
    from imagefs.progress import progress_bar

    settings = _settings(args)
    path = Path(args.file)
    if not path.is_file():
        raise InvalidValue(f"{path}: no such file")
    record = ImageRecord.new(
        owner=args.project, name=args.name if args.name is not None else image_name(path.name),
        visibility=args.visibility, disk_format=args.disk_format,
        container_format=args.container_format, tags=args.tag,
        properties=dict(args.property), min_disk=args.min_disk, min_ram=args.min_ram,
        protected=args.protected, os_hidden=args.hidden, status="saving")
    catalog = _catalog(settings)
    quotas = Quotas(settings.quotas)
    if quotas.limits(args.project):
        used = stored_usage((m.record for m in catalog.load_all()), args.project)
        quotas.check(args.project, used, Usage(1, path.stat().st_size, 0))
    try:
        source = open(path, "rb")
    except OSError as exc:
        raise InvalidValue(f"{path}: {exc.strerror}") from None
    with source, progress_bar(path.stat().st_size, f"upload {path.name}") as advance:
        manifest = upload_image(catalog, source, record, settings.block_size, advance)
    if args.json:
        _print_image(manifest.record, True)
    else:
        print(manifest.record.id)
    return 0


def cmd_image_import(args: argparse.Namespace) -> int:
    from imagefs.importer import ImportOptions, run_import

    if args.jobs < 1:
        raise InvalidValue(f"--jobs {args.jobs}: give 1 or more")
    settings = _settings(args)
    options = ImportOptions(project=args.project, visibility=args.visibility,
                            tags=tuple(args.tag), properties=dict(args.property),
                            recursive=args.recursive, jobs=args.jobs, dry_run=args.dry_run)
    report = run_import(_catalog(settings), settings, args.source, options)
    print("\n".join(report.lines()))
    return report.exit_status()


def cmd_image_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    grace = settings.delete_grace
    manifests = _catalog(settings).load_all()
    records = sorted((m.record for m in manifests if not args.project
                      or m.record.owner == args.project),
                     key=lambda r: (r.owner, r.name or "", r.created_at))
    if args.json:
        print(json.dumps([r.glance_json() for r in records], indent=2, sort_keys=True))
        return 0
    rows = [("ID", "NAME", "FORMAT", "SIZE", "VISIBILITY", "OWNER", "STATUS")]
    rows += [(r.id, r.name or "", r.disk_format or "", str(r.size or 0), r.visibility,
              r.owner, _status(r, grace)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    deleted = sum(r.status == "pending_delete" for r in records)
    if deleted:
        print(f"{deleted} {'image is' if deleted == 1 else 'images are'} deleted "
              "(pending_delete): gone from every mount, restorable until the purge with "
              "`imagefs image restore ID`", file=sys.stderr)
    return 0


def _status(record: ImageRecord, grace: float) -> str:
    """A deleted image says so, and until when it can be restored."""
    if record.status != "pending_delete":
        return record.status
    purge = (record.deleted_at or 0) + int(grace * 1_000_000)
    return f"pending_delete (deleted; purged after {iso_time(purge)})"


def cmd_image_show(args: argparse.Namespace) -> int:
    _print_image(_find_image(_catalog(_settings(args)), args.image).record, args.json)
    return 0


def cmd_image_delete(args: argparse.Namespace) -> int:
    settings = _settings(args)
    grace = 0.0 if args.now else settings.delete_grace
    catalog = _catalog(settings)
    CatalogAdmin(catalog).delete(args.image_id, grace)
    if grace > 0:
        print(f"image {args.image_id} deleted; restorable for {grace:.0f}s with: imagefs "
              f"image restore --store {catalog.store.url} {args.image_id}", file=sys.stderr)
    return 0


def cmd_image_restore(args: argparse.Namespace) -> int:
    CatalogAdmin(_catalog(_settings(args))).restore(args.image_id)
    return 0


def cmd_image_scrub(args: argparse.Namespace) -> int:
    """Purge deleted images past their grace period; sweep what crashes left behind."""
    settings = _settings(args)
    catalog = _catalog(settings)
    purged = len(CatalogAdmin(catalog).scrub(settings.delete_grace))
    print(f"purged {purged} deleted image{'' if purged == 1 else 's'} whose grace period "
          f"({settings.delete_grace:.0f}s) was over")
    swept = catalog.sweep(args.leftovers_older_than)
    if swept:
        print(f"removed {swept} objects no image names (left by crashes)", file=sys.stderr)
    return 0


def cmd_image_set(args: argparse.Namespace) -> int:
    def change(record: ImageRecord) -> None:
        for field in ("name", "visibility", "min_disk", "min_ram", "protected", "os_hidden"):
            value = getattr(args, field)
            if value is not None:
                setattr(record, field, value)
        record.properties.update(dict(args.property))
        for key in args.remove_property:
            if key not in record.properties:
                raise InvalidValue(f"image {record.id} has no property {key!r}")
            del record.properties[key]
        record.tags = [t for t in record.tags if t not in args.remove_tag] + args.tag

    manifest = CatalogAdmin(_catalog(_settings(args))).update(args.image_id, change)
    if args.json:
        _print_image(manifest.record, True)
    return 0


def cmd_member(args: argparse.Namespace) -> int:
    """Glance's image members: only shared images have them; a new member is pending."""
    admin = CatalogAdmin(_catalog(_settings(args)))
    if args.verb == "list":
        record = admin.catalog_store.load(args.image_id).record
        for project, status in sorted(record.members.items()):
            print(f"{project}\t{status}")
        return 0
    if args.verb == "add":
        admin.add_member(args.image_id, args.project)
    elif args.verb == "remove":
        admin.remove_member(args.image_id, args.project)
    else:
        admin.set_member_status(args.image_id, args.project, args.status)
    return 0


def cmd_image_status(args: argparse.Namespace) -> int:
    """Deactivate or reactivate: Glance's admin actions."""
    status = "deactivated" if args.verb == "deactivate" else "active"
    CatalogAdmin(_catalog(_settings(args))).set_status(args.image_id, status)
    return 0


def cmd_inbox_wait(args: argparse.Namespace) -> int:
    from imagefs.inbox_wait import wait_for_upload

    return wait_for_upload(Path(args.path), args.timeout)


def cmd_cache_warm(args: argparse.Namespace) -> int:
    """Read each image once, then fsync: the mount answers once its chunks are cached."""
    from imagefs.cache_cli import distinct_images
    from imagefs.progress import progress_bar

    images = distinct_images(args.files)
    total = sum(size for _path, size in images.values())
    with progress_bar(total, "warm cache") as advance:
        for path, _size in images.values():
            with open(path, "rb", buffering=0) as f:
                # The point is the daemon's cache: reads the kernel answers never reach it.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while piece := f.read(4 << 20):
                    advance(len(piece))
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    print(f"{len(images)} image{'' if len(images) == 1 else 's'} cached, {total} bytes read")
    return 0


# -- cache pin, unpin, drop, status: the daemon's cache, through the mount (pinning.py) ---

def _add_cache_control(verbs: Any) -> None:
    files = {"pin": "fetch images whole and keep them cached (never evicted), across remounts",
             "unpin": "let pinned images be evicted again",
             "drop": "evict images' chunks from the cache now (pinned ones: unpin first)"}
    for verb, text in files.items():
        sub = verbs.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}. "
                               "FILE: images on an imagefs mount (by-id/<id>, public/...). "
                               "Admins only (without an [access] table: root and the "
                               "mounting user). See docs/guide.md, Pinning golden images.")
        sub.add_argument("files", nargs="+", metavar="FILE")
        sub.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    status = verbs.add_parser(
        "status", help="cached images, bytes cached and pins; totals against the cap",
        description="List the images the mount at MOUNTPOINT has cached or pinned, with "
                    "their size, bytes cached and pin; then cache use, cap, pinned total.")
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON")
    status.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_cache_control(args: argparse.Namespace) -> int:
    from imagefs import cache_cli

    if args.verb == "status":
        return cache_cli.status(Path(args.mountpoint), args.json)
    return {"pin": cache_cli.pin, "unpin": cache_cli.unpin, "drop": cache_cli.drop}[
        args.verb](args.files)


def cmd_store_init(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    created, catalog_id = init_store(store)
    print(f"{store.url}: {'created' if created else 'exists'}; catalog id {catalog_id}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from imagefs import doctor

    checks = doctor.run(args.config, _overrides(args))
    for check in checks:
        print(check.line())
    return doctor.exit_status(checks)


def cmd_mount(args: argparse.Namespace) -> int:
    from imagefs.mount import mount
    from imagefs.mount_options import parse_options

    options = parse_options(args.options or ())
    args.config = args.config or options.config

    def settings() -> Settings:  # again at each reload: the config file may have changed
        return _settings(args, options.overrides)

    first = settings()
    mountpoint = args.mountpoint or first.mountpoint
    if mountpoint is None:
        raise InvalidValue("no mountpoint: give MOUNTPOINT or set mountpoint in the config")
    return mount(first, Path(mountpoint), args.ready_fd, settings)


def cmd_install(args: argparse.Namespace) -> int:
    from imagefs.install import install

    for line in install(Path(args.root)):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from imagefs.status import run

    return run(args.mountpoint, args.json)


def cmd_umount(args: argparse.Namespace) -> int:
    from imagefs.mountpoint import umount

    return umount(Path(args.mountpoint), args.lazy)


COMMANDS = {
    ("image", "create"): cmd_image_create, ("image", "list"): cmd_image_list,
    ("image", "show"): cmd_image_show, ("image", "delete"): cmd_image_delete,
    ("image", "restore"): cmd_image_restore, ("image", "scrub"): cmd_image_scrub,
    ("image", "set"): cmd_image_set, ("image", "deactivate"): cmd_image_status,
    ("image", "import"): cmd_image_import,
    ("image", "reactivate"): cmd_image_status, ("member", "add"): cmd_member,
    ("member", "set"): cmd_member, ("member", "remove"): cmd_member,
    ("member", "list"): cmd_member, ("inbox", "wait"): cmd_inbox_wait,
    ("cache", "warm"): cmd_cache_warm, ("store", "init"): cmd_store_init,
    **{("cache", verb): cmd_cache_control for verb in ("pin", "unpin", "drop", "status")},
    ("doctor", None): cmd_doctor,
    ("mount", None): cmd_mount, ("umount", None): cmd_umount, ("install", None): cmd_install,
    ("status", None): cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="imagefs: %(levelname)s: %(message)s")
    handler = COMMANDS[(args.command, getattr(args, "verb", None))]
    try:
        return handler(args)
    except ImagefsError as exc:
        print(f"imagefs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imagefs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        print(f"imagefs: unexpected error: {exc!r} (run again with --debug for details)",
              file=sys.stderr)
        return 1
