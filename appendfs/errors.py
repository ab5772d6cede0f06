"""The root of appendfs's exception tree.

Every package defines its own subtree under :class:`AppendfsError` and translates
foreign errors (OSError, SQLAlchemy, socket errors) at its boundary. Each error says
whether it is *temporary* (retrying later may succeed: a dead node, a lost leader, a
locked database) or *permanent* (retrying cannot help: bad input, a version mismatch).
The mount turns these into errno values in one place; the S3 gateway into XML errors.
"""

from __future__ import annotations


class AppendfsError(Exception):
    """Base of every error appendfs raises on purpose."""

    #: True when the same call may succeed later without any change by the caller.
    temporary: bool = False


class ConfigError(AppendfsError):
    """A configuration value is missing, malformed or out of range (CLI exits 2)."""


class VersionMismatch(AppendfsError):
    """A peer, a data directory or a database speaks another format version."""

    def __init__(self, what: str, ours: int, theirs: int) -> None:
        super().__init__(f"{what} version mismatch: we speak version {ours}, it has version {theirs}")
        self.ours = ours
        self.theirs = theirs


class ClusterMismatch(AppendfsError):
    """A data directory or peer belongs to another cluster."""


class NotFormatted(AppendfsError):
    """The META_URL database has no appendfs schema: run `appendfs format` first."""
