"""The sans-IO wire protocol, byte for byte: handshake, framing, and every refusal."""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.store.buffers import ALIGN, address_of
from appendfs.store.wire import (
    NEED_DATA,
    WIRE_VERSION,
    Authenticated,
    Closed,
    Connection,
    Hello,
    ProtocolError,
    Request,
    Response,
    Role,
)
from appendfs.store.wire.protocol import (
    DIRECT_DATA_BYTES,
    FRAME_HEADER_BYTES,
    MAX_HEADER_BYTES,
    Kind,
)

CLUSTER = "c-0001"
SECRET = b"cluster secret"
SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(32, 64))


def make_pair(*, client_secret: bytes = SECRET, client_cluster: str = CLUSTER,
              max_data_bytes: int = 1 << 20) -> tuple[Connection, Connection]:
    server = Connection(Role.SERVER, cluster_id=CLUSTER, secret=SECRET, nonce=SERVER_NONCE,
                        max_data_bytes=max_data_bytes, node="dn-1")
    client = Connection(Role.CLIENT, cluster_id=client_cluster, secret=client_secret,
                        nonce=CLIENT_NONCE, max_data_bytes=max_data_bytes)
    return server, client


def feed(conn: Connection, chunks: list) -> None:
    for chunk in chunks:
        conn.receive_data(bytes(chunk))


def handshake(server: Connection, client: Connection) -> None:
    feed(client, server.hello())
    assert client.next_event() == Hello(cluster_id=CLUSTER, nonce=SERVER_NONCE, node="dn-1")
    assert client.next_event() is NEED_DATA
    feed(server, client.auth())
    assert server.next_event() == Authenticated(peer_cluster_id=CLUSTER)
    feed(client, server.authok())
    assert client.next_event() == Authenticated(peer_cluster_id=CLUSTER)
    assert server.ready and client.ready


def ready_pair(**kw) -> tuple[Connection, Connection]:
    server, client = make_pair(**kw)
    handshake(server, client)
    return server, client


def raw_frame(kind: int, head: object, data: bytes = b"", *, req_id: int = 0,
              magic: bytes = b"AF", version: int = WIRE_VERSION) -> bytes:
    hbytes = msgpack.packb(head, use_bin_type=True)
    return struct.pack(">2sBBIII", magic, version, kind, req_id, len(hbytes), len(data)) + hbytes + data


# ---- handshake --------------------------------------------------------------------------


def test_handshake_both_ways() -> None:
    server, client = make_pair()
    assert not server.ready and not client.ready
    handshake(server, client)
    assert client.peer_node == "dn-1"


def test_handshake_bytes_are_exact() -> None:
    # No clock, no randomness of its own: the bytes follow from the nonces and the secret.
    server, client = make_pair()
    hello = b"".join(bytes(c) for c in server.hello())
    assert hello == raw_frame(Kind.HELLO, {"cluster_id": CLUSTER, "nonce": SERVER_NONCE, "node": "dn-1"})
    client.receive_data(hello)
    client.next_event()
    auth = b"".join(bytes(c) for c in client.auth())
    mac_c = hmac.new(SECRET, b"appendfs-c" + SERVER_NONCE + CLIENT_NONCE, sha256).digest()
    assert auth == raw_frame(Kind.AUTH, {"cluster_id": CLUSTER, "nonce": CLIENT_NONCE, "mac": mac_c})
    server.receive_data(auth)
    server.next_event()
    authok = b"".join(bytes(c) for c in server.authok())
    mac_s = hmac.new(SECRET, b"appendfs-s" + SERVER_NONCE + CLIENT_NONCE, sha256).digest()
    assert authok == raw_frame(Kind.AUTHOK, {"mac": mac_s})
    client.receive_data(authok)
    assert client.next_event() == Authenticated(peer_cluster_id=CLUSTER)


