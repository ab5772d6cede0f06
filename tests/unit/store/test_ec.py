"""Erasure coding of extents (store/ec.py): geometry, encode/decode/rebuild, corruption.

Property tests run on small layouts (4 KiB cells, K <= 4) so every example is a few
stripes; the same code paths serve 64 KiB cells.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyeclib.ec_iface import ECDriver

from appendfs.store import ec
from appendfs.store.codec import BlockError, entries_for, verify_blocks

BACKENDS = [b for b in ("isa_l_rs_cauchy", "liberasurecode_rs_vand") if b in ec.available_backends()]
EXTENT = 0x41


def data_of(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


layouts = st.builds(ec.Layout, k=st.integers(1, 4), m=st.integers(1, 3), cell_bytes=st.sampled_from([4096, 8192]))


@st.composite
def coded(draw: st.DrawFn, max_stripes: int = 3) -> tuple[ec.Codec, bytes, list[bytes]]:
    """A codec, logical data of any length (last stripe often short) and its fragments."""
    layout = draw(layouts)
    codec = ec.Codec(layout, draw(st.sampled_from(BACKENDS)))
    data = data_of(draw(st.integers(1, max_stripes * layout.stripe_bytes)), draw(st.integers(0, 2**32)))
    return codec, data, codec.encode(data, extent_id=EXTENT, first_stripe=0)


def decode_all(codec: ec.Codec, records: dict[int, bytes], length: int) -> ec.Decoded:
    return codec.decode(records, extent_id=EXTENT, first_stripe=0, ext_off=0, length=length)


def flip(buf: bytes, pos: int) -> bytes:
    out = bytearray(buf)
    out[pos] ^= 0x01
    return bytes(out)


# ---- backends -------------------------------------------------------------------------


def test_backends_available_and_chosen_best_first() -> None:
    avail = ec.available_backends()
    assert "liberasurecode_rs_vand" in avail  # comes with the pyeclib wheel
    choice = ec.choose_backend(4, 2)
    assert choice.name == avail[0]
    if any(name.startswith("isa_l") for name in avail):
        assert choice.name.startswith("isa_l") and "ISA-L" in choice.reason


def test_vandermonde_isal_is_never_used_where_it_cannot_decode_every_pattern() -> None:
    assert ec.choose_backend(6, 6).name != "isa_l_rs_vand"
    if "isa_l_rs_vand" in ec.available_backends():
        with pytest.raises(ec.LayoutError, match="cannot decode every pattern"):
            ec.Codec(ec.Layout(6, 6), "isa_l_rs_vand")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ec.LayoutError, match="unsupported EC backend"):
        ec.Codec(ec.Layout(4, 2), "jerasure_rs_vand")


@pytest.mark.parametrize(("k", "m", "cell"), [(0, 2, 4096), (4, 0, 4096), (20, 13, 4096), (4, 2, 1000),
                                              (4, 2, 0), (4, 2, 8 << 20)])
def test_layout_rejects_out_of_range(k: int, m: int, cell: int) -> None:
    with pytest.raises(ec.LayoutError):
        ec.Layout(k, m, cell)


def test_default_layout_sizes() -> None:
    lay = ec.Layout(4, 2)
    assert (lay.cell_bytes, lay.stripe_bytes, lay.header_bytes) == (64 << 10, 256 << 10, 32 + 6 * 8 + 8)
    assert lay.record_bytes == (64 << 10) + 88
    assert lay.stripes_per_extent(64 << 20) == 256
    assert lay.fragment_length(64 << 20) == 256 * lay.record_bytes


# ---- offsets --------------------------------------------------------------------------


@given(layouts, st.integers(0, 1 << 30))
@settings(max_examples=200)
def test_offset_mapping_round_trips(layout: ec.Layout, ext_off: int) -> None:
    index, frag_off = layout.fragment_offset(ext_off)
    assert 0 <= index < layout.k
    assert layout.logical_offset(index, frag_off) == ext_off
    stripe, within = divmod(frag_off, layout.record_bytes)
    assert stripe == layout.stripe_of(ext_off) and within >= layout.header_bytes


@given(layouts, st.integers(0, 1 << 20))
def test_headers_and_parity_hold_no_logical_bytes(layout: ec.Layout, stripe: int) -> None:
    with pytest.raises(ec.LayoutError):
        layout.logical_offset(0, stripe * layout.record_bytes + layout.header_bytes - 1)
    with pytest.raises(ec.LayoutError):
        layout.logical_offset(layout.k, stripe * layout.record_bytes + layout.header_bytes)


@given(layouts, st.integers(0, 1 << 24), st.integers(0, 1 << 18))
def test_locate_covers_the_range_in_order_one_cell_per_piece(layout: ec.Layout, ext_off: int, length: int) -> None:
    pieces = layout.locate(ext_off, length)
    pos = ext_off
    for p in pieces:
        assert p.ext_off == pos and p.length > 0
        assert layout.fragment_offset(p.ext_off) == (p.index, p.frag_off)
        assert p.ext_off // layout.cell_bytes == (p.ext_off + p.length - 1) // layout.cell_bytes
        pos += p.length
    assert pos == ext_off + length


def test_a_4k_read_touches_one_data_fragment_or_two() -> None:
    lay = ec.Layout(4, 2)
    assert [p.index for p in lay.locate(5 * lay.cell_bytes + 100, 4096)] == [1]
    assert [p.index for p in lay.locate(2 * lay.cell_bytes - 2048, 4096)] == [1, 2]


# ---- encode / healthy read / decode / rebuild -----------------------------------------


@given(coded(), st.data())
def test_healthy_read_assembles_data_fragments_without_decoding(case: tuple[ec.Codec, bytes, list[bytes]],
                                                                 data: st.DataObject) -> None:
    codec, payload, frags = case
    lay = codec.layout
    assert all(len(f) == lay.fragment_length(len(payload)) for f in frags)
    off = data.draw(st.integers(0, len(payload) - 1))
    length = data.draw(st.integers(1, len(payload) - off))
    spans = lay.read_spans(off, length)
    assert all(i < lay.k for i in spans)
    fetched = {i: (lo, frags[i][lo:hi]) for i, (lo, hi) in spans.items()}
    assert lay.assemble(off, length, fetched) == payload[off:off + length]


@given(coded(), st.data())
def test_any_k_fragments_give_identical_bytes(case: tuple[ec.Codec, bytes, list[bytes]], data: st.DataObject) -> None:
    codec, payload, frags = case
    lay = codec.layout
    order = data.draw(st.permutations(range(lay.width)))
    keep = order[:data.draw(st.integers(lay.k, lay.width))]
    off = data.draw(st.integers(0, len(payload) - 1))
    length = data.draw(st.integers(1, len(payload) - off))
    first = lay.stripe_of(off)
    count = lay.stripe_of(off + length - 1) - first + 1
    start, nbytes = lay.record_span(first, count)
    got = codec.decode({i: frags[i][start:start + nbytes] for i in keep}, extent_id=EXTENT, first_stripe=first,
                       ext_off=off, length=length)
    assert got.data == payload[off:off + length]
    assert got.bad == {}
    assert (got.decoded_stripes == 0) == all(i in keep for i in {p.index for p in lay.locate(off, length)})


@given(coded(), st.data())
def test_fewer_than_k_fragments_raise_never_return_data(case: tuple[ec.Codec, bytes, list[bytes]],
                                                        data: st.DataObject) -> None:
    codec, payload, frags = case
    lay = codec.layout
    keep = data.draw(st.permutations(range(lay.width)))[:data.draw(st.integers(0, lay.k - 1))]
    touched = {p.index for p in lay.locate(0, len(payload))}
    if touched <= set(keep):  # every needed data cell is here: a copy, no decoding needed
        assert decode_all(codec, {i: frags[i] for i in keep}, len(payload)).data == payload
        return
    with pytest.raises(ec.NotEnoughFragments):
        decode_all(codec, {i: frags[i] for i in keep}, len(payload))
    with pytest.raises(ec.NotEnoughFragments):
        codec.rebuild({i: frags[i] for i in keep}, missing=lay.width - 1 if lay.width - 1 not in keep else 0,
                      extent_id=EXTENT, first_stripe=0)


@given(coded(), st.data())
def test_rebuild_restores_any_fragment_byte_for_byte(case: tuple[ec.Codec, bytes, list[bytes]],
                                                     data: st.DataObject) -> None:
    codec, _payload, frags = case
    lay = codec.layout
    missing = data.draw(st.integers(0, lay.width - 1))
    others = [i for i in data.draw(st.permutations(range(lay.width))) if i != missing][:lay.k]
    rebuilt = codec.rebuild({i: frags[i] for i in others}, missing=missing, extent_id=EXTENT, first_stripe=0)
    assert rebuilt == frags[missing]


def test_empty_input_encodes_to_nothing_and_decodes_to_an_error() -> None:
    codec = ec.Codec(ec.Layout(4, 2, 4096), BACKENDS[0])
    assert codec.encode(b"", extent_id=EXTENT, first_stripe=0) == [b""] * 6
    with pytest.raises(ec.NotEnoughFragments):
        decode_all(codec, {}, 10)


# ---- short stripes --------------------------------------------------------------------


@given(coded(max_stripes=2), st.integers(1, 40000), st.integers(0, 2**32))
def test_short_stripes_keep_later_offsets_exact(case: tuple[ec.Codec, bytes, list[bytes]], second_len: int,
                                                seed: int) -> None:
    codec, first, frags1 = case
    lay = codec.layout
    # A flush after `first`: the next append starts at the next stripe boundary.
    resume = lay.next_boundary(len(first))
    second = data_of(second_len, seed)
    frags2 = codec.encode(second, extent_id=EXTENT, first_stripe=lay.stripe_of(resume))
    frags = [a + b for a, b in zip(frags1, frags2, strict=True)]
    end = resume + len(second)
    assert all(len(f) == lay.fragment_length(end) for f in frags)
    last = ec.parse_header(lay, frags[0][-lay.record_bytes:])
    assert lay.logical_end(last) == end
    spans = lay.read_spans(resume, len(second))
    assert lay.assemble(resume, len(second), {i: (lo, frags[i][lo:hi]) for i, (lo, hi) in spans.items()}) == second
    records = {i: frags[i] for i in range(lay.m, lay.width)}  # the first M data fragments lost
    for off, want in ((0, first), (resume, second)):
        assert codec.decode(records, extent_id=EXTENT, first_stripe=0, ext_off=off, length=len(want)).data == want
    if len(first) % lay.stripe_bytes:
        with pytest.raises(ec.EcError, match="pad"):
            codec.decode(records, extent_id=EXTENT, first_stripe=0, ext_off=0, length=len(first) + 1)


def test_a_short_stripe_records_its_true_length_in_every_fragment() -> None:
    lay = ec.Layout(4, 2, 4096)
    frags = ec.Codec(lay, BACKENDS[0]).encode(b"x" * 5000, extent_id=EXTENT, first_stripe=7)
    heads = [ec.parse_header(lay, f) for f in frags]
    assert [h.index for h in heads] == list(range(6))
    assert {(h.stripe, h.data_bytes, h.extent_id) for h in heads} == {(7, 5000, EXTENT)}
    assert frags[3][lay.header_bytes:] == bytes(lay.cell_bytes)  # data cell wholly in the pad


# ---- corruption -----------------------------------------------------------------------


@given(coded(max_stripes=2), st.data())
def test_a_flipped_byte_anywhere_is_detected(case: tuple[ec.Codec, bytes, list[bytes]], data: st.DataObject) -> None:
    codec, payload, frags = case
    lay = codec.layout
    victim = data.draw(st.integers(0, lay.width - 1))
    pos = data.draw(st.integers(0, len(frags[victim]) - 1))
    bent = list(frags)
    bent[victim] = flip(frags[victim], pos)
    got = decode_all(codec, dict(enumerate(bent)), len(payload))
    assert got.data == payload
    assert set(got.bad) == {victim}
    stripe = pos // lay.record_bytes
    with pytest.raises(ec.CorruptFragment):
        ec.check_record(lay, bent[victim][stripe * lay.record_bytes:(stripe + 1) * lay.record_bytes],
                        extent_id=EXTENT, stripe=stripe, index=victim)
    base = lay.stripe_start(stripe)
    touched = {p.index for p in lay.locate(base, min(len(payload), base + lay.stripe_bytes) - base)}
    if victim in touched:  # its cell in the bent stripe is needed: with exactly K fragments, too few are left
        keep = [victim, *[i for i in range(lay.width) if i != victim][:lay.k - 1]]
        with pytest.raises(ec.NotEnoughFragments, match=f"fragment {victim}"):
            decode_all(codec, {i: bent[i] for i in keep}, len(payload))
    else:  # a parity or pad-only cell there: given the data cells, nothing is reconstructed
        got = decode_all(codec, {i: bent[i] for i in range(lay.k)} | {victim: bent[victim]}, len(payload))
        assert (got.data, set(got.bad), got.decoded_stripes) == (payload, {victim}, 0)


def test_pyeclib_alone_returns_wrong_bytes_for_a_flipped_byte() -> None:
    """Why records carry their own digests: without a checksum type, pyeclib decodes a
    corrupted fragment into wrong data without a word."""
    driver = ECDriver(k=4, m=2, ec_type=BACKENDS[0])
    payload = data_of(4 * 4096)
    frags = driver.encode(payload)
    bent = flip(frags[4], len(frags[4]) - 1)
    assert driver.decode([frags[1], frags[2], frags[3], bent]) != payload


def test_block_checksums_cover_fragment_bytes_as_stored() -> None:
    """The DataNode stores a fragment like any extent: its 4 KiB block entries are computed
    over the record bytes, so the client's verified read rejects a flipped byte before
    any decoding (a healthy read never decodes at all)."""
    lay = ec.Layout(4, 2, 4096)
    frag = ec.Codec(lay, BACKENDS[0]).encode(data_of(3 * lay.stripe_bytes), extent_id=EXTENT, first_stripe=0)[1]
    entries = entries_for(frag)
    verify_blocks(frag, entries, 0)
    with pytest.raises(BlockError, match="checksum mismatch"):
        verify_blocks(flip(frag, lay.record_bytes + lay.header_bytes + 10), entries, 0)


def test_misplaced_fragments_are_left_out() -> None:
    lay = ec.Layout(4, 2, 4096)
    codec = ec.Codec(lay, BACKENDS[0])
    payload = data_of(2 * lay.stripe_bytes)
    frags = codec.encode(payload, extent_id=EXTENT, first_stripe=0)
    other = codec.encode(payload, extent_id=EXTENT + 1, first_stripe=0)
    records = {0: frags[1], 1: frags[0], 2: frags[2], 3: frags[3], 4: other[4], 5: frags[5]}
    with pytest.raises(ec.NotEnoughFragments) as info:
        decode_all(codec, records, len(payload))
    assert set(info.value.bad) == {0, 1, 4}
    assert "expected extent 65 stripe 0 fragment 0" in info.value.bad[0]
    records[0], records[1] = frags[0], frags[1]
    got = decode_all(codec, records, len(payload))
    assert got.data == payload and set(got.bad) == {4}


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two backends")
def test_records_of_another_backend_are_refused_not_decoded() -> None:
    lay = ec.Layout(4, 2, 4096)
    payload = data_of(lay.stripe_bytes)
    frags = ec.Codec(lay, BACKENDS[0]).encode(payload, extent_id=EXTENT, first_stripe=0)
    with pytest.raises(ec.NotEnoughFragments, match=BACKENDS[0]):
        decode_all(ec.Codec(lay, BACKENDS[1]), {i: frags[i] for i in (2, 3, 4, 5)}, len(payload))


def test_record_version_mismatch_names_both_versions() -> None:
    lay = ec.Layout(4, 2, 4096)
    rec = ec.Codec(lay, BACKENDS[0]).encode(b"abc", extent_id=EXTENT, first_stripe=0)[0]
    h = ec.parse_header(lay, rec)
    raw = bytearray(replace(h).pack())
    raw[4] = 2
    body = bytes(raw[:-8])
    raw[-8:] = ec._DIGEST.pack(ec._xxh3(body))
    with pytest.raises(ec.CorruptFragment, match="we speak version 1, it has version 2"):
        ec.parse_header(lay, bytes(raw))


def test_check_record_accepts_a_good_record_and_names_a_stranger() -> None:
    lay = ec.Layout(4, 2, 4096)
    frags = ec.Codec(lay, BACKENDS[0]).encode(data_of(lay.stripe_bytes), extent_id=EXTENT, first_stripe=3)
    assert ec.check_record(lay, frags[5], extent_id=EXTENT, stripe=3, index=5).index == 5
    with pytest.raises(ec.CorruptFragment, match="belongs to extent 65 stripe 3 fragment 5"):
        ec.check_record(lay, frags[5], extent_id=EXTENT, stripe=3, index=4)


def test_check_span_checks_the_record_structure_a_healthy_read_holds() -> None:
    """A healthy read's span of a data fragment: whole records are checked in full, headers
    whose cell is only partly in the span for identity; a span inside one cell holds none."""
    lay = ec.Layout(2, 1, 4096)
    frags = ec.Codec(lay, BACKENDS[0]).encode(data_of(3 * lay.stripe_bytes), extent_id=EXTENT, first_stripe=0)
    rb, hb = lay.record_bytes, lay.header_bytes

    def span(index: int, lo: int, hi: int, *, as_index: int | None = None, extent: int = EXTENT) -> int:
        return ec.check_span(lay, frags[index][lo:hi], start=lo, extent_id=extent,
                             index=index if as_index is None else as_index)

    assert span(0, 0, 3 * rb) == 3  # every record whole
    assert span(0, hb + 10, rb + hb + 100) == 1  # the second record's header, its cell partly
    assert span(0, rb - 100, 2 * rb + hb) == 2  # a header ending exactly at the span's end counts
    assert span(0, hb, rb) == 0  # one cell: no header to check
    assert span(1, 2 * rb + 1, 3 * rb) == 0
    with pytest.raises(ec.CorruptFragment, match="fragment 0, stripe 1: record belongs to extent 65 stripe 1 fragment 1"):
        span(1, hb + 10, rb + hb + 100, as_index=0)  # fragment 1's bytes where fragment 0 is placed
    with pytest.raises(ec.CorruptFragment, match="belongs to extent 65"):
        span(0, 0, rb, extent=EXTENT + 1)
    with pytest.raises(ec.CorruptFragment, match="fragment 0, stripe 2: cell checksum mismatch"):
        ec.check_span(lay, flip(frags[0], 2 * rb + hb + 7), start=0, extent_id=EXTENT, index=0)
    with pytest.raises(ec.CorruptFragment, match="fragment 0, stripe 1: header checksum mismatch"):
        ec.check_span(lay, flip(frags[0], rb + hb - 20)[rb - 5:rb + hb + 5], start=rb - 5, extent_id=EXTENT, index=0)
