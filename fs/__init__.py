"""appendfs.fs — the POSIX file layer shared by the mount and the S3 gateway (not built yet)."""
