#!/usr/bin/env bash
# The main job on the embedded default: install, build a local file:// store with sample
# images in several formats, projects and visibilities, mount it, list it and verify
# checksums through the mount. Run as root on Debian 12.
#   DEMO_DIR (default /var/tmp/imagefs-demo) holds the store, cache and mountpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
mountscripts/setup.sh
IMAGEFS=$(pwd)/.venv/bin/imagefs

DEMO_DIR=${DEMO_DIR:-/var/tmp/imagefs-demo}
STORE=file://$DEMO_DIR/store
MNT=$DEMO_DIR/mnt
if mountpoint -q "$MNT" 2>/dev/null; then "$IMAGEFS" umount "$MNT"; fi
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR/store" "$DEMO_DIR/src" "$MNT"
SRC=$DEMO_DIR/src

echo "== making sample images with qemu-img"
head -c 48M /dev/urandom > "$SRC/base.raw"
qemu-img convert -q -f raw -O qcow2 "$SRC/base.raw" "$SRC/cirros.qcow2"
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$SRC/base.raw" "$SRC/appliance.vmdk"
qemu-img convert -q -f raw -O vpc "$SRC/base.raw" "$SRC/legacy.vhd"
head -c 16M /dev/urandom > "$SRC/scratch.raw"

echo "== creating images in $STORE"
create() { "$IMAGEFS" image create --store "$STORE" "$@"; }
create --project acme --name ubuntu-24.04 --visibility public --tag lts \
       --property os_distro=ubuntu "$SRC/cirros.qcow2" >/dev/null
create --project acme --name ubuntu-24.04 --visibility public --tag lts \
       --property os_distro=ubuntu "$SRC/cirros.qcow2" >/dev/null   # a newer one, same name
create --project acme --name appliance "$SRC/appliance.vmdk" >/dev/null
create --project beta --name legacy --visibility community "$SRC/legacy.vhd" >/dev/null
create --project beta --name scratch --visibility shared --protected "$SRC/scratch.raw" >/dev/null
"$IMAGEFS" image list --store "$STORE"

echo "== mounting at $MNT"
"$IMAGEFS" mount --store "$STORE" --cache-dir "$DEMO_DIR/cache" --cache-size 1G "$MNT"
cd "$MNT"
ls -l projects/acme/public projects/acme/private projects/beta/community \
      projects/beta/shared public tags/lts
echo
echo "== metadata as xattrs"
getfattr -d projects/acme/private/appliance.vmdk | head -12
echo "== checksum verification through the mount (md5 of the bytes vs user.glance.checksum)"
status=0
for f in by-id/*; do
    want=$(getfattr --only-values -n user.glance.checksum "$f")
    got=$(md5sum < "$f" | cut -d' ' -f1)
    name=$(getfattr --only-values -n user.glance.name "$f")
    if [[ "$want" == "$got" ]]; then echo "ok   $got  $name"; else echo "BAD  $got  $name (want $want)"; status=1; fi
done
qemu-img info projects/acme/public/ubuntu-24.04.qcow2 | head -3
echo
echo "== uploading through the inbox: cp, then wait for the image to be published"
qemu-img convert -q -f raw -O qcow2 "$SRC/scratch.raw" "$SRC/snapshot.qcow2"
cp "$SRC/snapshot.qcow2" inbox/acme/
"$IMAGEFS" inbox wait inbox/acme/snapshot.qcow2
ls -l projects/acme/private/
cd /
echo
echo "The catalog stays mounted at $MNT. Unmount with: $IMAGEFS umount $MNT"
exit $status
