"""Format detection and safety checks, behind one module.

Uses oslo.utils' format_inspector: the inspector Glance and Nova run, so imagefs gets
their security fixes (backing files, data files, vmdk extents, ...) without a fork.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import IO

from oslo_utils.imageutils import format_inspector as fi

from imagefs.errors import UnsafeImage

log = logging.getLogger(__name__)
logging.getLogger("oslo_utils.imageutils.format_inspector").setLevel(logging.ERROR)

INSPECT_PIECE = 64 << 10
# Inspector names that Glance stores under another disk_format.
_GLANCE_FORMAT = {"gpt": "raw"}
# Formats Glance will not take at all.
_REFUSED = {"qed": "qed images are refused, as Glance refuses them (convert with "
                   "qemu-img convert -O qcow2)",
            "luks": "luks is not a Glance disk format"}
# Declared formats no inspector can recognise; their data passes as raw.
_OPAQUE = {"ami", "ari", "aki", "ploop"}


@dataclass(frozen=True)
class Detected:
    disk_format: str
    virtual_size: int | None


class FormatDetector:
    """Reads through a stream, inspecting as it goes, so data is read once."""

    def __init__(self, source: IO[bytes]) -> None:
        self._wrapper = fi.InspectWrapper(source)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, fed to the inspectors in Glance's 64 KiB pieces.

        Inspectors learn where to look (e.g. vhdx metadata) from earlier bytes; a region
        that starts inside the piece that announced it would be missed with big pieces.
        """
        pieces = []
        got = 0
        while got < size:
            piece = self._wrapper.read(min(INSPECT_PIECE, size - got))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    def finish(self) -> Detected:
        """Decide after the last read; raise UnsafeImage with a reason and a remedy."""
        self._wrapper.close()
        matches = self._wrapper.formats or []
        names = sorted(str(m) for m in matches)
        if len(matches) > 1 and "iso" in names:
            matches = [m for m in matches if str(m) == "iso"]  # bootable ISOs carry an MBR
        if len(matches) != 1:
            raise UnsafeImage(f"the data looks like several formats at once ({', '.join(names)})"
                              "; refusing it, as Glance does")
        inspector = matches[0]
        name = str(inspector)
        if name in _REFUSED:
            raise UnsafeImage(_REFUSED[name])
        try:
            inspector.safety_check()
        except fi.SafetyCheckFailed as exc:
            reasons = "; ".join(f"{k}: {v}" for k, v in exc.failures.items())
            raise UnsafeImage(f"{name} image failed Glance's safety checks ({reasons}); "
                              "flatten it first (qemu-img convert -O qcow2 SRC DST)") from None
        except fi.ImageFormatError as exc:
            raise UnsafeImage(f"cannot verify the {name} image: {exc}") from None
        try:
            virtual_size = int(inspector.virtual_size)
        except Exception:  # some formats cannot tell; Glance leaves it null
            virtual_size = None
        return Detected(_GLANCE_FORMAT.get(name, name), virtual_size)


def check_declared(declared: str | None, detected: Detected) -> str:
    """The disk_format to record: the declared one if the data agrees, else refuse."""
    if declared and declared != detected.disk_format and not (
            declared in _OPAQUE and detected.disk_format == "raw"):
        raise UnsafeImage(f"declared disk format {declared} does not match the data, "
                          f"which is {detected.disk_format}")
    return declared or detected.disk_format
