"""Model-based test: random operation sequences on SQLite, PostgreSQL and an in-memory POSIX model.

Each step applies one operation to the model and to both engines; the outcome (success or
errno) must agree, and after each step the visible trees must be identical: names in
readdir order, kinds, nlink, sizes, file bytes (slice maps rendered with a deterministic
fake extent content), symlink targets and xattrs. At the end the invariant checker must
pass on both databases. Every example works in a fresh top-level directory, so the
databases are created once per test.
"""

from __future__ import annotations

import errno
import itertools
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from appendfs.meta import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    FsError,
    Meta,
    NewSlice,
    Segment,
)

NAMES = st.sampled_from([b"a", b"b", b"c"])
PICK = st.integers(0, 10_000)


def extent_byte(extent_id: int, off: int) -> int:
    return (extent_id * 31 + off * 7) % 251 + 1


def render(segments: list[Segment]) -> bytes:
    out = bytearray()
    for s in segments:
        out += (
            bytes(s.length)
            if s.extent_id is None
            else bytes(extent_byte(s.extent_id, s.ext_off + i) for i in range(s.length))
        )
    return bytes(out)


@dataclass(eq=False)
class Node:
    id: int
    kind: int
    children: dict[bytes, Node] = field(default_factory=dict)
    parent: Node | None = None
    nlink: int = 1
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


class Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def is_ancestor(anc: Node, node: Node) -> bool:
    cur: Node | None = node
    while cur is not None:
        if cur is anc:
            return True
        cur = cur.parent
    return False


