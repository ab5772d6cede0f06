"""appendfs.s3 — the S3-compatible gateway (not built yet)."""