def test_wrong_secret_refused_by_server() -> None:
    server, client = make_pair(client_secret=b"another secret")
    feed(client, server.hello())
    client.next_event()
    feed(server, client.auth())
    with pytest.raises(ProtocolError, match="wrong cluster secret"):
        server.next_event()
    assert not server.ready


def test_wrong_secret_refused_by_client() -> None:
    # A server that does not know the secret answers AUTH with a MAC of its own making.
    server, client = make_pair()
    impostor = Connection(Role.SERVER, cluster_id=CLUSTER, secret=b"guess", nonce=SERVER_NONCE)
    feed(client, server.hello())
    client.next_event()
    auth = b"".join(client.auth())
    feed(server, [auth])
    server.next_event()
    forged = raw_frame(Kind.AUTHOK, {"mac": b"\0" * 32})
    client.receive_data(forged)
    with pytest.raises(ProtocolError, match="wrong cluster secret"):
        client.next_event()
    assert not client.ready
    # The impostor cannot even verify the client's AUTH.
    impostor.hello()
    impostor.receive_data(auth)
    with pytest.raises(ProtocolError, match="wrong cluster secret"):
        impostor.next_event()


def test_authok_replayed_from_another_session_refused() -> None:
    server, client = make_pair()
    handshake(server, client)
    old_authok = b"".join(server.authok())
    _, client2 = make_pair()
    server2 = Connection(Role.SERVER, cluster_id=CLUSTER, secret=SECRET, nonce=bytes(32))
    feed(client2, server2.hello())
    client2.next_event()
    client2.auth()
    client2.receive_data(old_authok)
    with pytest.raises(ProtocolError):
        client2.next_event()


def test_wrong_cluster_id_refused_by_server() -> None:
    server, client = make_pair(client_cluster="c-other")
    feed(client, server.hello())
    hello = client.next_event()
    assert isinstance(hello, Hello) and hello.cluster_id == CLUSTER  # the caller can check too
    feed(server, client.auth())
    with pytest.raises(ProtocolError, match="c-other"):
        server.next_event()


def test_requests_before_authentication_refused() -> None:
    server, client = make_pair()
    with pytest.raises(ProtocolError):
        client.send(Request(1, "stat"))
    # A client that skips AUTH and sends a REQUEST frame is refused by the server.
    server.hello()
    server.receive_data(raw_frame(Kind.REQUEST, {"op": "stat", "args": {}}, req_id=1))
    with pytest.raises(ProtocolError, match="expected AUTH"):
        server.next_event()


def test_server_refuses_frames_before_its_hello() -> None:
    server, _ = make_pair()
    server.receive_data(raw_frame(Kind.AUTH, {"cluster_id": CLUSTER, "nonce": CLIENT_NONCE, "mac": b""}))
    with pytest.raises(ProtocolError):
        server.next_event()


def test_client_expects_hello_first() -> None:
    _, client = make_pair()
    client.receive_data(raw_frame(Kind.RESPONSE, {"result": {}}, req_id=1))
    with pytest.raises(ProtocolError, match="expected HELLO"):
        client.next_event()


def test_bad_nonces_refused() -> None:
    _, client = make_pair()
    client.receive_data(raw_frame(Kind.HELLO, {"cluster_id": CLUSTER, "nonce": b"short", "node": ""}))
    with pytest.raises(ProtocolError, match="nonce"):
        client.next_event()
    server, _ = make_pair()
    server.hello()
    server.receive_data(raw_frame(Kind.AUTH, {"cluster_id": CLUSTER, "nonce": "x" * 32, "mac": b""}))
    with pytest.raises(ProtocolError, match="nonce"):
        server.next_event()


def test_nonce_length_checked_at_construction() -> None:
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, cluster_id=CLUSTER, secret=SECRET, nonce=b"123")


def test_handshake_calls_out_of_order_refused() -> None:
    server, client = make_pair()
    with pytest.raises(ProtocolError):
        client.hello()
    with pytest.raises(ProtocolError):
        client.auth()  # no HELLO received yet
    with pytest.raises(ProtocolError):
        server.authok()  # no AUTH verified yet
    server.hello()
    with pytest.raises(ProtocolError):
        server.hello()


