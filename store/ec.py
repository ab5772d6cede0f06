"""Erasure coding of extents (DESIGN §2 EC, §8 EC layout) — the pure transform, no I/O.

An ``ec:K+M`` extent keeps its *logical* byte addresses (slices point at them, DESIGN §8)
and stores them as K+M *fragment files* under the same extent id, fragment index = replica
index. The logical extent is cut into stripes of K cells of ``cell_bytes``; each stripe
becomes one fixed-size *record* in every fragment file::

    logical extent:  | stripe 0: cell0 cell1 … cellK-1 | stripe 1 | …      (S = K·cell bytes)
    fragment i:      | hdr_i,0 cell_i,0 | hdr_i,1 cell_i,1 | …               (R = H + cell bytes)

Data fragments (i < K) hold the logical bytes verbatim (the codes are systematic), so a
healthy read maps offsets arithmetically (:meth:`Layout.locate`) and decodes nothing;
parity fragments (i ≥ K) hold the Reed-Solomon parity of the stripe.

A flush of a partial stripe writes a *short* stripe: its data is zero-padded to S before
encoding, the header records the true length (``data_bytes``), and the writer's next
stripe starts at the next stripe boundary. The pad is logical address space that no slice
ever references, so every offset stays exact and the mapping needs no index
(docs/erasure-coding.md explains the choice).

Every record header (:class:`StripeHeader`) names its format version, backend, K, M,
cell size, extent id, stripe number and fragment index, the true length, and the xxh3-64
of **all** K+M cells of the stripe. Decoding checks each input cell against those digests
and each reconstructed cell too, so a corrupt, misplaced or stale fragment is reported and
left out, and a wrong backend can never produce wrong bytes silently. pyeclib's own
fragment headers are not stored: they are identical for every full stripe of a layout,
so :class:`Codec` rebuilds them from a template (liberasurecode checks them on decode).

Data flow: the store client's EC writer calls :meth:`Codec.encode` on buffered stripes
and appends fragment *i* to the node holding index *i*; readers call
:meth:`Layout.locate` / :meth:`Layout.assemble` (healthy) or :meth:`Codec.decode`
(degraded); repair calls :meth:`Codec.rebuild`; scrub calls :func:`check_record`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Final

import xxhash
from pyeclib.ec_iface import LIBERASURECODE_VERSION, VALID_EC_TYPES, ECDriver, ECDriverError

from appendfs.store.codec import BLOCK_BYTES

HEADER_VERSION: Final = 1
MAGIC: Final = b"AFEC"
MAX_FRAGMENTS: Final = 32  # liberasurecode's limit on K+M
MIN_CELL_BYTES: Final = BLOCK_BYTES
MAX_CELL_BYTES: Final = 4 << 20  # a stripe of K cells must fit the writer's buffers and a frame
DEFAULT_CELL_BYTES: Final = 64 << 10

#: Backends this module can write and read, with their code in record headers. The code
#: is part of the on-disk format: parity written by one backend is not decodable by another.
BACKEND_CODES: Final[Mapping[str, int]] = {
    "liberasurecode_rs_vand": 1,
    "isa_l_rs_vand": 2,
    "isa_l_rs_cauchy": 3,
}
_BACKEND_NAMES: Final = {code: name for name, code in BACKEND_CODES.items()}
_PREFERENCE: Final = ("isa_l_rs_cauchy", "isa_l_rs_vand", "liberasurecode_rs_vand")
_VAND_MAX_PARITY: Final = 4  # isa_l_rs_vand has undecodable erasure patterns from M = 5 on

# magic, version, backend, k, m, index, 3 reserved, cell_bytes, extent_id, stripe, data_bytes
_HEAD: Final = struct.Struct(">4sBBBBB3xIQII")
_DIGEST: Final = struct.Struct(">Q")
_xxh3 = xxhash.xxh3_64_intdigest


# ---- errors -----------------------------------------------------------------------------


class EcError(Exception):
    """Base of this module's errors. Never raised with wrong data in hand."""


class LayoutError(EcError, ValueError):
    """A layout, backend or offset is out of range or malformed."""


class BackendUnavailable(EcError):
    """No pyeclib backend this module supports works in this process."""


