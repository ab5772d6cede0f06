"""Locators of `appendfs store put` / `store get` (DESIGN §8) — pure code.

Text form (one line)::

    afs1:<stream id>:<xxh3-64 of the whole content, 16 hex>:<size>:<extent>@<offset>+<length>,...

Pieces are listed in content order; the checksum lets `store get` verify the whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appendfs.store.errors import BadLocator

# ASCII: \d would also match other scripts' digits, which int() accepts but str() never writes.
_RE = re.compile(r"^afs1:(\d+):([0-9a-f]{16}):(\d+):((?:\d+@\d+\+\d+)(?:,\d+@\d+\+\d+)*)?$", re.ASCII)


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``ext_off`` of logical extent ``extent_id``."""

    extent_id: int
    ext_off: int
    length: int


@dataclass(frozen=True)
class Locator:
    stream_id: int
    xxh3: int
    size: int
    pieces: tuple[Piece, ...]

    def __str__(self) -> str:
        body = ",".join(f"{p.extent_id}@{p.ext_off}+{p.length}" for p in self.pieces)
        return f"afs1:{self.stream_id}:{self.xxh3:016x}:{self.size}:{body}"

    @classmethod
    def parse(cls, text: str) -> Locator:
        m = _RE.match(text.strip())
        if not m:
            raise BadLocator(f"not an appendfs locator: {text[:80]!r}")
        pieces = []
        for part in (m.group(4) or "").split(","):
            if part:
                ext, rest = part.split("@")
                off, length = rest.split("+")
                pieces.append(Piece(int(ext), int(off), int(length)))
        loc = cls(int(m.group(1)), int(m.group(2), 16), int(m.group(3)), tuple(pieces))
        if sum(p.length for p in loc.pieces) != loc.size:
            raise BadLocator(f"locator pieces add up to {sum(p.length for p in loc.pieces)} bytes, not {loc.size}")
        return loc
