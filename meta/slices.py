"""Pure slice-map arithmetic: later-wins resolution, trimming, compaction. No I/O.

A file's data is a list of slices ``(seq, file_off, length) -> (extent_id, ext_off)``
(the ``slice`` table). Slices may overlap; where they do, the one with the higher
``seq`` (committed later) wins. Bytes covered by no slice are a hole and read as zeros.

:mod:`appendfs.meta.ops` loads slice rows and calls these functions; the file layer calls
:func:`resolve` to turn a read into extent reads. Everything here is deterministic and
tested byte-exact against a painted byte-array model (tests/unit/meta/test_slices.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slice:
    """One committed slice of a file (a ``slice`` row)."""

    seq: int
    file_off: int
    length: int
    extent_id: int
    ext_off: int
    id: int = 0

    @property
    def end(self) -> int:
        return self.file_off + self.length


@dataclass(frozen=True, slots=True)
class NewSlice:
    """A slice to commit: ``length`` bytes at ``file_off`` live at ``(extent_id, ext_off)``."""

    file_off: int
    length: int
    extent_id: int
    ext_off: int

    def __post_init__(self) -> None:
        if self.length <= 0 or self.file_off < 0 or self.ext_off < 0 or self.extent_id < 0:
            raise ValueError(f"bad slice {self}")


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of a file's visible bytes: from an extent, or a hole (``extent_id`` None)."""

    file_off: int
    length: int
    extent_id: int | None
    ext_off: int = 0

    @property
    def end(self) -> int:
        return self.file_off + self.length


def _claim(gaps: list[tuple[int, int]], s: Slice, out: list[Segment]) -> None:
    """Give the parts of ``gaps`` that ``s`` covers to ``s``; keep the rest as gaps."""
    starts = [g[0] for g in gaps]
    i = max(bisect.bisect_right(starts, s.file_off) - 1, 0)
    new: list[tuple[int, int]] = []
    j = i
    while j < len(gaps) and gaps[j][0] < s.end:
        a, b = gaps[j]
        lo, hi = max(a, s.file_off), min(b, s.end)
        if lo >= hi:
            new.append((a, b))
        else:
            out.append(Segment(lo, hi - lo, s.extent_id, s.ext_off + (lo - s.file_off)))
            if a < lo:
                new.append((a, lo))
            if hi < b:
                new.append((hi, b))
        j += 1
    gaps[i:j] = new


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours that continue each other (same extent, contiguous; or both holes)."""
    merged: list[Segment] = []
    for seg in segments:
        if merged:
            last = merged[-1]
            if last.end == seg.file_off and (
                (last.extent_id is None and seg.extent_id is None)
                or (last.extent_id == seg.extent_id and last.ext_off + last.length == seg.ext_off)
            ):
                merged[-1] = Segment(
                    last.file_off, last.length + seg.length, last.extent_id, last.ext_off
                )
                continue
        merged.append(seg)
    return merged


def resolve(slices: Iterable[Slice], offset: int, length: int) -> list[Segment]:
    """Segments covering exactly ``[offset, offset + length)``, in file order, later-wins.

    Holes come back as segments with ``extent_id`` None. Adjacent pieces that continue each
    other in the same extent are merged so a sequential read needs few extent reads.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if length == 0:
        return []
    gaps = [(offset, offset + length)]
    claimed: list[Segment] = []
    for s in sorted(slices, key=lambda x: x.seq, reverse=True):
        if not gaps:
            break
        if s.end > offset and s.file_off < offset + length:
            _claim(gaps, s, claimed)
    claimed.extend(Segment(a, b - a, None) for a, b in gaps)
    claimed.sort(key=lambda seg: seg.file_off)
    return _merge(claimed)


def visible(slices: Sequence[Slice]) -> list[Segment]:
    """The data segments (no holes) of a whole file, later-wins."""
    end = max((s.end for s in slices), default=0)
    return [seg for seg in resolve(slices, 0, end) if seg.extent_id is not None]


def compact(slices: Sequence[Slice]) -> list[NewSlice]:
    """A slice list with no overlaps that reads exactly like ``slices`` (metadata only)."""
    return [
        NewSlice(seg.file_off, seg.length, seg.extent_id, seg.ext_off)
        for seg in visible(slices)
        if seg.extent_id is not None
    ]


def trim(slices: Iterable[Slice], new_size: int) -> tuple[list[int], dict[int, int]]:
    """For truncation to ``new_size``: ids of slices to delete and ``{id: new_length}``."""
    delete: list[int] = []
    shorten: dict[int, int] = {}
    for s in slices:
        if s.file_off >= new_size:
            delete.append(s.id)
        elif s.end > new_size:
            shorten[s.id] = new_size - s.file_off
    return delete, shorten


def live_bytes(slices: Sequence[Slice]) -> dict[int, int]:
    """Bytes of each extent a file still shows (shadowed bytes are not live)."""
    out: dict[int, int] = {}
    for seg in visible(slices):
        assert seg.extent_id is not None
        out[seg.extent_id] = out.get(seg.extent_id, 0) + seg.length
    return out
