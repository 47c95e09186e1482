#!/usr/bin/env bash
# Install imagefs and what it needs on a fresh Debian 12 machine (run as root).
#   mountscripts/setup.sh          runtime: fuse3, qemu-utils, a venv in .venv
#   mountscripts/setup.sh --test   also the test tools (pytest, SeaweedFS, xorriso, rsync,
#                                  systemd for systemd-analyze)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev qemu-utils attr mount)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    # systemd: systemd-analyze verify of the units; libvirt-clients, libxml2-utils:
    # virt-xml-validate of docs/hypervisors.md
    packages+=(rsync xorriso systemd libvirt-clients libxml2-utils)
    extras="[test]"
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
# setuptools>=77 as pyproject.toml needs, also for builds without isolation
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" >/dev/null
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: imagefs installed in $(pwd)/.venv ($(.venv/bin/imagefs --version))"
