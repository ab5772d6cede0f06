"""appendfs.store.client — the heavyweight store client (fan-out appends, verified reads).

Public API: :class:`StoreClient`, :class:`LogStream`, :class:`Ticket`, :class:`Locator`,
:class:`Piece`, :class:`ClientConfig`.
"""

from appendfs.store.client.client import StoreClient
from appendfs.store.client.config import ClientConfig
from appendfs.store.client.locator import Locator, Piece
from appendfs.store.client.stream import LogStream, Ticket

__all__ = ["ClientConfig", "Locator", "LogStream", "Piece", "StoreClient", "Ticket"]