@pytest.mark.parametrize("mac", [2**63, 2**64 - 1, -1, 0, "text", None, [1]])
def test_mac_of_the_wrong_type_refused(mac: object) -> None:
    # Not bytes: refused as a protocol error (and never used as a length to allocate).
    _, client = make_pair()
    client.receive_data(b"".join(bytes(c) for c in make_pair()[0].hello()))
    client.next_event()
    client.auth()
    client.receive_data(raw_frame(Kind.AUTHOK, {"mac": mac}))
    with pytest.raises(ProtocolError):
        client.next_event()
    server, _ = make_pair()
    server.hello()
    server.receive_data(raw_frame(Kind.AUTH, {"cluster_id": CLUSTER, "nonce": CLIENT_NONCE, "mac": mac}))
    with pytest.raises(ProtocolError):
        server.next_event()


# ---- requests and responses -------------------------------------------------------------


def test_request_response_round_trip_with_raw_data() -> None:
    server, client = ready_pair()
    payload = bytes(range(256)) * 40
    chunks = client.send(Request(7, "append", {"extent": 3, "offset": 0}, memoryview(payload)))
    assert chunks[-1] == payload  # bulk data travels as its own chunk, not re-encoded
    feed(server, chunks)
    assert server.next_event() == Request(7, "append", {"extent": 3, "offset": 0}, payload)
    assert server.next_event() is NEED_DATA
    feed(client, server.send(Response(7, {"length": len(payload)}, b"")))
    assert client.next_event() == Response(7, {"length": len(payload)})
    feed(client, server.send(Response(8, {}, b"xy", error={"code": "sealed", "message": "no"})))
    assert client.next_event() == Response(8, {}, b"xy", {"code": "sealed", "message": "no"})


def test_empty_data_and_args() -> None:
    server, client = ready_pair()
    chunks = client.send(Request(1, "list"))
    assert len(chunks) == 1
    feed(server, chunks)
    assert server.next_event() == Request(1, "list", {}, b"")


