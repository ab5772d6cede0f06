"""appendfs.store.wire — the sans-IO framed protocol spoken by DataNodes, MetaNodes and clients.

Bytes in, events out (h11-style): :class:`Connection` parses frames fed with
``receive_data()`` into frozen event dataclasses returned by ``next_event()``, and turns
events given to ``send()`` into the byte chunks to write. It does no I/O, reads no clock
and draws no randomness of its own (nonces are passed in), so it is tested byte for byte.
See docs/wire.md for the frame layout and the handshake.
"""

from appendfs.store.wire.protocol import (
    DEFAULT_MAX_DATA_BYTES,
    MAX_HEADER_BYTES,
    NEED_DATA,
    WIRE_VERSION,
    Authenticated,
    Closed,
    Connection,
    Event,
    Hello,
    ProtocolError,
    Request,
    Response,
    Role,
)

__all__ = [
    "DEFAULT_MAX_DATA_BYTES",
    "MAX_HEADER_BYTES",
    "NEED_DATA",
    "WIRE_VERSION",
    "Authenticated",
    "Closed",
    "Connection",
    "Event",
    "Hello",
    "ProtocolError",
    "Request",
    "Response",
    "Role",
]
