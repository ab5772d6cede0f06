"""Probe: misbehaving peers get their connection closed and a log line; everyone else is served.

Each bad peer talks to a real DataNode over TCP: random bytes, an oversized length, a
wrong version, a wrong cluster secret, a half-sent frame then disconnect. Meanwhile and
afterwards a real client keeps putting and getting data.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster, files_equal, random_file, wait_for

from appendfs.store.wire import Connection, Role
from appendfs.store.wire.protocol import NEED_DATA, Hello

MiB = 1 << 20


def _address(proc) -> tuple[str, int]:
    host, port = proc.argv[proc.argv.index("--listen") + 1].rsplit(":", 1)
    return host, int(port)


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.settimeout(10)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _read_hello(s: socket.socket, conn: Connection) -> Hello:
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            assert isinstance(ev, Hello)
            return ev
        conn.receive_data(s.recv(65536))


def _frame(version: int = 1, kind: int = 2, hlen: int = 0, dlen: int = 0) -> bytes:
    return struct.pack(">2sBBIII", b"AF", version, kind, 0, hlen, dlen)


def _random_bytes(s: socket.socket) -> None:
    s.sendall(random.Random(7).randbytes(4096))


def _oversized(s: socket.socket) -> None:
    s.sendall(_frame(dlen=2**31))


def _wrong_version(s: socket.socket) -> None:
    s.sendall(_frame(version=99, hlen=1) + b"\x80")


def _half_frame(s: socket.socket) -> None:
    s.sendall(_frame(hlen=100)[:16] + b"\x81\xa2")
    s.shutdown(socket.SHUT_WR)


BAD_PEERS = {
    "random bytes": (_random_bytes, "bad magic"),
    "oversized length": (_oversized, "exceeds"),
    "wrong version": (_wrong_version, "we speak version 1, peer speaks version 99"),
    "half frame then disconnect": (_half_frame, "in the middle of a frame"),
}


@pytest.fixture(scope="module")
def cluster_with_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path, str]]:
    """One cluster for the whole module (the suite's time budget): every test checks that
    the DataNodes still serve everyone, and each looks for a log line of its own."""
    root = tmp_path_factory.mktemp("bad-peers")
    c = Cluster(root / "cluster", f"sqlite:///{root}/meta.db")
    try:
        c.add_metanode()
        for _ in range(3):
            c.add_datanode()
        c.wait_alive(3)
        src = random_file(root / "src.bin", 8 * MiB, seed=21)
        yield c, src, c.put(src)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.mark.parametrize("name", sorted(BAD_PEERS))
def test_bad_peer_is_disconnected_and_logged(cluster_with_data, name: str, tmp_path: Path) -> None:
    c, src, locator = cluster_with_data
    node = c.datanodes[0]
    behave, log_text = BAD_PEERS[name]
    with _connect(_address(node)) as s:
        s.recv(65536)  # the server's HELLO
        behave(s)
        assert _closed_by_peer(s), f"{name}: the DataNode kept the connection open"
    wait_for(lambda: log_text in node.text(), f"a log line about {name!r}", 10)
    assert node.alive
    out = tmp_path / "out.bin"
    assert c.get(locator, out).returncode == 0 and files_equal(src, out)


def test_wrong_cluster_secret_is_refused(cluster_with_data, tmp_path: Path) -> None:
    c, src, locator = cluster_with_data
    node = c.datanodes[0]
    with _connect(_address(node)) as s:
        probe = Connection(Role.CLIENT, cluster_id="x", secret=b"y", nonce=os.urandom(32))
        hello = _read_hello(s, probe)
        bad = Connection(Role.CLIENT, cluster_id=hello.cluster_id, secret=b"not the secret", nonce=os.urandom(32))
        bad.receive_data(_frame_bytes_of_hello(hello))
        bad.next_event()
        s.sendall(b"".join(bad.auth()))
        assert _closed_by_peer(s)
    wait_for(lambda: "wrong cluster secret" in node.text(), "a log line about the wrong secret", 10)
    # and requests without authentication are never answered
    with _connect(_address(node)) as s:
        s.recv(65536)
        s.sendall(_frame(kind=4, hlen=1) + b"\x80")
        assert _closed_by_peer(s)
    out = tmp_path / "out.bin"
    assert c.get(locator, out).returncode == 0 and files_equal(src, out)


def _frame_bytes_of_hello(hello: Hello) -> bytes:
    server = Connection(Role.SERVER, cluster_id=hello.cluster_id, secret=b"-", nonce=hello.nonce)
    return b"".join(server.hello())


def test_good_clients_are_served_during_a_burst_of_bad_peers(cluster_with_data, tmp_path: Path) -> None:
    """2,000 garbage connections at a few hundred per second while a client works."""
    c, src, locator = cluster_with_data
    addrs = [_address(n) for n in c.datanodes]
    budget = 2000
    attacks = [0]
    lock = threading.Lock()

    def attack(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                if attacks[0] >= budget:
                    return
                attacks[0] += 1
            try:
                with socket.create_connection(rng.choice(addrs), timeout=5) as s:
                    s.sendall(rng.randbytes(rng.randrange(1, 200)))
            except OSError:
                pass
            time.sleep(0.004)

    threads = [threading.Thread(target=attack, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    served = 0
    try:
        while any(t.is_alive() for t in threads) or served < 2:
            out = tmp_path / f"out{served}.bin"
            assert c.get(locator, out).returncode == 0 and files_equal(src, out)
            served += 1
        src2 = random_file(tmp_path / "src2.bin", 4 * MiB, seed=22)
        loc2 = c.put(src2)
    finally:
        attacks[0] = budget
        for t in threads:
            t.join()
    out = tmp_path / "out2.bin"
    assert c.get(loc2, out).returncode == 0 and files_equal(src2, out)
    assert all(n.alive for n in c.datanodes)
