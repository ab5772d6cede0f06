"""appendfs.mount — the pyfuse3 adapter (not built yet)."""
