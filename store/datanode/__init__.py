"""appendfs.store.datanode — see the modules' docstrings."""
