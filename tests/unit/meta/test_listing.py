"""S3 key-order listing against a brute-force model over random in-memory trees."""

from __future__ import annotations

import stat
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.meta.listing import Entry, list_page

# Bytes around '/' (0x2f) make the name-order vs key-order difference show up often.
NAME = (
    st.lists(st.sampled_from(b"!-./0a"), min_size=1, max_size=3)
    .map(bytes)
    .filter(lambda n: b"/" not in n and n not in (b".", b".."))
)


class Tree:
    """An in-memory directory tree implementing listing.Source."""

    def __init__(self) -> None:
        self.dirs: dict[int, dict[bytes, Entry]] = {1: {}}
        self.next_ino = 2

    def add(self, parent: int, name: bytes, is_dir: bool) -> int:
        if name in self.dirs[parent]:
            e = self.dirs[parent][name]
            return e.ino if e.is_dir == is_dir else -1
        ino = self.next_ino
        self.next_ino += 1
        self.dirs[parent][name] = Entry(
            name, ino, stat.S_IFDIR if is_dir else stat.S_IFREG, ino * 10, ino
        )
        if is_dir:
            self.dirs[ino] = {}
        return ino

    def page(self, dir_ino: int, lo: bytes, inclusive: bool, limit: int) -> Sequence[Entry]:
        names = sorted(n for n in self.dirs[dir_ino] if (n >= lo if inclusive else n > lo))
        return [self.dirs[dir_ino][n] for n in names[:limit]]

    def named(self, dir_ino: int, names: Sequence[bytes]) -> Sequence[Entry]:
        return [self.dirs[dir_ino][n] for n in names if n in self.dirs[dir_ino]]

    def keys(self, ino: int = 1, base: bytes = b"") -> list[bytes]:
        out = []
        for name, e in self.dirs[ino].items():
            out += self.keys(e.ino, base + name + b"/") if e.is_dir else [base + name]
        return out


def brute(
    keys: list[bytes], prefix: bytes, delimiter: bytes | None, start_after: bytes | None
) -> list[tuple[bytes, bool]]:
    out: list[tuple[bytes, bool]] = []
    seen: set[bytes] = set()
    for k in sorted(keys):
        if not k.startswith(prefix) or (start_after is not None and k <= start_after):
            continue
        rest = k[len(prefix) :]
        if delimiter and delimiter in rest:
            cp = prefix + rest[: rest.index(delimiter) + len(delimiter)]
            if cp not in seen and cp != start_after:
                seen.add(cp)
                out.append((cp, True))
        else:
            out.append((k, False))
    return out


paths = st.lists(st.lists(NAME, min_size=1, max_size=4), max_size=30)


def build(path_list: list[list[bytes]]) -> Tree:
    t = Tree()
    for comps in path_list:
        cur = 1
        for c in comps[:-1]:
            cur = t.add(cur, c, True)
            if cur < 0:
                break
        else:
            t.add(cur, comps[-1], False)
    return t


@settings(max_examples=500, derandomize=True)
@given(
    paths,
    st.sampled_from([b"", b"a", b"a/", b"0", b"!", b"a!/", b"a/a"]),
    st.sampled_from([None, b"/", b"-", b"a"]),
    st.one_of(st.none(), st.lists(st.sampled_from(b"!-./0a"), max_size=5).map(bytes)),
    st.integers(1, 7),
)
def test_pages_match_brute_force(
    path_list: list[list[bytes]],
    prefix: bytes,
    delimiter: bytes | None,
    start_after: bytes | None,
    max_keys: int,
) -> None:
    t = build(path_list)
    want = brute(t.keys(), prefix, delimiter, start_after)
    got: list[tuple[bytes, bool]] = []
    after = start_after
    for _ in range(200):
        page = list_page(t, 1, prefix, delimiter, after, max_keys)
        items = sorted(
            [(o.key, False) for o in page.objects] + [(p, True) for p in page.common_prefixes]
        )
        assert len(items) <= max_keys
        got += items
        if not page.is_truncated:
            break
        assert page.next_start_after == items[-1][0]
        after = page.next_start_after
    assert got == want


def test_file_sorts_between_dir_name_and_its_keys() -> None:
    t = build([[b"a", b"x"], [b"a.txt"], [b"a0"]])
    page = list_page(t, 1, b"", None, None, 10)
    assert [o.key for o in page.objects] == [b"a.txt", b"a/x", b"a0"]
    page = list_page(t, 1, b"", b"/", None, 10)
    assert [o.key for o in page.objects] == [b"a.txt", b"a0"] and page.common_prefixes == [b"a/"]
