"""Frame codec and connection state machine of the appendfs wire protocol (no I/O).

Frame (all integers big-endian)::

    0      2  3  4        8        12       16
    | "AF" |v |k | req_id | hlen   | dlen   | header (msgpack map, hlen bytes) | data (dlen bytes) |

``v`` is :data:`WIRE_VERSION`; every frame carries it so a peer of another version is
refused on its first frame with a message naming both versions. ``k`` is the frame kind.
The header is a small msgpack map (at most :data:`MAX_HEADER_BYTES`); bulk data (extent
bytes) travels raw after it, never re-encoded, bounded by ``max_data_bytes``.

Handshake (mutual, HMAC-SHA256 over the cluster secret)::

    server → HELLO  {version, cluster_id, nonce_s, node}
    client → AUTH   {cluster_id, nonce_c, mac_c = HMAC(secret, "appendfs-c" | nonce_s | nonce_c)}
    server → AUTHOK {mac_s = HMAC(secret, "appendfs-s" | nonce_s | nonce_c)}

Only then may the client send REQUEST frames; the server answers each with a RESPONSE
carrying the same ``req_id`` (responses may come out of order). Any violation raises
:class:`ProtocolError`; the I/O layer logs it and closes the connection.
"""

from __future__ import annotations

import enum
import hmac
import struct
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Final

import msgpack

from appendfs.store.buffers import aligned_bytearray

WIRE_VERSION: Final = 1
MAGIC: Final = b"AF"
_FRAME = struct.Struct(">2sBBIII")
FRAME_HEADER_BYTES: Final = _FRAME.size  # 16
MAX_HEADER_BYTES: Final = 64 * 1024
#: Default bound of a frame's bulk data: a 16 MiB append or read plus nothing else.
DEFAULT_MAX_DATA_BYTES: Final = 16 * 1024 * 1024
NONCE_BYTES: Final = 32
#: Frames carrying at least this much data, once the connection is authenticated, are
#: received straight into a buffer of their own (:meth:`Connection.receive_buffer`): the
#: kernel fills it and it becomes the event's data, no copy in between. Smaller ones go
#: through the connection's byte buffer (two copies each: cheap at this size).
DIRECT_DATA_BYTES: Final = 64 * 1024