class CorruptFragment(EcError):
    """A fragment record does not verify (header, version, identity or cell digest)."""

    def __init__(self, index: int, stripe: int, reason: str) -> None:
        super().__init__(f"fragment {index}, stripe {stripe}: {reason}")
        self.index = index
        self.stripe = stripe
        self.reason = reason


class NotEnoughFragments(EcError):
    """Fewer than K intact fragments of a stripe were given where decoding needed K."""

    def __init__(self, stripe: int, have: int, need: int, bad: Mapping[int, str]) -> None:
        why = "; ".join(f"fragment {i}: {r}" for i, r in sorted(bad.items()))
        super().__init__(f"stripe {stripe}: only {have} intact fragments, {need} needed"
                         + (f" ({why})" if why else ""))
        self.stripe = stripe
        self.have = have
        self.need = need
        self.bad = dict(bad)


# ---- backends ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a key of BACKEND_CODES
    reason: str  # one line for `appendfs status`


@cache
def available_backends() -> tuple[str, ...]:
    """Supported backends that pyeclib offers here and that round-trip, best first."""
    return tuple(name for name in _PREFERENCE if name in VALID_EC_TYPES and _round_trips(name))


def _round_trips(name: str) -> bool:
    try:
        driver = ECDriver(k=2, m=2, ec_type=name)
        data = bytes(range(256)) * 4
        frags = driver.encode(data)
        return bool(driver.decode([frags[2], frags[3]]) == data)  # parity only: real decoding
    except ECDriverError:
        return False


def choose_backend(k: int, m: int) -> BackendChoice:
    """The backend a new ``ec:k+m`` stream should use here, preferring ISA-L, and why."""
    _check_km(k, m)
    avail = available_backends()
    versions = f"pyeclib with liberasurecode {LIBERASURECODE_VERSION}"
    if "isa_l_rs_cauchy" in avail:
        _driver("isa_l_rs_cauchy", k, m)  # keep the backend loaded so its library shows in the maps
        return BackendChoice("isa_l_rs_cauchy", f"ISA-L ({_isal_origin()}; {versions}); the Cauchy "
                                                "matrix decodes every erasure pattern for any K+M")
    if "isa_l_rs_vand" in avail and m <= _VAND_MAX_PARITY:
        _driver("isa_l_rs_vand", k, m)
        return BackendChoice("isa_l_rs_vand", f"ISA-L ({_isal_origin()}; {versions}); Vandermonde, "
                                              f"safe for M <= {_VAND_MAX_PARITY}")
    if "liberasurecode_rs_vand" in avail:
        return BackendChoice("liberasurecode_rs_vand", f"ISA-L not available to pyeclib here; "
                                                       f"liberasurecode's own Reed-Solomon ({versions}), "
                                                       "about 10x slower")
    raise BackendUnavailable(f"no usable erasure-coding backend (pyeclib offers {sorted(VALID_EC_TYPES)})")


