"""Format detection and safety checks, behind one module.

Uses oslo.utils' format_inspector: the inspectors Glance and Nova run, so imagefs gets
their security fixes (backing files, data files, vmdk extents, ...) without a fork. The
inspectors parse untrusted bytes and can fail in any way on odd input, so each call into
them is contained here: one that fails to recognise data did not match it (Glance's rule
for bytes no inspector recognises is raw), and a failure on the format that did match
refuses the image. container_bounds then checks that the image is all there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import IO

from oslo_utils.imageutils import format_inspector as fi

from imagefs.container_bounds import StreamSample, check_complete
from imagefs.errors import UnsafeImage

log = logging.getLogger(__name__)
# The inspectors log at ERROR about odd input ("VMDK descriptor failed to decode as
# ASCII" for any UTF-8 text); what matters here comes back as UnsafeImage, with a reason.
logging.getLogger("oslo_utils.imageutils.format_inspector").setLevel(logging.CRITICAL)

INSPECT_PIECE = 64 << 10
# Inspector names that Glance stores under another disk_format.
_GLANCE_FORMAT = {"gpt": "raw"}
# Formats Glance will not take at all.
_REFUSED = {"qed": "qed images are refused, as Glance refuses them (convert with "
                   "qemu-img convert -O qcow2)",
            "luks": "luks is not a Glance disk format"}
# Declared formats no inspector can recognise; their data passes as raw.
_OPAQUE = {"ami", "ari", "aki", "ploop"}
# Glance keeps virtual_size in a signed 64-bit column.
_MAX_VIRTUAL_SIZE = 2**63 - 1


@dataclass(frozen=True)
class Detected:
    disk_format: str
    virtual_size: int | None


class FormatDetector:
    """Reads through a stream, inspecting as it goes, so data is read once.

    read() and finish() raise only UnsafeImage, and whatever the source itself raises.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._inspectors = [inspector() for inspector in fi.ALL_FORMATS.values()]
        # Why an inspector gave up, as text: an exception would keep its traceback, and
        # with it the upload's buffers, alive until the cycle collector runs.
        self._failures: dict[fi.FileInspector, str] = {}
        self._sample = StreamSample()

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, fed to the inspectors in Glance's 64 KiB pieces.

        Inspectors learn where to look (e.g. vhdx metadata) from earlier bytes; a region
        that starts inside the piece that announced it would be missed with big pieces.
        """
        pieces = []
        got = 0
        while got < size:
            piece = self._source.read(min(INSPECT_PIECE, size - got))
            if not piece:
                break
            self._inspect(piece)
            pieces.append(piece)
            got += len(piece)
        data = b"".join(pieces)
        self._sample.add(data)
        return data

    def _inspect(self, piece: bytes) -> None:
        for inspector in self._inspectors:
            if inspector in self._failures:
                continue
            try:
                inspector.eat_chunk(piece)
            except Exception as exc:  # odd input for this inspector; it reads no further
                log.debug("%s inspector gave up on this data: %r", inspector, exc)
                self._failures[inspector] = _reason(exc)

    def finish(self) -> Detected:
        """Decide after the last read; raise UnsafeImage with a reason and a remedy."""
        self._source.close()
        for inspector in self._inspectors:
            inspector.finish()
        matches = [i for i in self._inspectors if str(i) != "raw" and _matches(i)]
        names = sorted(str(m) for m in matches)
        if len(matches) > 1 and "iso" in names:
            matches = [m for m in matches if str(m) == "iso"]  # bootable ISOs carry an MBR
        if len(matches) > 1:
            raise UnsafeImage(f"the data looks like several formats at once ({', '.join(names)})"
                              "; refusing it, as Glance does")
        inspector = matches[0] if matches else self._raw()
        name = str(inspector)
        if name in _REFUSED:
            raise UnsafeImage(_REFUSED[name])
        if inspector in self._failures:
            raise _unverifiable(name, self._failures[inspector])
        check_complete(name, self._sample)
        _check_safety(inspector)
        return Detected(_GLANCE_FORMAT.get(name, name), _virtual_size(inspector))

    def _raw(self) -> fi.FileInspector:
        return next(i for i in self._inspectors if str(i) == "raw")


def _matches(inspector: fi.FileInspector) -> bool:
    """Does `inspector` recognise the data? An inspector that fails on it does not."""
    try:
        return bool(inspector.format_match)
    except Exception as exc:
        log.debug("%s inspector failed to decide (%r); taking it as no match", inspector,
                  exc)
        return False


def _reason(exc: Exception) -> str:
    detail = str(exc) if isinstance(exc, fi.ImageFormatError) else \
        f"the inspector failed on it ({type(exc).__name__}: {exc})"
    return " ".join(detail.split())


def _unverifiable(name: str, reason: str) -> UnsafeImage:
    return UnsafeImage(f"could not verify the {name} image: {reason}")


def _check_safety(inspector: fi.FileInspector) -> None:
    name = str(inspector)
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        reasons = "; ".join(f"{k}: {v}" for k, v in exc.failures.items())
        raise UnsafeImage(f"{name} image failed Glance's safety checks ({reasons}); "
                          "flatten it first (qemu-img convert -O qcow2 SRC DST)") from None
    except Exception as exc:
        log.debug("%s inspector failed", name, exc_info=True)
        raise _unverifiable(name, _reason(exc)) from None


def _virtual_size(inspector: fi.FileInspector) -> int:
    name = str(inspector)
    try:
        size = int(inspector.virtual_size)
    except Exception as exc:
        log.debug("%s inspector failed", name, exc_info=True)
        raise _unverifiable(name, _reason(exc)) from None
    if not 0 <= size <= _MAX_VIRTUAL_SIZE:
        raise UnsafeImage(f"the {name} image declares a virtual size of {size} bytes, "
                          "which no disk has")
    return size


def check_declared(declared: str | None, detected: Detected) -> str:
    """The disk_format to record: the declared one if the data agrees, else refuse."""
    if declared and declared != detected.disk_format and not (
            declared in _OPAQUE and detected.disk_format == "raw"):
        raise UnsafeImage(f"declared disk format {declared} does not match the data, "
                          f"which is {detected.disk_format}")
    return declared or detected.disk_format
