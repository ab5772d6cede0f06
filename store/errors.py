"""The store's exception tree (for callers of appendfs.store.client)."""

from __future__ import annotations

from appendfs.errors import AppendfsError


class StoreError(AppendfsError):
    """Base of errors raised by the store client."""


class Unavailable(StoreError):
    """Not enough DataNodes, or no MetaNode leader, within the configured wait."""

    temporary = True


class NoSpace(StoreError):
    """No device has room for new extents (ENOSPC at the mount, 507 at S3)."""


class LeaseLost(StoreError):
    """This client no longer holds the stream (fenced after a lease expiry)."""


class Unreadable(StoreError):
    """No replica could return verified bytes for a range: never wrong data, this error."""


class BadLocator(StoreError):
    """A locator string is malformed, or the content read does not match its checksum."""
