"""appendfs — a distributed POSIX filesystem on append-only LogStreams.

The root package holds what every layer shares and nothing more: the CLI
(:mod:`appendfs.cli`), configuration loading (:mod:`appendfs.config`), the SQL engine
factory (:mod:`appendfs.db`), `format` (:mod:`appendfs.format`), the `up` supervisor
(:mod:`appendfs.up`) and the root of the exception tree (:mod:`appendfs.errors`).

The layers are subpackages mapped from the repository's top-level folders:
``appendfs.store`` (store/), ``appendfs.meta`` (meta/), ``appendfs.fs`` (fs/),
``appendfs.mount`` (mount/), ``appendfs.s3`` (s3/). Imports go one way:
mount, s3 → fs → meta, store.client → store.wire; meta and store never import each other.
"""

__version__ = "0.1.0"