def _isal_origin() -> str:
    """Which libisal the process mapped: the copy bundled in the pyeclib wheel or the system's.

    Diagnostic only (it reads /proc/self/maps once a backend has been loaded).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libisal" in line}
    except OSError:
        return "libisal location unknown"
    if not paths:
        return "libisal location unknown"
    path = sorted(paths)[0]
    return ("libisal bundled with the pyeclib wheel" if "pyeclib.libs" in path else "system libisal") + f": {path}"


# ---- geometry ---------------------------------------------------------------------------


def _check_km(k: int, m: int) -> None:
    if k < 1 or m < 1 or k + m > MAX_FRAGMENTS:
        raise LayoutError(f"ec:{k}+{m} is out of range: K >= 1, M >= 1, K+M <= {MAX_FRAGMENTS}")


@dataclass(frozen=True)
class CellRange:
    """Part of a logical range that lies in one cell of one data fragment."""

    index: int  # fragment index (< K)
    frag_off: int  # offset in the fragment file
    length: int
    ext_off: int  # logical offset of its first byte


@dataclass(frozen=True)
class Layout:
    """Stripe geometry of an EC stream: K data cells + M parity cells of ``cell_bytes``."""

    k: int
    m: int
    cell_bytes: int = DEFAULT_CELL_BYTES

    def __post_init__(self) -> None:
        _check_km(self.k, self.m)
        if self.cell_bytes % BLOCK_BYTES or not MIN_CELL_BYTES <= self.cell_bytes <= MAX_CELL_BYTES:
            raise LayoutError(f"cell size {self.cell_bytes} is not a multiple of {BLOCK_BYTES} "
                              f"between {MIN_CELL_BYTES} and {MAX_CELL_BYTES}")

    @property
    def width(self) -> int:
        """Fragments per extent (K+M)."""
        return self.k + self.m

    @property
    def stripe_bytes(self) -> int:
        """Logical bytes per stripe (S = K·cell)."""
        return self.k * self.cell_bytes

    @property
    def header_bytes(self) -> int:
        """Bytes of a record header (H): fixed part + K+M digests + header check."""
        return _HEAD.size + 8 * self.width + 8

    @property
    def record_bytes(self) -> int:
        """Bytes one stripe takes in every fragment file (R = H + cell)."""
        return self.header_bytes + self.cell_bytes

    # logical space

    def stripe_of(self, ext_off: int) -> int:
        return ext_off // self.stripe_bytes

    def stripe_start(self, stripe: int) -> int:
        return stripe * self.stripe_bytes

    def next_boundary(self, ext_off: int) -> int:
        """Where the next stripe starts after data ending at ``ext_off`` (appends resume there)."""
        return -(-ext_off // self.stripe_bytes) * self.stripe_bytes

    def stripe_count(self, logical_end: int) -> int:
        """Stripes holding logical bytes [0, logical_end)."""
        return -(-logical_end // self.stripe_bytes)

    def stripes_per_extent(self, extent_max_bytes: int) -> int:
        """Whole stripes an extent of at most ``extent_max_bytes`` logical bytes takes."""
        return max(1, extent_max_bytes // self.stripe_bytes)

    # fragment space

    def fragment_length(self, logical_end: int) -> int:
        """Length of every fragment file of an extent whose logical end is ``logical_end``
        (what the MetaNode seals each fragment at)."""
        return self.stripe_count(logical_end) * self.record_bytes

    def records_in(self, fragment_length: int) -> int:
        """Whole records in a fragment of that length (a torn last record is garbage)."""
        return fragment_length // self.record_bytes

    def logical_end(self, last: StripeHeader) -> int:
        """Logical end of an extent whose last record has header ``last``."""
        return self.stripe_start(last.stripe) + last.data_bytes

    def record_span(self, first_stripe: int, count: int) -> tuple[int, int]:
        """(fragment offset, length) of the records of ``count`` stripes from ``first_stripe``."""
        return first_stripe * self.record_bytes, count * self.record_bytes

    def fragment_offset(self, ext_off: int) -> tuple[int, int]:
        """(data fragment index, offset in its file) holding logical byte ``ext_off``."""
        if ext_off < 0:
            raise LayoutError(f"negative offset {ext_off}")
        stripe, within = divmod(ext_off, self.stripe_bytes)
        index, at = divmod(within, self.cell_bytes)
        return index, stripe * self.record_bytes + self.header_bytes + at

    def logical_offset(self, index: int, frag_off: int) -> int:
        """Inverse of :meth:`fragment_offset`: the logical byte stored at ``frag_off`` of data
        fragment ``index``. Headers and parity hold no logical bytes."""
        stripe, at = divmod(frag_off, self.record_bytes)
        if not 0 <= index < self.k or frag_off < 0 or at < self.header_bytes:
            raise LayoutError(f"fragment {index} offset {frag_off} holds no logical byte")
        return self.stripe_start(stripe) + index * self.cell_bytes + at - self.header_bytes

    def locate(self, ext_off: int, length: int) -> list[CellRange]:
        """The cell pieces holding logical [ext_off, ext_off+length), in logical order."""
        if ext_off < 0 or length < 0:
            raise LayoutError(f"bad range [{ext_off}, {ext_off + length})")
        out: list[CellRange] = []
        pos, end = ext_off, ext_off + length
        while pos < end:
            index, frag_off = self.fragment_offset(pos)
            n = min(end - pos, self.cell_bytes - (pos % self.cell_bytes))
            out.append(CellRange(index, frag_off, n, pos))
            pos += n
        return out

    def read_spans(self, ext_off: int, length: int) -> dict[int, tuple[int, int]]:
        """One [start, end) read per data fragment covering its pieces of the range.

        A span may include records' headers between the cells; :meth:`assemble` skips them.
        """
        spans: dict[int, tuple[int, int]] = {}
        for p in self.locate(ext_off, length):
            lo, hi = spans.get(p.index, (p.frag_off, p.frag_off + p.length))
            spans[p.index] = (min(lo, p.frag_off), max(hi, p.frag_off + p.length))
        return spans

    def assemble(self, ext_off: int, length: int, fetched: Mapping[int, tuple[int, bytes]]) -> bytes:
        """Logical [ext_off, ext_off+length) from data fragment bytes: ``fetched[index]`` =
        (fragment offset, bytes) covering that fragment's span (healthy read, no decoding)."""
        out = bytearray()
        for p in self.locate(ext_off, length):
            if p.index not in fetched:
                raise LayoutError(f"data fragment {p.index} holds part of [{ext_off}, {ext_off + length})")
            start, data = fetched[p.index]
            at = p.frag_off - start
            if at < 0 or at + p.length > len(data):
                raise LayoutError(f"fragment {p.index} bytes [{start}, {start + len(data)}) do not cover "
                                  f"[{p.frag_off}, {p.frag_off + p.length})")
            out += data[at:at + p.length]
        return bytes(out)