class Kind(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    AUTHOK = 3
    REQUEST = 4
    RESPONSE = 5


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ProtocolError(Exception):
    """The peer broke the protocol (garbage, oversize, wrong version, bad auth)."""


# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Server greeting: sent first by the server; received first by the client."""

    cluster_id: str
    nonce: bytes
    node: str = ""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Both sides proved knowledge of the secret; requests may flow."""

    peer_cluster_id: str


@dataclass(frozen=True, slots=True)
class Request:
    req_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    data: bytes | bytearray | memoryview = b""


@dataclass(frozen=True, slots=True)
class Response:
    """Reply to a request. ``error`` is None on success, else {"code", "message", ...}."""

    req_id: int
    result: dict[str, Any] = field(default_factory=dict)
    data: bytes | bytearray | memoryview = b""
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed its side (receive_data(b""))."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
Event = Hello | Authenticated | Request | Response | Closed


def _mac(secret: bytes, label: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, label + nonce_s + nonce_c, sha256).digest()


def _mac_field(head: dict[str, Any]) -> bytes:
    # Only bytes: bytes(int) would allocate that many zeros (or overflow) on a peer's say-so.
    mac = head["mac"]
    if not isinstance(mac, bytes):
        raise ProtocolError("MAC is not a byte string")
    return mac


class _State(enum.Enum):
    START = 0  # server: HELLO not yet sent / client: waiting for HELLO
    AUTHING = 1  # server: waiting for AUTH / client: waiting for AUTHOK
    READY = 2
    CLOSED = 3


class Connection:
    """One side of one connection. Feed bytes in, take events out, send events as bytes."""

    def __init__(self, role: Role, *, cluster_id: str, secret: bytes, nonce: bytes,
                 max_data_bytes: int = DEFAULT_MAX_DATA_BYTES, node: str = "") -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
        self.role = role
        self.cluster_id = cluster_id
        self._secret = secret
        self._nonce = nonce
        self._peer_nonce = b""
        self.node = node
        self.max_data_bytes = max_data_bytes
        self._buf = bytearray()
        # A frame whose data is being received into a buffer of its own: (kind, req_id,
        # header), the data buffer (page-aligned, not zeroed) and how much of it is filled.
        self._direct_head: tuple[int, int, dict[str, Any]] | None = None
        self._data: bytearray | None = None
        self._filled = 0
        self._state = _State.START
        self._peer_closed = False
        self.peer_node = ""
        self._peer_cluster_id = ""

    # ---- sending ----------------------------------------------------------------------

    def hello(self) -> list[bytes]:
        """Server: the greeting to send as soon as the connection is accepted."""
        if self.role is not Role.SERVER or self._state is not _State.START:
            raise ProtocolError("hello() is the server's first frame")
        self._state = _State.AUTHING
        return self._frame(Kind.HELLO, 0, {"cluster_id": self.cluster_id, "nonce": self._nonce, "node": self.node})

    def send(self, event: Request | Response) -> list[bytes | bytearray | memoryview]:
        """Encode a request (client) or response (server) as chunks to write in order."""
        if self._state is not _State.READY:
            raise ProtocolError("not authenticated yet")
        if isinstance(event, Request):
            if self.role is not Role.CLIENT:
                raise ProtocolError("only clients send requests")
            head: dict[str, Any] = {"op": event.op, "args": event.args}
            return self._frame(Kind.REQUEST, event.req_id, head, event.data)
        if self.role is not Role.SERVER:
            raise ProtocolError("only servers send responses")
        head = {"result": event.result}
        if event.error is not None:
            head["error"] = event.error
        return self._frame(Kind.RESPONSE, event.req_id, head, event.data)

    def _frame(self, kind: Kind, req_id: int, head: dict[str, Any],
               data: bytes | bytearray | memoryview = b"") -> list[Any]:
        hbytes = msgpack.packb(head, use_bin_type=True)
        if len(hbytes) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {len(hbytes)} bytes exceeds {MAX_HEADER_BYTES}")
        if len(data) > self.max_data_bytes:
            raise ProtocolError(f"data of {len(data)} bytes exceeds {self.max_data_bytes}")
        prefix = _FRAME.pack(MAGIC, WIRE_VERSION, kind, req_id, len(hbytes), len(data)) + hbytes
        return [prefix, data] if len(data) else [prefix]

    # ---- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the socket; b"" means the peer closed. (While
        :meth:`receive_buffer` names a buffer, receiving into it saves copying there.)"""
        if not data:
            self._peer_closed = True
            return
        if self._data is not None:
            take = min(len(data), len(self._data) - self._filled)
            with memoryview(data) as view:
                self._data[self._filled:self._filled + take] = view[:take]
                self._filled += take
                if take < len(view):
                    self._buf += view[take:]
            return
        self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes from the socket go, when not to :meth:`receive_data`: the
        unfilled rest of a large frame's data (a writable view; release it before the
        next :meth:`next_event`). Receive into it, then report with :meth:`received_into`.
        Never more than the frame needs, so nothing of the next frame lands in it."""
        if self._data is None or self._filled == len(self._data):
            return None
        return memoryview(self._data)[self._filled:]

    def received_into(self, n: int) -> None:
        """``n`` bytes were received into the view :meth:`receive_buffer` returned; 0
        means the peer closed."""
        if self._data is None or not 0 <= n <= len(self._data) - self._filled:
            raise RuntimeError(f"received_into({n}) without a receive_buffer() of that size")
        if n == 0:
            self._peer_closed = True
        self._filled += n

    def next_event(self) -> Event | _NeedData:
        """Parse the next complete frame into an event, or return NEED_DATA."""
        if self._state is _State.CLOSED:
            return Closed()
        if self._data is not None:
            return self._direct_event()
        buf = self._buf
        if len(buf) < FRAME_HEADER_BYTES:
            return self._need_more(bool(buf))
        magic, version, kind, req_id, hlen, dlen = _FRAME.unpack_from(buf)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not an appendfs peer")
        if version != WIRE_VERSION:
            raise ProtocolError(f"wire version mismatch: we speak version {WIRE_VERSION}, peer speaks version {version}")
        if hlen > MAX_HEADER_BYTES:
            raise ProtocolError(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
        if dlen > self.max_data_bytes:
            raise ProtocolError(f"data length {dlen} exceeds {self.max_data_bytes}")
        total = FRAME_HEADER_BYTES + hlen + dlen
        if len(buf) < total:
            if dlen >= DIRECT_DATA_BYTES and self._state is _State.READY and len(buf) >= FRAME_HEADER_BYTES + hlen:
                self._start_direct(kind, req_id, self._header(buf, hlen), FRAME_HEADER_BYTES + hlen, dlen)
            return self._need_more(True)
        head = self._header(buf, hlen)
        data: bytes | bytearray = b""
        if dlen:
            # One copy, through a view: bytes(buf[a:b]) would copy twice, via a fresh
            # multi-MiB bytearray whose pages must be faulted in (bench/store_bench.py).
            with memoryview(buf) as view:
                data = bytes(view[FRAME_HEADER_BYTES + hlen:total])
        del buf[:total]
        return self._checked_dispatch(kind, req_id, head, data)

    @staticmethod
    def _header(buf: bytearray, hlen: int) -> dict[str, Any]:
        try:
            head = msgpack.unpackb(bytes(buf[FRAME_HEADER_BYTES:FRAME_HEADER_BYTES + hlen]), raw=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ProtocolError(f"undecodable header: {exc.__class__.__name__}") from None
        if not isinstance(head, dict):
            raise ProtocolError("header is not a map")
        return head

    def _start_direct(self, kind: int, req_id: int, head: dict[str, Any], data_at: int, dlen: int) -> None:
        """The frame's header is here, most of its data is not: move what came of the data
        into a buffer of its own (the byte buffer holds nothing beyond this frame, which
        is incomplete) and receive the rest straight into it."""
        data = aligned_bytearray(dlen)
        have = len(self._buf) - data_at
        with memoryview(self._buf) as view:
            data[:have] = view[data_at:]
        self._buf.clear()
        self._direct_head, self._data, self._filled = (kind, req_id, head), data, have

    def _direct_event(self) -> Event | _NeedData:
        assert self._data is not None and self._direct_head is not None
        if self._filled < len(self._data):
            return self._need_more(True)
        (kind, req_id, head), data = self._direct_head, self._data
        self._direct_head, self._data, self._filled = None, None, 0
        return self._checked_dispatch(kind, req_id, head, data)

    def _checked_dispatch(self, kind: int, req_id: int, head: dict[str, Any],
                          data: bytes | bytearray) -> Event | _NeedData:
        try:
            return self._dispatch(Kind(kind), req_id, head, data)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed {kind} frame: {exc!r}") from None

    def _need_more(self, partial: bool) -> Event | _NeedData:
        if self._peer_closed:
            self._state = _State.CLOSED
            if partial:
                raise ProtocolError("peer closed the connection in the middle of a frame")
            return Closed()
        return NEED_DATA

    def _dispatch(self, kind: Kind, req_id: int, head: dict[str, Any], data: bytes | bytearray) -> Event | _NeedData:
        if self.role is Role.CLIENT:
            return self._client_event(kind, req_id, head, data)
        return self._server_event(kind, req_id, head, data)

    def _client_event(self, kind: Kind, req_id: int, head: dict[str, Any], data: bytes | bytearray) -> Event | _NeedData:
        if self._state is _State.START:
            if kind is not Kind.HELLO:
                raise ProtocolError(f"expected HELLO, got {kind.name}")
            nonce = head["nonce"]
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                raise ProtocolError("bad server nonce")
            self._peer_nonce = nonce
            self.peer_node = str(head.get("node", ""))
            self._peer_cluster_id = str(head["cluster_id"])
            return Hello(cluster_id=str(head["cluster_id"]), nonce=nonce, node=self.peer_node)
        if self._state is _State.AUTHING:
            if kind is not Kind.AUTHOK:
                raise ProtocolError(f"expected AUTHOK, got {kind.name}")
            expected = _mac(self._secret, b"appendfs-s", self._peer_nonce, self._nonce)
            if not hmac.compare_digest(expected, _mac_field(head)):
                raise ProtocolError("server failed authentication: wrong cluster secret")
            self._state = _State.READY
            return Authenticated(peer_cluster_id=self._peer_cluster_id)
        if kind is not Kind.RESPONSE:
            raise ProtocolError(f"expected RESPONSE, got {kind.name}")
        error = head.get("error")
        return Response(req_id=req_id, result=head.get("result") or {}, data=data, error=error)

    def auth(self) -> list[bytes]:
        """Client: answer the server's HELLO (call after next_event() returned Hello)."""
        if self.role is not Role.CLIENT or self._state is not _State.START or not self._peer_nonce:
            raise ProtocolError("auth() answers a received HELLO")
        self._state = _State.AUTHING
        mac = _mac(self._secret, b"appendfs-c", self._peer_nonce, self._nonce)
        return self._frame(Kind.AUTH, 0, {"cluster_id": self.cluster_id, "nonce": self._nonce, "mac": mac})

    def _server_event(self, kind: Kind, req_id: int, head: dict[str, Any], data: bytes | bytearray) -> Event | _NeedData:
        if self._state is _State.START:
            raise ProtocolError("server must send HELLO first")
        if self._state is _State.AUTHING:
            if kind is not Kind.AUTH:
                raise ProtocolError(f"expected AUTH, got {kind.name}")
            if head["cluster_id"] != self.cluster_id:
                raise ProtocolError(f"peer belongs to cluster {head['cluster_id']!r}, not {self.cluster_id!r}")
            nonce = head["nonce"]
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                raise ProtocolError("bad client nonce")
            expected = _mac(self._secret, b"appendfs-c", self._nonce, nonce)
            if not hmac.compare_digest(expected, _mac_field(head)):
                raise ProtocolError("client failed authentication: wrong cluster secret")
            self._peer_nonce = nonce
            self._state = _State.READY
            return Authenticated(peer_cluster_id=str(head["cluster_id"]))
        if kind is not Kind.REQUEST:
            raise ProtocolError(f"expected REQUEST, got {kind.name}")
        args = head.get("args") or {}
        if not isinstance(args, dict) or not isinstance(head["op"], str):
            raise ProtocolError("malformed request header")
        return Request(req_id=req_id, op=head["op"], args=args, data=data)

    def authok(self) -> list[bytes]:
        """Server: confirm a successful AUTH (call after next_event() returned Authenticated)."""
        if self.role is not Role.SERVER or self._state is not _State.READY:
            raise ProtocolError("authok() follows a verified AUTH")
        return self._frame(Kind.AUTHOK, 0, {"mac": _mac(self._secret, b"appendfs-s", self._nonce, self._peer_nonce)})

    @property
    def ready(self) -> bool:
        return self._state is _State.READY
