"""The cluster schema: what the MetaNode records in the META_URL database (DESIGN §2, §7, §8).

One of the two schema modules (the other is the namespace in meta/). Only the leading
MetaNode writes these tables, fenced by ``leader.epoch``; clients read ``cluster`` (the
secret) and ``leader`` (where to go). Heartbeats are *not* here: they live in the
leader's memory. Table names avoid the namespace's (inode, dentry, slice, counter, ...).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from appendfs.errors import NotFormatted, VersionMismatch

#: Bump when a table or column changes meaning; `format` writes it, daemons check it.
CLUSTER_SCHEMA_VERSION = 3  # 2: stream/extent ec_backend, ec_cell_bytes; 3: extent local_id

md = sa.MetaData()

store_schema = sa.Table(
    "store_schema", md,
    sa.Column("id", sa.Integer, primary_key=True, comment="always 1: a single row"),
    sa.Column("version", sa.Integer, nullable=False, comment="CLUSTER_SCHEMA_VERSION that created the tables"),
    comment="version of the cluster schema",
)

cluster = sa.Table(
    "cluster", md,
    sa.Column("id", sa.Integer, primary_key=True, comment="always 1: one cluster per database"),
    sa.Column("cluster_id", sa.String(64), nullable=False, comment="uuid made by `appendfs format`; stamped into every DataNode directory"),
    sa.Column("secret", sa.LargeBinary, nullable=False, comment="32 random bytes: the HMAC key every wire connection proves"),
    sa.Column("extent_max_bytes", sa.BigInteger, nullable=False, comment="largest extent; a writer rotates to a new extent at this length"),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="creation time, ns since the epoch"),
    comment="identity of the cluster",
)

leader = sa.Table(
    "leader", md,
    sa.Column("id", sa.Integer, primary_key=True, comment="always 1"),
    sa.Column("epoch", sa.BigInteger, nullable=False, comment="incremented by each new leader; every leader write checks it (fencing)"),
    sa.Column("address", sa.String(255), nullable=True, comment="HOST:PORT of the current leader; NULL before the first election"),
    sa.Column("since_ns", sa.BigInteger, nullable=False, comment="when this epoch began"),
    comment="which MetaNode leads; the leader also holds an advisory lock (PostgreSQL) or file lock (SQLite)",
)

node = sa.Table(
    "node", md,
    sa.Column("node_id", sa.String(64), primary_key=True, comment="id stamped into the DataNode's node.json"),
    sa.Column("address", sa.String(255), nullable=False, comment="HOST:PORT clients use; updated on every registration"),
    sa.Column("failure_domain", sa.String(255), nullable=False, comment="replicas of one extent go to distinct failure domains"),
    sa.Column("state", sa.String(16), nullable=False, comment="'active', or 'removed' once drained"),
    sa.Column("first_seen_ns", sa.BigInteger, nullable=False, comment="first registration"),
    sa.Column("last_seen_ns", sa.BigInteger, nullable=False, comment="last heartbeat persisted (coarse: liveness itself is in memory)"),
    comment="every DataNode ever registered",
)

device = sa.Table(
    "device", md,
    sa.Column("device_id", sa.String(128), primary_key=True, comment="'<node_id>/<n>'"),
    sa.Column("node_id", sa.String(64), sa.ForeignKey("node.node_id"), nullable=False, comment="owning DataNode"),
    sa.Column("backend", sa.String(16), nullable=False, comment="'file' or 'spdk'"),
    sa.Column("capacity_bytes", sa.BigInteger, nullable=False, comment="last reported capacity"),
    sa.Column("used_bytes", sa.BigInteger, nullable=False, comment="last reported use"),
    comment="devices of DataNodes; capacity is refreshed from heartbeats",
)

stream = sa.Table(
    "stream", md,
    sa.Column("stream_id", sa.BigInteger, primary_key=True, comment="allocated by the leader from store_counter"),
    sa.Column("owner", sa.String(16), nullable=False, comment="'fs', 's3-part' or 'raw': which index decides liveness (DESIGN §8)"),
    sa.Column("redundancy", sa.String(32), nullable=False, comment="'rep:N' or 'ec:K+M' for every extent of the stream"),
    sa.Column("ec_backend", sa.String(32), nullable=True,
              comment="ec only: pyeclib backend the writer encodes with (store.ec.BACKEND_CODES); NULL for rep. "
                      "Backends are not interchangeable: readers decode with this one"),
    sa.Column("ec_cell_bytes", sa.Integer, nullable=True, comment="ec only: cell size of the stripe layout; NULL for rep"),
    sa.Column("state", sa.String(16), nullable=False, comment="'open' while a writer holds the lease; 'closed' forever after"),
    sa.Column("lease_holder", sa.String(64), nullable=True, comment="client session id holding the lease; NULL when closed"),
    sa.Column("lease_expiry_ns", sa.BigInteger, nullable=True, comment="the lease ends here unless renewed; then the stream is fenced"),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="creation time"),
    comment="LogStreams: append-only chains of extents with exactly one writer",
)

extent = sa.Table(
    "extent", md,
    sa.Column("extent_id", sa.BigInteger, primary_key=True, comment="logical extent id; slices point here (DESIGN §8)"),
    sa.Column("stream_id", sa.BigInteger, sa.ForeignKey("stream.stream_id"), nullable=False, comment="owning stream"),
    sa.Column("seq", sa.Integer, nullable=False, comment="position in the stream, 0-based; only the last may be open"),
    sa.Column("state", sa.String(16), nullable=False, comment="'open' (writable) or 'sealed' (sealed_length final)"),
    sa.Column("sealed_length", sa.BigInteger, nullable=True, comment="bytes acknowledged by all replicas; NULL while open"),
    sa.Column("redundancy", sa.String(32), nullable=False, comment="copied from the stream when allocated"),
    sa.Column("ec_backend", sa.String(32), nullable=True, comment="copied from the stream (NULL for rep)"),
    sa.Column("ec_cell_bytes", sa.Integer, nullable=True,
              comment="copied from the stream (NULL for rep); sealed_length is the LOGICAL end, each fragment "
                      "file is ec.Layout.fragment_length(sealed_length) long"),
    sa.Column("placement_epoch", sa.Integer, nullable=False, comment="bumped whenever replica rows change; clients refresh on stale epochs"),
    sa.Column("local_id", sa.BigInteger, nullable=True,
              comment="the id DataNodes store this extent's copies under; NULL = extent_id. Transcoding writes the "
                      "new fragments under another id (store.placement.local_id) so a node may hold an old replica "
                      "and a new fragment of one extent at once"),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="allocation time"),
    sa.UniqueConstraint("stream_id", "seq"),
    comment="extents: the unit of allocation, sealing and repair",
)

replica = sa.Table(
    "replica", md,
    sa.Column("extent_id", sa.BigInteger, sa.ForeignKey("extent.extent_id"), primary_key=True, comment="logical extent"),
    sa.Column("idx", sa.Integer, primary_key=True, comment="replica index (rep) or fragment index (ec)"),
    sa.Column("node_id", sa.String(64), sa.ForeignKey("node.node_id"), nullable=False, comment="DataNode holding it"),
    sa.Column("device_id", sa.String(128), nullable=False, comment="device on that node"),
    sa.Column("state", sa.String(16), nullable=False,
              comment="'ok'; 'unsealed' (missed its seal: reconcile pending); 'corrupt' (bad checksum reported); 'missing' (lost)"),
    sa.Column("reason", sa.String(255), nullable=True, comment="why the state is not 'ok'"),
    comment="placement: where each replica / fragment of a logical extent lives",
)
sa.Index("replica_node", replica.c.node_id)

store_counter = sa.Table(
    "store_counter", md,
    sa.Column("name", sa.String(32), primary_key=True, comment="'stream' or 'extent'"),
    sa.Column("next_value", sa.BigInteger, nullable=False, comment="first id not yet handed out; the leader takes batches"),
    comment="id allocation in batches",
)


def create_schema(engine: Engine) -> None:
    """Create the cluster tables (idempotent) and record the schema version; upgrades a
    version-1 schema in place (`appendfs format` on an existing cluster)."""
    md.create_all(engine)
    with engine.begin() as c:
        row = c.execute(sa.select(store_schema.c.version)).first()
        if row is None:
            c.execute(store_schema.insert().values(id=1, version=CLUSTER_SCHEMA_VERSION))
            for name in ("stream", "extent"):
                c.execute(store_counter.insert().values(name=name, next_value=1))
        elif row.version in (1, 2):
            if row.version == 1:
                _upgrade_1_to_2(c)
            _upgrade_2_to_3(c)
        elif row.version != CLUSTER_SCHEMA_VERSION:
            raise VersionMismatch("cluster schema", CLUSTER_SCHEMA_VERSION, row.version)


def _upgrade_1_to_2(c: Any) -> None:
    """Version 1 had no EC columns: add them (NULL = rep:N, every stream and extent of v1)."""
    for table in ("stream", "extent"):
        c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN ec_backend VARCHAR(32)"))
        c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN ec_cell_bytes INTEGER"))
    c.execute(store_schema.update().values(version=2))


def _upgrade_2_to_3(c: Any) -> None:
    """Version 2 had no local ids (NULL = extent_id, which every v2 copy is stored under)."""
    c.execute(sa.text("ALTER TABLE extent ADD COLUMN local_id BIGINT"))
    c.execute(store_schema.update().values(version=3))


def check_schema(engine: Engine) -> None:
    """Raise NotFormatted / VersionMismatch unless the database holds our cluster schema."""
    row = None
    if sa.inspect(engine).has_table("store_schema"):
        with engine.connect() as c:
            row = c.execute(sa.select(store_schema.c.version)).first()
    if row is None:
        raise NotFormatted("the database has no appendfs cluster schema: run `appendfs format META_URL` first")
    if row.version != CLUSTER_SCHEMA_VERSION:
        raise VersionMismatch("cluster schema", CLUSTER_SCHEMA_VERSION, row.version)


def init_cluster(engine: Engine, cluster_id: str, secret: bytes, extent_max_bytes: int, now_ns: int) -> bool:
    """Record the cluster identity and an empty leader row once; False if already there."""
    with engine.begin() as c:
        if c.execute(sa.select(cluster.c.cluster_id)).first() is not None:
            return False
        c.execute(cluster.insert().values(id=1, cluster_id=cluster_id, secret=secret,
                                          extent_max_bytes=extent_max_bytes, created_ns=now_ns))
        c.execute(leader.insert().values(id=1, epoch=0, address=None, since_ns=now_ns))
        return True


def read_cluster(engine: Engine) -> Any:
    """(cluster_id, secret, extent_max_bytes) of a formatted database."""
    check_schema(engine)
    with engine.connect() as c:
        row = c.execute(sa.select(cluster.c.cluster_id, cluster.c.secret, cluster.c.extent_max_bytes)).first()
    if row is None:
        raise NotFormatted("the database has no cluster identity: run `appendfs format META_URL` first")
    return row