# ---- record headers ---------------------------------------------------------------------


@dataclass(frozen=True)
class StripeHeader:
    """The header of one stripe's record in one fragment file."""

    backend: str
    k: int
    m: int
    index: int  # fragment index of this record
    cell_bytes: int
    extent_id: int
    stripe: int  # stripe number in the extent
    data_bytes: int  # true logical length of the stripe (< K·cell for a short stripe)
    digests: tuple[int, ...]  # xxh3-64 of each of the K+M cells as stored

    def pack(self) -> bytes:
        return _pack_header(BACKEND_CODES[self.backend], self.k, self.m, self.index, self.cell_bytes,
                            self.extent_id, self.stripe, self.data_bytes, _pack_digests(self.digests))


def _pack_digests(digests: Sequence[int]) -> bytes:
    return struct.pack(f">{len(digests)}Q", *digests)


def _pack_header(code: int, k: int, m: int, index: int, cell_bytes: int, extent_id: int, stripe: int,
                 data_bytes: int, digests: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, HEADER_VERSION, code, k, m, index, cell_bytes, extent_id, stripe, data_bytes) + digests
    return head + _DIGEST.pack(_xxh3(head))


def parse_header(layout: Layout, record: bytes | bytearray | memoryview) -> StripeHeader:
    """The header at the start of ``record``; CorruptFragment (index/stripe -1) if invalid."""
    hb = layout.header_bytes
    buf = bytes(record[:hb])
    if len(buf) < hb:
        raise CorruptFragment(-1, -1, f"record of {len(record)} bytes is shorter than a header")
    magic, version, code, k, m, index, cell, extent_id, stripe, data_bytes = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptFragment(-1, -1, "not an appendfs EC record (bad magic)")
    if _DIGEST.unpack_from(buf, hb - 8)[0] != _xxh3(buf[:hb - 8]):
        raise CorruptFragment(-1, -1, "header checksum mismatch")
    if version != HEADER_VERSION:
        raise CorruptFragment(-1, -1, f"EC record format version mismatch: we speak version "
                                      f"{HEADER_VERSION}, it has version {version}")
    if (k, m, cell) != (layout.k, layout.m, layout.cell_bytes) or code not in _BACKEND_NAMES \
            or index >= k + m or not 0 < data_bytes <= layout.stripe_bytes:
        raise CorruptFragment(-1, -1, f"header describes ec:{k}+{m}, cell {cell}, backend code {code}, "
                                      f"index {index}, {data_bytes} bytes: not this layout")
    digests = tuple(_DIGEST.unpack_from(buf, _HEAD.size + 8 * i)[0] for i in range(k + m))
    return StripeHeader(_BACKEND_NAMES[code], k, m, index, cell, extent_id, stripe, data_bytes, digests)


def check_record(layout: Layout, record: bytes | memoryview, *, extent_id: int, stripe: int,
                 index: int) -> StripeHeader:
    """Verify one record on its own (scrub): header, identity and its cell's digest."""
    try:
        h = parse_header(layout, record)
    except CorruptFragment as exc:
        raise CorruptFragment(index, stripe, exc.reason) from None
    if len(record) != layout.record_bytes:
        raise CorruptFragment(index, stripe, f"record is {len(record)} bytes, not {layout.record_bytes}")
    _check_identity(h, extent_id=extent_id, stripe=stripe, index=index)
    if _xxh3(record[layout.header_bytes:]) != h.digests[index]:
        raise CorruptFragment(index, stripe, "cell checksum mismatch")
    return h


