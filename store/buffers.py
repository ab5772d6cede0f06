"""Byte buffers for bulk data: filled by the kernel in place, aligned for ``O_DIRECT``.

Two helpers shared by the short-circuit reader (``store/client/local.py``), the wire
protocol (a large frame's data is received straight into a buffer of its own) and the
file backend (which writes such a buffer with ``O_DIRECT`` without staging it):

* :func:`aligned_bytearray` — a ``bytearray`` of ``n`` bytes, **not zeroed**, whose first
  byte sits on a page boundary when ``n > ALIGN`` (smaller ones are not aligned: see below). ``bytearray(n)`` zeroes its bytes: for a 2 MiB block
  that memset was ~6% of the mount's CPU in a cold sequential read (perf), all of it
  under the GIL, for bytes a read overwrites at once. CPython's own constructor with a
  NULL source leaves them as malloc returned them, so the caller must fill every byte
  before anyone else sees the buffer. Alignment: ``n + ALIGN`` bytes are allocated and
  the leading pad is dropped with ``del buf[:pad]``, which moves the bytearray's start
  (no copy); the trailing excess goes with a minor downsize, no realloc, as long as
  ``n`` is more than half of what was allocated — so only for ``n > ALIGN``. (The
  short-circuit reader, which needs any size aligned, reads into an aligned window of
  a larger buffer instead and trims it afterwards.)
* :func:`new_bytearray` — ``n`` bytes, not zeroed, wherever malloc put them.
* :func:`is_aligned` — whether a writable buffer's first byte sits on a page boundary.
"""

from __future__ import annotations

import ctypes
from typing import Final

#: O_DIRECT offset, length and buffer alignment (>= any device's logical block size here).
ALIGN: Final = 4096

_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)


def address_of(buf: bytearray | memoryview) -> int:
    """The address of the first byte of a writable, non-empty buffer."""
    window = (ctypes.c_char * 1).from_buffer(buf)
    try:
        return ctypes.addressof(window)
    finally:
        del window  # the export would keep a bytearray from being resized


def new_bytearray(n: int) -> bytearray:
    """``n`` bytes, not zeroed: the caller fills every one before anyone reads them."""
    buf: bytearray = _new_bytearray(None, n)
    return buf


def aligned_bytearray(n: int) -> bytearray:
    """``n`` bytes, not zeroed, starting on an ALIGN boundary when ``n > ALIGN`` (see the
    module docstring)."""
    buf: bytearray = _new_bytearray(None, n + ALIGN)
    pad = -address_of(buf) % ALIGN
    del buf[:pad]  # moves the start: no copy
    del buf[n:]  # a minor downsize: no realloc, the start stays where it is
    return buf


def is_aligned(buf: bytes | bytearray | memoryview) -> bool:
    """Whether ``buf`` can be handed to an O_DIRECT write as it is: writable (so its
    address can be taken without a copy), non-empty, and starting on an ALIGN boundary.
    (The length and file offset are the caller's to check.)"""
    if isinstance(buf, bytes) or len(buf) == 0:
        return False
    if isinstance(buf, memoryview) and (buf.readonly or not buf.c_contiguous):
        return False
    return address_of(buf) % ALIGN == 0
