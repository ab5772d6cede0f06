"""S3-style listing of a directory subtree in byte order of keys (prefix, delimiter, start-after).

A key ``a/b/c`` is the path ``a/b/c`` under the bucket directory. Directory entries are
indexed by ``(parent, name)``, which orders a directory's *names*; key order differs only
for directories, whose keys continue with ``/`` (0x2f): a file ``a.txt`` (``.`` is 0x2e)
sorts *before* everything under a directory ``a``, while the name ``a`` sorts before
``a.txt``. :func:`iter_keys` therefore streams each directory's entries in name order,
page by page from the index, and merges them through a small heap keyed by the entry's
key (``name`` or ``name + b"/"``), emitting an item once the stream has passed its key.
Seeking uses the index too: listing after ``start_after`` starts every level at the
component it names (plus the few directories whose name is a prefix of that component
followed by a byte below ``/``), so a page of a million-entry directory costs one page of
rows, not a scan.

The algorithm only talks to a :class:`Source` (two queries), so it is unit-tested against
an in-memory tree and used by :meth:`appendfs.meta.Meta.list_subtree` with SQL.
"""

from __future__ import annotations

import heapq
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from appendfs.meta.types import ListResult, ObjectEntry

SLASH = b"/"


@dataclass(frozen=True, slots=True)
class Entry:
    name: bytes
    ino: int
    kind: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def sort_key(self) -> bytes:
        return self.name + SLASH if self.is_dir else self.name


class Source(Protocol):
    def page(self, dir_ino: int, lo: bytes, inclusive: bool, limit: int) -> Sequence[Entry]:
        """Entries of ``dir_ino`` with name >= lo (> lo unless inclusive), in name order."""

    def named(self, dir_ino: int, names: Sequence[bytes]) -> Sequence[Entry]:
        """The entries among ``names`` that exist in ``dir_ino``."""


@dataclass(frozen=True, slots=True)
class Item:
    """One listing result: an object (a regular file) or a common prefix."""

    key: bytes
    entry: Entry
    is_prefix: bool


@dataclass(order=True)
class _Pending:
    key: bytes
    entry: Entry = field(compare=False)


def _stream(src: Source, dir_ino: int, lo: bytes, prefix: bytes, page: int) -> Iterator[Entry]:
    inclusive = True
    while True:
        rows = src.page(dir_ino, lo, inclusive, page)
        for e in rows:
            if not e.name.startswith(prefix):
                return
            yield e
        if len(rows) < page:
            return
        lo, inclusive = rows[-1].name, False


def iter_keys(
    src: Source,
    dir_ino: int,
    base: bytes,
    after: bytes | None,
    prefix: bytes,
    delimit: bool,
    page: int = 1000,
) -> Iterator[Item]:
    """Items under directory ``dir_ino`` (whose keys start with ``base``) in key order.

    ``after``: only keys greater than ``base + after``. ``prefix``: only names starting with
    it (this level only). ``delimit``: directories become common prefixes (``/``).
    """
    lo = prefix
    heap: list[_Pending] = []
    if after is not None:
        first = after.split(SLASH, 1)[0]
        lo = max(lo, first)
        # Directories named by a proper prefix of `first` followed by a byte below '/' have
        # keys after `after` although their names sort before `first`.
        cands = [
            first[:i]
            for i in range(1, len(first))
            if first[i] < SLASH[0] and first[:i].startswith(prefix)
        ]
        for e in src.named(dir_ino, cands) if cands else ():
            if e.is_dir:
                heapq.heappush(heap, _Pending(e.sort_key, e))
    for e in _stream(src, dir_ino, lo, prefix, page):
        heapq.heappush(heap, _Pending(e.sort_key, e))
        while heap and heap[0].key <= e.name:
            yield from _emit(src, heapq.heappop(heap).entry, base, after, delimit, page)
    while heap:
        yield from _emit(src, heapq.heappop(heap).entry, base, after, delimit, page)


def _emit(
    src: Source, e: Entry, base: bytes, after: bytes | None, delimit: bool, page: int
) -> Iterator[Item]:
    if not e.is_dir:
        if e.kind == stat.S_IFREG and (after is None or e.name > after):
            yield Item(base + e.name, e, False)
        return
    key = e.name + SLASH
    inside = after is not None and after.startswith(key)
    if after is not None and not inside and key <= after:
        return
    sub_after = after[len(key) :] if inside and after is not None else None
    if delimit:
        # S3 shows a common prefix only when some key under it is listed: skip directories
        # without files (after start-after) and the prefix a continuation token names.
        if not (inside and after == key) and next(
            iter_keys(src, e.ino, b"", sub_after, b"", False, 1), None
        ):
            yield Item(base + key, e, True)
        return
    yield from iter_keys(src, e.ino, base + key, sub_after, b"", False, page)


def split_prefix(prefix: bytes) -> tuple[list[bytes], bytes]:
    """``b"a/b/cd"`` -> ([b"a", b"b"], b"cd"): directories to descend, then a name prefix."""
    *dirs, rest = prefix.split(SLASH)
    return [d for d in dirs if d], rest


def relative_after(start_after: bytes | None, base: bytes) -> tuple[bool, bytes | None]:
    """Map a bucket-level start-after onto directory ``base``: (anything left?, after)."""
    if not start_after or start_after < base:
        return True, None
    if start_after.startswith(base):
        return True, start_after[len(base) :]
    return False, None


def roll_up(
    items: Iterator[Item], prefix: bytes, delimiter: bytes, start_after: bytes | None
) -> Iterator[Item]:
    """Common prefixes for a delimiter other than '/' (keys arrive in order, so runs are contiguous).

    A common prefix equal to ``start_after`` (a continuation token) is not shown again.
    """
    last = start_after
    for it in items:
        rest = it.key[len(prefix) :]
        cut = rest.find(delimiter)
        if cut < 0:
            yield it
            continue
        cp = prefix + rest[: cut + len(delimiter)]
        if cp != last:
            last = cp
            yield Item(cp, it.entry, True)


def list_page(
    src: Source,
    dir_ino: int,
    prefix: bytes,
    delimiter: bytes | None,
    start_after: bytes | None,
    max_keys: int,
) -> ListResult:
    """One page of ListObjectsV2 over the subtree of ``dir_ino`` (the bucket directory)."""
    empty = ListResult([], [], False, None)
    dirs, name_prefix = split_prefix(prefix)
    cur = dir_ino
    for d in dirs:
        found = src.named(cur, [d])
        if not found or not found[0].is_dir:
            return empty
        cur = found[0].ino
    base = b"".join(d + SLASH for d in dirs)
    go, after = relative_after(start_after, base)
    if not go or max_keys <= 0:
        return empty
    slash = delimiter == SLASH
    items = iter_keys(src, cur, base, after, name_prefix, slash, page=min(1000, max_keys + 1))
    if delimiter and not slash:
        items = roll_up(items, prefix, delimiter, start_after)
    objects: list[ObjectEntry] = []
    prefixes: list[bytes] = []
    last: bytes | None = None
    for it in items:
        if len(objects) + len(prefixes) == max_keys:
            return ListResult(objects, prefixes, True, last)
        if it.is_prefix:
            prefixes.append(it.key)
        else:
            objects.append(ObjectEntry(it.key, it.entry.ino, it.entry.size, it.entry.mtime_ns))
        last = it.key
    return ListResult(objects, prefixes, False, None)