def check_span(layout: Layout, data: bytes | memoryview, *, start: int, extent_id: int, index: int) -> int:
    """Verify what a healthy read's span of fragment ``index`` (bytes ``data`` from fragment
    offset ``start``) happens to hold of record structure: every whole record in it fully
    (:func:`check_record`), every other whole header for identity. A fragment stored where
    another index or extent is placed is caught here at no extra I/O; a span inside one cell
    holds no header (the DataNode's ``index`` in the read answer covers that case).
    Returns how many headers were checked."""
    rb, hb = layout.record_bytes, layout.header_bytes
    end = start + len(data)
    checked = 0
    for stripe in range(-(-start // rb), end // rb + 1):
        at = stripe * rb
        if at + hb > end:
            break
        rel = at - start
        if at + rb <= end:
            check_record(layout, data[rel:rel + rb], extent_id=extent_id, stripe=stripe, index=index)
        else:
            try:
                h = parse_header(layout, data[rel:rel + hb])
            except CorruptFragment as exc:
                raise CorruptFragment(index, stripe, exc.reason) from None
            _check_identity(h, extent_id=extent_id, stripe=stripe, index=index)
        checked += 1
    return checked


def _check_identity(h: StripeHeader, *, extent_id: int, stripe: int, index: int) -> None:
    if (h.extent_id, h.stripe, h.index) != (extent_id, stripe, index):
        raise CorruptFragment(index, stripe, f"record belongs to extent {h.extent_id} stripe {h.stripe} "
                                             f"fragment {h.index}")


# ---- the codec --------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    data: bytes
    bad: Mapping[int, str]  # fragment index -> why it was left out (report it)
    decoded_stripes: int  # stripes that needed reconstruction (0 = data cells sufficed)


@cache
def _driver(backend: str, k: int, m: int) -> ECDriver:
    return ECDriver(k=k, m=m, ec_type=backend)


@lru_cache(maxsize=64)
def _templates(backend: str, k: int, m: int, cell_bytes: int) -> tuple[bytes, ...]:
    """pyeclib's fragment headers for a full stripe of this layout (the same for every stripe).

    Also asserts, once, what the layout relies on: cells come out exactly ``cell_bytes``
    long and the code is systematic (data fragments hold the data verbatim).
    """
    probe = bytes(range(256)) * (k * cell_bytes // 256)
    frags = _driver(backend, k, m).encode(probe)
    hl = len(frags[0]) - cell_bytes
    if hl <= 0 or any(len(f) != hl + cell_bytes for f in frags):
        raise EcError(f"{backend} made fragments of {sorted({len(f) for f in frags})} bytes for cells of {cell_bytes}")
    for i in range(k):
        if frags[i][hl:] != probe[i * cell_bytes:(i + 1) * cell_bytes]:
            raise EcError(f"{backend} is not systematic: data fragment {i} does not hold the data")
    return tuple(f[:hl] for f in frags)


class Codec:
    """Encode, decode and rebuild the fragment records of one layout with one backend.

    Cheap to construct (drivers and header templates are cached per process). The same
    backend must decode what it encoded: records name theirs, and a mismatch is refused.
    Only bytes this class built reach pyeclib — liberasurecode aborts the process (assert)
    on some malformed inputs, for example a memoryview. pyeclib holds the GIL while it
    codes (its C extension never releases it), so a worker thread bounds how long the
    event loop waits per call (one pyeclib call per stripe) but adds no parallelism.
    """

    def __init__(self, layout: Layout, backend: str) -> None:
        if backend not in BACKEND_CODES:
            raise LayoutError(f"unsupported EC backend {backend!r}; supported: {sorted(BACKEND_CODES)}")
        if backend == "isa_l_rs_vand" and layout.m > _VAND_MAX_PARITY:
            raise LayoutError(f"isa_l_rs_vand cannot decode every pattern of ec:{layout.k}+{layout.m}")
        if backend not in available_backends():
            raise BackendUnavailable(f"EC backend {backend} is not available here "
                                     f"(available: {', '.join(available_backends()) or 'none'})")
        self.layout = layout
        self.backend = backend
        self._driver = _driver(backend, layout.k, layout.m)
        self._templates = _templates(backend, layout.k, layout.m, layout.cell_bytes)

    def encode(self, data: bytes | bytearray | memoryview, *, extent_id: int, first_stripe: int) -> list[bytes]:
        """Records to append to each of the K+M fragments for ``data``, which starts at the
        start of stripe ``first_stripe``: full stripes and, if ``data`` does not end on a
        stripe boundary, one short stripe (zero-padded, its true length in its header)."""
        lay = self.layout
        view = memoryview(data)
        if first_stripe < 0 or first_stripe + lay.stripe_count(len(view)) > 1 << 32 or not 0 <= extent_id < 1 << 64:
            raise LayoutError(f"bad stripe {first_stripe} or extent id {extent_id}")
        parts: list[list[bytes | memoryview]] = [[] for _ in range(lay.width)]
        hl, code = len(self._templates[0]), BACKEND_CODES[self.backend]
        for j in range(lay.stripe_count(len(view))):
            chunk = view[j * lay.stripe_bytes:(j + 1) * lay.stripe_bytes]
            buf = bytes(chunk) + bytes(lay.stripe_bytes - len(chunk))
            cells = [memoryview(f)[hl:] for f in self._driver.encode(buf)]
            digests = _pack_digests([_xxh3(c) for c in cells])
            for i, cell in enumerate(cells):
                parts[i] += (_pack_header(code, lay.k, lay.m, i, lay.cell_bytes, extent_id, first_stripe + j,
                                          len(chunk), digests), cell)
        return [b"".join(p) for p in parts]

    def decode(self, records: Mapping[int, bytes], *, extent_id: int, first_stripe: int,
               ext_off: int, length: int) -> Decoded:
        """Logical [ext_off, ext_off+length) from the records of stripes [first_stripe, …) of
        any fragments (``records[index]``: the same whole records from each).

        Stripes whose needed data cells are all intact are copied; the others are
        reconstructed from K intact fragments (NotEnoughFragments when fewer remain).
        Fragments that fail verification are left out and listed in ``Decoded.bad``.
        """
        lay = self.layout
        count = self._count(records, lay.stripe_of(max(ext_off, 0)))
        lo_stripe = lay.stripe_of(ext_off)
        if length <= 0 or ext_off < lay.stripe_start(first_stripe) or \
                ext_off + length > lay.stripe_start(first_stripe + count):
            raise LayoutError(f"range [{ext_off}, {ext_off + length}) is not within stripes "
                              f"{first_stripe}..{first_stripe + count - 1}")
        out = bytearray()
        bad: dict[int, str] = {}
        decoded = 0
        for stripe in range(lo_stripe, lay.stripe_of(ext_off + length - 1) + 1):
            base = lay.stripe_start(stripe)
            lo, hi = max(ext_off, base) - base, min(ext_off + length, base + lay.stripe_bytes) - base
            ref, good = self._verified(records, stripe - first_stripe, extent_id, stripe, bad)
            if hi > ref.data_bytes:
                raise EcError(f"stripe {stripe} holds {ref.data_bytes} bytes: [{base + lo}, {base + hi}) "
                              "reaches into its pad, which no slice may reference")
            need = range(lo // lay.cell_bytes, (hi - 1) // lay.cell_bytes + 1)
            missing = [i for i in need if i not in good]
            if missing:
                good.update(self._reconstruct(good, ref, missing, bad))
                decoded += 1
            cells = b"".join(good[i] for i in need)
            at = lo - need[0] * lay.cell_bytes
            out += cells[at:at + hi - lo]
        return Decoded(bytes(out), bad, decoded)

    def rebuild(self, records: Mapping[int, bytes], *, missing: int, extent_id: int, first_stripe: int) -> bytes:
        """Fragment ``missing``'s records for the stripes of ``records`` (any K intact others),
        byte-identical to what :meth:`encode` wrote (repair, re-placement)."""
        if not 0 <= missing < self.layout.width:
            raise LayoutError(f"no fragment {missing} in ec:{self.layout.k}+{self.layout.m}")
        others = {i: r for i, r in records.items() if i != missing}
        out: list[bytes] = []
        bad: dict[int, str] = {}
        for j in range(self._count(others, first_stripe)):
            ref, good = self._verified(others, j, extent_id, first_stripe + j, bad)
            cell = self._reconstruct(good, ref, [missing], bad)[missing]
            out += (replace(ref, index=missing).pack(), cell)
        return b"".join(out)

    # helpers

    def _count(self, records: Mapping[int, bytes], stripe: int) -> int:
        if not records:
            raise NotEnoughFragments(stripe, 0, self.layout.k, {})
        lengths = {len(r) for r in records.values()}
        if len(lengths) != 1 or lengths.pop() % self.layout.record_bytes:
            raise LayoutError(f"records must be whole records of {self.layout.record_bytes} bytes, the same "
                              f"number from each fragment (got {sorted(len(r) for r in records.values())})")
        if any(not 0 <= i < self.layout.width for i in records):
            raise LayoutError(f"fragment indexes {sorted(records)} outside 0..{self.layout.width - 1}")
        return len(next(iter(records.values()))) // self.layout.record_bytes

    def _verified(self, records: Mapping[int, bytes], j: int, extent_id: int, stripe: int,
                  bad: dict[int, str]) -> tuple[StripeHeader, dict[int, bytes | memoryview]]:
        """The stripe's agreed header and the cells that verify against it; the rest go to ``bad``.

        Each record's header must be valid and name this extent, stripe, index and backend;
        headers that pass must agree (they differ only in ``index``) — the version held by
        the most fragments whose cell matches its digest wins.
        """
        lay = self.layout
        hb, rb = lay.header_bytes, lay.record_bytes
        candidates: dict[int, tuple[StripeHeader, memoryview]] = {}
        for i, rec in records.items():
            view = memoryview(rec)
            try:
                h = parse_header(lay, view[j * rb:j * rb + hb])
            except CorruptFragment as exc:
                bad.setdefault(i, exc.reason)
                continue
            if (h.extent_id, h.stripe, h.index, h.backend) != (extent_id, stripe, i, self.backend):
                bad.setdefault(i, f"record is extent {h.extent_id} stripe {h.stripe} fragment {h.index} "
                                  f"({h.backend}), expected extent {extent_id} stripe {stripe} fragment {i} "
                                  f"({self.backend})")
                continue
            candidates[i] = (h, view[j * rb + hb:(j + 1) * rb])
        votes: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i, (h, cell) in candidates.items():
            if _xxh3(cell) == h.digests[i]:
                votes.setdefault((h.data_bytes, h.digests), []).append(i)
            else:
                bad.setdefault(i, "cell checksum mismatch")
        if not votes:
            raise NotEnoughFragments(stripe, 0, lay.k, {i: bad[i] for i in records if i in bad})
        ranked = sorted(votes.values(), key=len, reverse=True)
        if len(ranked) > 1 and len(ranked[1]) >= lay.k:
            raise EcError(f"stripe {stripe}: fragments {ranked[0]} and {ranked[1]} hold two different "
                          "valid versions of the stripe; refusing to choose")
        for loser in ranked[1:]:
            for i in loser:
                bad.setdefault(i, "header disagrees with the other fragments of the stripe")
        ref = candidates[ranked[0][0]][0]
        return ref, {i: candidates[i][1] for i in ranked[0]}  # views: copied only where used

    def _reconstruct(self, good: Mapping[int, bytes | memoryview], ref: StripeHeader, missing: Sequence[int],
                     bad: Mapping[int, str]) -> dict[int, bytes]:
        """Cells ``missing`` rebuilt from K of the ``good`` ones, each checked against its digest."""
        k = self.layout.k
        if len(good) < k:
            raise NotEnoughFragments(ref.stripe, len(good), k, bad)
        use = sorted(good)[:k]  # data fragments first: fewer operations to decode
        frags = [self._templates[i] + bytes(good[i]) for i in use]
        hl = len(self._templates[0])
        out = {}
        wanted = sorted(missing)  # pyeclib answers in fragment index order
        for i, frag in zip(wanted, self._driver.reconstruct(frags, wanted), strict=True):
            cell = frag[hl:]
            if _xxh3(cell) != ref.digests[i]:
                raise EcError(f"stripe {ref.stripe}: reconstructed cell {i} does not match its digest "
                              f"({self.backend}); refusing to return it")
            out[i] = cell
        return out
