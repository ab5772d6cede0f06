"""The namespace invariant checker (tests call it after every race; ``appendfs fsck`` later).

It reads whole tables into memory in one read-only transaction (fine up to a few million
rows; a streaming version is fsck's business) and returns a list of human-readable
problems — empty when the namespace is sound. The invariants are those listed in
:mod:`appendfs.meta.schema`.
"""

from __future__ import annotations

import stat
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa

from appendfs.meta import schema


def check_invariants(conn: sa.Connection) -> list[str]:
    I, D, S = schema.inode, schema.dentry, schema.slice_  # noqa: E741
    problems: list[str] = []
    inodes = {r.ino: r for r in conn.execute(sa.select(I))}
    dentries = conn.execute(sa.select(D.c.parent, D.c.name, D.c.ino, D.c.kind)).all()
    sustained = {r.ino for r in conn.execute(sa.select(schema.sustained.c.ino))}
    sessions = set(conn.execute(sa.select(schema.session.c.sid)).scalars())
    held_by = conn.execute(sa.select(schema.sustained.c.sid)).scalars().all()
    queued = set(conn.execute(sa.select(schema.delfile.c.ino)).scalars())
    links = set(conn.execute(sa.select(schema.symlink.c.ino)).scalars())

    root = inodes.get(schema.ROOT_INO)
    if root is None or root.kind != stat.S_IFDIR:
        return ["root inode 1 is missing or not a directory"]

    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    children: defaultdict[int, list[int]] = defaultdict(list)
    for d in dentries:
        child = inodes.get(d.ino)
        parent = inodes.get(d.parent)
        if child is None:
            problems.append(f"entry {d.name!r} in {d.parent} names missing inode {d.ino}")
            continue
        if parent is None or parent.kind != stat.S_IFDIR:
            problems.append(f"entry {d.name!r} has parent {d.parent} that is no directory")
        if d.kind != child.kind:
            problems.append(
                f"entry {d.name!r} in {d.parent}: kind {d.kind:o} != inode kind {child.kind:o}"
            )
        names[d.ino] += 1
        children[d.parent].append(d.ino)
        if child.kind == stat.S_IFDIR:
            subdirs[d.parent] += 1
            if child.parent != d.parent:
                problems.append(
                    f"directory {d.ino} is in {d.parent} but inode.parent is {child.parent}"
                )

    # Reachability: walk from the root; a directory seen twice means a cycle or a 2nd name.
    seen = {schema.ROOT_INO}
    todo = [schema.ROOT_INO]
    while todo:
        for child_ino in children.get(todo.pop(), []):
            if child_ino in seen:
                if inodes[child_ino].kind == stat.S_IFDIR:
                    problems.append(f"directory {child_ino} reached twice (cycle or second name)")
                continue
            seen.add(child_ino)
            if inodes[child_ino].kind == stat.S_IFDIR:
                todo.append(child_ino)

    for ino, a in inodes.items():
        if a.kind not in schema.KINDS:
            problems.append(f"inode {ino} has unknown kind {a.kind:o}")
        if a.kind == stat.S_IFDIR:
            want = 2 + subdirs[ino]
            if ino != schema.ROOT_INO and names[ino] != 1:
                problems.append(f"directory {ino} has {names[ino]} entries, not 1")
        else:
            want = names[ino]
        if a.nlink != want:
            problems.append(
                f"inode {ino} nlink {a.nlink} != {want} ({'subdirs+2' if a.kind == stat.S_IFDIR else 'entries'})"
            )
        if a.nlink > 0 and ino not in seen:
            problems.append(f"inode {ino} (nlink {a.nlink}) is not reachable from the root")
        if a.nlink == 0 and ino not in sustained:
            problems.append(
                f"inode {ino} has nlink 0 but no session holds it open (should be in delfile)"
            )
        if (a.kind == stat.S_IFLNK) != (ino in links):
            problems.append(f"inode {ino}: symlink row presence does not match kind {a.kind:o}")
        if ino in queued:
            problems.append(f"inode {ino} is both live and in the delete queue")

    for sid in set(held_by) - sessions:
        problems.append(f"sustained rows of unknown session {sid}")

    q = sa.select(S.c.ino, sa.func.max(S.c.file_off + S.c.length), sa.func.max(S.c.seq)).group_by(
        S.c.ino
    )
    for ino, end, seq in conn.execute(q):
        row = inodes.get(ino)
        if row is None:
            if ino not in queued:
                problems.append(f"slices of deleted inode {ino} outside the delete queue")
        elif end > row.size:
            problems.append(f"inode {ino}: a slice ends at {end} past size {row.size}")
        elif seq > row.slice_seq:
            problems.append(f"inode {ino}: slice seq {seq} > inode.slice_seq {row.slice_seq}")

    problems.extend(_check_s3(conn, inodes))

    next_ino = conn.execute(
        sa.select(schema.counter.c.value).where(schema.counter.c.name == schema.NEXT_INO)
    ).scalar_one()
    top = max([*inodes, *queued])
    if next_ino <= top:
        problems.append(f"counter next_ino {next_ino} <= highest inode {top}")
    return problems


def _check_s3(conn: sa.Connection, inodes: dict[int, sa.Row[Any]]) -> list[str]:
    """Invariant 5: S3 rows name live inodes of the right kind."""
    problems: list[str] = []
    OBJ, B = schema.s3_object, schema.s3_bucket
    for r in conn.execute(sa.select(OBJ.c.ino, OBJ.c.gen)):
        a = inodes.get(r.ino)
        if a is None:
            problems.append(f"s3_object row of missing inode {r.ino} (orphan)")
        elif a.kind not in (stat.S_IFREG, stat.S_IFDIR):
            problems.append(f"s3_object row of inode {r.ino} of kind {a.kind:o}")
        elif r.gen > a.gen:
            problems.append(f"s3_object of inode {r.ino}: gen {r.gen} > inode gen {a.gen}")
    for r in conn.execute(sa.select(B.c.name, B.c.ino)):
        a = inodes.get(r.ino)
        if a is None or a.kind != stat.S_IFDIR:
            problems.append(f"bucket {r.name!r}: inode {r.ino} is not a live directory")
    return problems
