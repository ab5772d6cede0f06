"""appendfs.store.metanode — see the modules' docstrings."""