def test_pipelined_frames_fed_one_byte_at_a_time() -> None:
    server, client = make_pair()
    wire = b"".join(bytes(c) for c in server.hello())
    # The client's side of the conversation, byte by byte: HELLO must appear only at the end.
    for i, byte in enumerate(wire):
        client.receive_data(bytes([byte]))
        event = client.next_event()
        if i < len(wire) - 1:
            assert event is NEED_DATA
        else:
            assert isinstance(event, Hello)
    feed(server, client.auth())
    server.next_event()
    feed(client, server.authok())
    client.next_event()

    requests = [Request(i, f"op{i}", {"i": i}, bytes([i]) * (i * 1000)) for i in range(1, 6)]
    stream = b"".join(bytes(c) for r in requests for c in client.send(r))
    got = []
    for byte in stream:
        server.receive_data(bytes([byte]))
        while (event := server.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == requests


@given(st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=6), st.data())
@settings(max_examples=50, deadline=None)
def test_pipelined_frames_split_anywhere(sizes: list[int], data: st.DataObject) -> None:
    server, client = ready_pair()
    requests = [Request(i, "append", {"n": n}, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    stream = b"".join(bytes(c) for r in requests for c in client.send(r))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if a != b:
            server.receive_data(stream[a:b])
        while (event := server.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == requests


def pump(conn: Connection, stream: bytes, reads: list[int], into: list[bool]) -> list[object]:
    """Deliver ``stream`` as an I/O layer does: into the connection's data buffer when it
    names one (and ``into`` says so for this read), else through receive_data; each read
    at most the next size of ``reads`` (both cycled). Returns the events in order."""
    got: list[object] = []
    at, i = 0, 0
    while True:
        while (event := conn.next_event()) is not NEED_DATA:
            got.append(event)
        if at == len(stream):
            return got
        n, use_buffer = reads[i % len(reads)], into[i % len(into)]
        i += 1
        view = conn.receive_buffer()
        if view is None or not use_buffer:
            if view is not None:
                view.release()
            conn.receive_data(stream[at:at + n])
            at = min(len(stream), at + n)
            continue
        with view:
            k = min(n, len(view), len(stream) - at)
            view[:k] = stream[at:at + k]
        conn.received_into(k)
        at += k


@given(st.lists(st.integers(0, 3 * DIRECT_DATA_BYTES), min_size=1, max_size=5),
       st.lists(st.integers(1, 2 * DIRECT_DATA_BYTES), min_size=1, max_size=4),
       st.lists(st.booleans(), min_size=1, max_size=4))
@settings(max_examples=60, deadline=None)
def test_large_frames_received_into_their_own_buffer_arrive_whole(sizes: list[int], reads: list[int],
                                                                 into: list[bool]) -> None:
    """Small and large frames back to back, read in any sizes, through the data buffers the
    connection names or through receive_data (which then fills the buffer itself, and
    keeps what follows for the next frame): the same events as fed whole; a large frame's
    data is the page-aligned buffer it was received into."""
    server, client = ready_pair(max_data_bytes=4 * DIRECT_DATA_BYTES)
    requests = [Request(i, "append", {"n": n}, bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    stream = b"".join(bytes(c) for r in requests for c in client.send(r))
    got = pump(server, stream, reads, into)
    assert got == requests
    for r in got:
        assert isinstance(r, Request)
        if len(r.data) > ALIGN and isinstance(r.data, bytearray):
            assert address_of(r.data) % ALIGN == 0


def test_a_large_frame_names_a_buffer_for_exactly_its_data() -> None:
    server, client = ready_pair(max_data_bytes=1 << 20)
    big = bytes(range(256)) * 1024  # 256 KiB
    f1 = b"".join(bytes(c) for c in client.send(Request(1, "append", {}, big)))
    f2 = b"".join(bytes(c) for c in client.send(Request(2, "stat", {})))
    head = len(f1) - len(big)
    assert server.receive_buffer() is None  # nothing pending: read into receive_data
    server.receive_data(f1[:1000])  # the header and the first bytes of the data
    assert server.next_event() is NEED_DATA
    view = server.receive_buffer()
    assert view is not None and len(view) == len(big) - (1000 - head)
    with view:
        view[:] = big[1000 - head:]
        n = len(view)
    server.received_into(n)
    assert server.receive_buffer() is None
    first = server.next_event()
    assert isinstance(first, Request) and first.data == big and isinstance(first.data, bytearray)
    server.receive_data(f2)
    assert server.next_event() == Request(2, "stat", {})
    with pytest.raises(RuntimeError):
        server.received_into(1)  # no buffer named


def test_small_frames_and_the_handshake_never_use_a_buffer_of_their_own() -> None:
    server, client = make_pair(max_data_bytes=1 << 20)
    hello = b"".join(bytes(c) for c in server.hello())
    client.receive_data(hello[:5])
    assert client.next_event() is NEED_DATA and client.receive_buffer() is None
    _, client = ready_pair(max_data_bytes=1 << 20)
    frame = b"".join(bytes(c) for c in client.send(Request(1, "append", {}, b"s" * (DIRECT_DATA_BYTES - 1))))
    server, _ = ready_pair(max_data_bytes=1 << 20)
    server.receive_data(frame[:100])
    assert server.next_event() is NEED_DATA and server.receive_buffer() is None


def test_peer_closed_while_a_large_frame_is_received_into_its_buffer() -> None:
    server, client = ready_pair(max_data_bytes=1 << 20)
    frame = b"".join(bytes(c) for c in client.send(Request(1, "append", {}, b"q" * (1 << 18))))
    server.receive_data(frame[:4096])
    assert server.next_event() is NEED_DATA
    view = server.receive_buffer()
    assert view is not None
    view.release()
    server.received_into(0)
    with pytest.raises(ProtocolError, match="middle of a frame"):
        server.next_event()


def test_responses_out_of_order() -> None:
    server, client = ready_pair()
    for i in (1, 2, 3):
        feed(server, client.send(Request(i, "read", {"i": i})))
    reqs = [server.next_event() for _ in range(3)]
    assert [r.req_id for r in reqs] == [1, 2, 3]
    for i in (3, 1, 2):
        feed(client, server.send(Response(i, {"i": i}, bytes([i]) * i)))
    got = [client.next_event() for _ in range(3)]
    assert [(r.req_id, r.result, r.data) for r in got] == [(3, {"i": 3}, b"\3\3\3"), (1, {"i": 1}, b"\1"),
                                                          (2, {"i": 2}, b"\2\2")]


def test_roles_cannot_send_the_others_events() -> None:
    server, client = ready_pair()
    with pytest.raises(ProtocolError):
        server.send(Request(1, "stat"))
    with pytest.raises(ProtocolError):
        client.send(Response(1))


def test_server_sending_a_request_refused_by_client() -> None:
    _, client = ready_pair()
    client.receive_data(raw_frame(Kind.REQUEST, {"op": "stat", "args": {}}, req_id=1))
    with pytest.raises(ProtocolError, match="expected RESPONSE"):
        client.next_event()


def test_client_sending_a_response_refused_by_server() -> None:
    server, _ = ready_pair()
    server.receive_data(raw_frame(Kind.RESPONSE, {"result": {}}, req_id=1))
    with pytest.raises(ProtocolError, match="expected REQUEST"):
        server.next_event()


def test_malformed_request_header_refused() -> None:
    heads: list[object] = [{"args": {}}, {"op": 5, "args": {}}, {"op": "x", "args": [1]}, [1, 2], b"x"]
    for head in heads:
        server, _ = ready_pair()
        server.receive_data(raw_frame(Kind.REQUEST, head, req_id=1))
        with pytest.raises(ProtocolError):
            server.next_event()


# ---- refusals of the framing ------------------------------------------------------------


def test_bad_magic_refused() -> None:
    _, client = make_pair()
    client.receive_data(raw_frame(Kind.HELLO, {}, magic=b"HT"))
    with pytest.raises(ProtocolError, match="magic"):
        client.next_event()


def test_wrong_version_names_both_versions() -> None:
    _, client = make_pair()
    other = WIRE_VERSION + 6
    client.receive_data(raw_frame(Kind.HELLO, {}, version=other))
    with pytest.raises(ProtocolError) as err:
        client.next_event()
    assert f"version {WIRE_VERSION}" in str(err.value) and f"version {other}" in str(err.value)


def test_oversized_header_length_refused_from_the_prefix() -> None:
    server, _ = ready_pair()
    server.receive_data(struct.pack(">2sBBIII", b"AF", WIRE_VERSION, Kind.REQUEST, 1, MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(ProtocolError, match="header length"):
        server.next_event()


def test_oversized_data_length_refused_before_the_body_arrives() -> None:
    server, client = ready_pair(max_data_bytes=1000)
    ok = b"".join(bytes(c) for c in client.send(Request(1, "append", {}, b"x" * 1000)))
    server.receive_data(ok)
    assert isinstance(server.next_event(), Request)  # exactly the bound is fine
    prefix = struct.pack(">2sBBIII", b"AF", WIRE_VERSION, Kind.REQUEST, 2, 10, 1001)
    assert len(prefix) == FRAME_HEADER_BYTES
    server.receive_data(prefix)  # the 16-byte prefix alone, no header, no body
    with pytest.raises(ProtocolError, match="data length 1001"):
        server.next_event()


def test_sender_refuses_oversized_data() -> None:
    _, client = ready_pair(max_data_bytes=10)
    with pytest.raises(ProtocolError):
        client.send(Request(1, "append", {}, b"x" * 11))


def test_unknown_kind_and_undecodable_header_refused() -> None:
    server, _ = ready_pair()
    server.receive_data(raw_frame(99, {}))
    with pytest.raises(ProtocolError, match="kind"):
        server.next_event()
    server, _ = ready_pair()
    server.receive_data(struct.pack(">2sBBIII", b"AF", WIRE_VERSION, Kind.REQUEST, 1, 1, 0) + b"\xc1")
    with pytest.raises(ProtocolError, match="undecodable"):
        server.next_event()


def test_peer_closed_mid_frame() -> None:
    server, client = ready_pair()
    frame = b"".join(bytes(c) for c in client.send(Request(1, "append", {}, b"z" * 100)))
    for cut in (1, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES, len(frame) - 1):
        s, _ = ready_pair()
        s.receive_data(frame[:cut])
        assert s.next_event() is NEED_DATA
        s.receive_data(b"")
        with pytest.raises(ProtocolError, match="middle of a frame"):
            s.next_event()
    # Closing between frames is a clean close.
    server.receive_data(frame)
    server.receive_data(b"")
    assert isinstance(server.next_event(), Request)
    assert server.next_event() == Closed()
    assert server.next_event() == Closed()


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_garbage_refused(garbage: bytes) -> None:
    # Whatever state, bytes that are not a frame end in ProtocolError, never another exception.
    for conn in (make_pair()[1], ready_pair()[0], ready_pair()[1]):
        conn.receive_data(garbage)
        conn.receive_data(b"")
        with pytest.raises(ProtocolError):
            while True:
                event = conn.next_event()
                assert event is not NEED_DATA
                if isinstance(event, Closed):
                    # Only a sequence of complete valid frames may close cleanly.
                    assert garbage.startswith(b"AF")
                    raise ProtocolError("closed cleanly")


_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.binary(max_size=40), st.text(max_size=10), st.lists(st.integers(-5, 5), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3))
_heads = st.one_of(
    st.fixed_dictionaries({}, optional={k: _values for k in ("cluster_id", "nonce", "node", "mac", "op",
                                                             "args", "result", "error")}),
    _values,
)


@given(st.sampled_from(["client-start", "client-authing", "client-ready", "server-authing",
                        "server-ready"]),
       st.one_of(st.sampled_from(list(Kind)), st.integers(min_value=0, max_value=255)), _heads,
       st.binary(max_size=20))
@settings(max_examples=200, deadline=None)
def test_well_framed_nonsense_is_a_protocol_error(state: str, kind: int, head: object, data: bytes) -> None:
    # Valid framing around an arbitrary header: an event or ProtocolError, never a crash.
    server, client = make_pair()
    if state != "client-start":
        feed(client, server.hello())
        client.next_event()
    if state in ("client-authing", "client-ready", "server-ready"):
        feed(server, client.auth())
        server.next_event()
    if state == "client-ready":
        feed(client, server.authok())
        client.next_event()
    conn = client if state.startswith("client") else server
    conn.receive_data(raw_frame(kind, head, data, req_id=5))
    try:
        event = conn.next_event()
    except ProtocolError:
        return
    assert isinstance(event, Hello | Authenticated | Request | Response)


def test_a_connection_closed_by_the_peer_refuses_to_send() -> None:
    """After the peer closed, send() raises ProtocolError (the RPC layer drops such replies)."""
    server = Connection(Role.SERVER, cluster_id="c", secret=b"s", nonce=b"\x01" * 32)
    client = Connection(Role.CLIENT, cluster_id="c", secret=b"s", nonce=b"\x02" * 32)
    client.receive_data(b"".join(server.hello()))
    client.next_event()
    server.receive_data(b"".join(client.auth()))
    server.next_event()
    server.receive_data(b"")
    assert isinstance(server.next_event(), Closed)
    with pytest.raises(ProtocolError):
        server.send(Response(req_id=1))