class NamespaceMachine(RuleBasedStateMachine):
    metas: tuple[Meta, Meta]
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.ids = itertools.count(1)
        self.root = Node(0, stat.S_IFDIR, nlink=2)
        top = b"run%d" % next(self.counter)
        self.inos: list[dict[int, int]] = []
        for m in self.metas:
            a = m.mkdir(ROOT_INO, top, 0o755, 0, 0)
            self.inos.append({0: a.ino})
        self.next_extent = itertools.count(1)

    # --- helpers -------------------------------------------------------------------------

    def nodes(self) -> Iterator[Node]:
        todo = [self.root]
        seen: set[int] = set()
        while todo:
            n = todo.pop()
            if n.id in seen:
                continue
            seen.add(n.id)
            yield n
            todo.extend(n.children[k] for k in sorted(n.children, reverse=True))

    def pick_dir(self, i: int) -> Node:
        dirs = [n for n in self.nodes() if n.is_dir]
        return dirs[i % len(dirs)]

    def pick_entry(self, i: int, d: int, name: bytes) -> tuple[Node, bytes]:
        """Mostly an existing (directory, name) pair, sometimes an arbitrary one."""
        entries = [(n, k) for n in self.nodes() if n.is_dir for k in sorted(n.children)]
        if i % 4 == 0 or not entries:
            return self.pick_dir(d), name
        return entries[i % len(entries)]

    def pick(self, i: int, kind: int | None = None) -> Node | None:
        cands = [n for n in self.nodes() if n is not self.root and (kind is None or n.kind == kind)]
        return cands[i % len(cands)] if cands else None

    def apply(
        self, model: Callable[[], Any], real: Callable[[Meta, dict[int, int]], Any]
    ) -> list[Any]:
        """Run the model step and the same step on both engines; outcomes must agree."""
        try:
            want: Any = ("ok", model())
        except Fail as f:
            want = ("err", f.code)
        results = []
        for m, inos in zip(self.metas, self.inos, strict=True):
            try:
                got: Any = ("ok", real(m, inos))
            except FsError as e:
                got = ("err", e.errno)
            assert got[0] == want[0] and (got[0] == "ok" or got[1] == want[1]), (
                f"{m.engine.dialect.name}: model says {want}, engine says {got}"
            )
            results.append(got[1])
        return results

    # --- rules ---------------------------------------------------------------------------

    @rule(
        d=PICK,
        name=NAMES,
        kind=st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFDIR, stat.S_IFLNK]),
    )
    def make(self, d: int, name: bytes, kind: int) -> None:
        parent = self.pick_dir(d)
        node = Node(
            next(self.ids),
            kind,
            parent=parent if kind == stat.S_IFDIR else None,
            nlink=2 if kind == stat.S_IFDIR else 1,
            target=b"t/%s" % name if kind == stat.S_IFLNK else b"",
        )

        def model() -> None:
            if name in parent.children:
                raise Fail(errno.EEXIST)

        def real(m: Meta, inos: dict[int, int]) -> int:
            p = inos[parent.id]
            if kind == stat.S_IFDIR:
                return m.mkdir(p, name, 0o755, 0, 0).ino
            if kind == stat.S_IFLNK:
                return m.symlink(p, name, node.target, 0, 0).ino
            return m.create(p, name, 0o644, 0, 0).ino

        out = self.apply(model, real)
        if name not in parent.children:
            parent.children[name] = node
            if node.is_dir:
                parent.nlink += 1
            for inos, ino in zip(self.inos, out, strict=True):
                inos[node.id] = ino

    @rule(e=PICK, d=PICK, name=NAMES, as_dir=st.booleans())
    def remove(self, e: int, d: int, name: bytes, as_dir: bool) -> None:
        parent, name = self.pick_entry(e, d, name)

        def model() -> None:
            node = parent.children.get(name)
            if node is None:
                raise Fail(errno.ENOENT)
            if as_dir and not node.is_dir:
                raise Fail(errno.ENOTDIR)
            if not as_dir and node.is_dir:
                raise Fail(errno.EISDIR)
            if node.is_dir and node.children:
                raise Fail(errno.ENOTEMPTY)
            del parent.children[name]
            node.nlink -= 1
            if node.is_dir:
                parent.nlink -= 1

        def real(m: Meta, inos: dict[int, int]) -> None:
            (m.rmdir if as_dir else m.unlink)(inos[parent.id], name)

        self.apply(model, real)

    @rule(f=PICK, d=PICK, name=NAMES)
    def link(self, f: int, d: int, name: bytes) -> None:
        node = self.pick(f)
        parent = self.pick_dir(d)
        if node is None:
            return

        def model() -> None:
            if node.is_dir:
                raise Fail(errno.EPERM)
            if name in parent.children:
                raise Fail(errno.EEXIST)
            parent.children[name] = node
            node.nlink += 1

        self.apply(model, lambda m, inos: m.link(inos[node.id], inos[parent.id], name))

    @rule(
        e=PICK,
        d1=PICK,
        n1=NAMES,
        d2=PICK,
        n2=NAMES,
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, e: int, d1: int, n1: bytes, d2: int, n2: bytes, flags: int) -> None:
        sp, n1 = self.pick_entry(e, d1, n1)
        dp = self.pick_dir(d2)
        self.apply(
            lambda: self._model_rename(sp, n1, dp, n2, flags),
            lambda m, inos: m.rename(inos[sp.id], n1, inos[dp.id], n2, flags),
        )

    def _model_rename(self, sp: Node, sn: bytes, dp: Node, dn: bytes, flags: int) -> None:
        src = sp.children.get(sn)
        if src is None:
            raise Fail(errno.ENOENT)
        dst = dp.children.get(dn)
        if flags & RENAME_EXCHANGE and dst is None:
            raise Fail(errno.ENOENT)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Fail(errno.EEXIST)
        if (sp, sn) == (dp, dn) or dst is src:
            return
        if sp is not dp:
            if src.is_dir and is_ancestor(src, dp):
                raise Fail(errno.EINVAL)
            if flags & RENAME_EXCHANGE and dst is not None and dst.is_dir and is_ancestor(dst, sp):
                raise Fail(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            assert dst is not None
            sp.children[sn], dp.children[dn] = dst, src
            for node, new_parent, old_parent in ((src, dp, sp), (dst, sp, dp)):
                if node.is_dir:
                    node.parent = new_parent
                    old_parent.nlink -= 1
                    new_parent.nlink += 1
            return
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise Fail(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise Fail(errno.EISDIR)
            if dst.is_dir and dst.children:
                raise Fail(errno.ENOTEMPTY)
            dst.nlink -= 1
            if dst.is_dir:
                dp.nlink -= 1
        del sp.children[sn]
        dp.children[dn] = src
        if src.is_dir:
            src.parent = dp
            sp.nlink -= 1
            dp.nlink += 1

    @rule(f=PICK, off=st.integers(0, 300), length=st.integers(1, 200))
    def write(self, f: int, off: int, length: int) -> None:
        node = self.pick(f, stat.S_IFREG)
        if node is None:
            return
        ext = next(self.next_extent)
        ext_off = ext * 3 % 50

        def model() -> None:
            if len(node.data) < off + length:
                node.data.extend(bytes(off + length - len(node.data)))
            node.data[off : off + length] = bytes(
                extent_byte(ext, ext_off + i) for i in range(length)
            )

        self.apply(
            model,
            lambda m, inos: m.commit_slices(inos[node.id], [NewSlice(off, length, ext, ext_off)]),
        )

    @rule(f=PICK, size=st.integers(0, 400))
    def truncate(self, f: int, size: int) -> None:
        node = self.pick(f)
        if node is None:
            return

        def model() -> None:
            if node.is_dir:
                raise Fail(errno.EISDIR)
            if node.kind != stat.S_IFREG:
                raise Fail(errno.EINVAL)
            del node.data[size:]
            node.data.extend(bytes(size - len(node.data)))

        self.apply(model, lambda m, inos: m.setattr(inos[node.id], size=size))

    @rule(
        f=PICK,
        name=st.sampled_from([b"user.x", b"user.y"]),
        value=st.binary(max_size=3),
        flags=st.sampled_from([0, 1, 2]),
        remove=st.booleans(),
    )
    def xattr(self, f: int, name: bytes, value: bytes, flags: int, remove: bool) -> None:
        node = self.pick(f)
        if node is None:
            return

        def model() -> None:
            if remove:
                if name not in node.xattrs:
                    raise Fail(errno.ENODATA)
                del node.xattrs[name]
                return
            if flags == 1 and name in node.xattrs:
                raise Fail(errno.EEXIST)
            if flags == 2 and name not in node.xattrs:
                raise Fail(errno.ENODATA)
            node.xattrs[name] = value

        def real(m: Meta, inos: dict[int, int]) -> None:
            if remove:
                m.removexattr(inos[node.id], name)
            else:
                m.setxattr(inos[node.id], name, value, flags)

        self.apply(model, real)

    @rule(f=PICK)
    def compact(self, f: int) -> None:
        node = self.pick(f, stat.S_IFREG)
        if node is not None:
            self.apply(lambda: None, lambda m, inos: m.compact(inos[node.id]) and None)

    # --- the trees must agree ------------------------------------------------------------

    @invariant()
    def trees_agree(self) -> None:
        for m, inos in zip(self.metas, self.inos, strict=True):
            for node in self.nodes():
                ino = inos[node.id]
                a = m.getattr(ino)
                assert (a.kind, a.nlink) == (node.kind, node.nlink), (
                    f"{m.engine.dialect.name} node {node.id}"
                )
                assert m.listxattr(ino) == sorted(node.xattrs)
                if node.is_dir:
                    entries = m.readdir(ino)
                    assert [e.name for e in entries] == sorted(node.children)
                    assert [e.ino for e in entries] == [
                        inos[node.children[n].id] for n in sorted(node.children)
                    ]
                    if node is not self.root:
                        assert node.parent is not None and a.parent == inos[node.parent.id]
                elif node.kind == stat.S_IFLNK:
                    assert m.readlink(ino) == node.target
                else:
                    assert a.size == len(node.data)
                    assert render(m.read_map(ino, 0, a.size)) == bytes(node.data)


def test_engines_agree_with_posix_model(
    sqlite_url: str, pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    metas = (open_meta_fn(sqlite_url, dir_mtime_granularity_ns=0), open_meta_fn(pg_url))

    class Machine(NamespaceMachine):
        pass

    Machine.metas = metas
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=40,
            derandomize=True,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    for m in metas:
        assert m.check_invariants() == []


def test_model_catches_a_divergence(
    sqlite_url: str, pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """The comparison is live: an entry that disappears on one side only must be caught."""
    metas = (open_meta_fn(sqlite_url), open_meta_fn(pg_url))

    class Machine(NamespaceMachine):
        @rule()
        def broken(self) -> None:  # forget an entry in the model only
            if self.root.children:
                del self.root.children[min(self.root.children)]

    Machine.metas = metas
    Machine.counter = itertools.count(1000)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=10,
                stateful_step_count=20,
                phases=[Phase.generate],
                derandomize=True,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
