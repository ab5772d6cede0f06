"""appendfs.store — the append-only storage layer (DESIGN §2).

Subpackages: ``wire`` (sans-IO frames), ``codec`` (block checksums), ``datanode``
(extent server), ``metanode`` (cluster manager), ``client`` (LogStreams and reads).
Shared modules: ``rpc`` (trio transport), ``placement`` (pure policy and placement),
``identity`` (secret file, data directory stamp), ``errors``.
"""
