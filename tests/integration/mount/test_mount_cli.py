"""The mount as users start it: `appendfs mount` (daemon and foreground), mount.appendfs
from fstab-style arguments, `appendfs up --mount`, and the clear refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster import APPENDFS, Cluster, free_port, running_up, scrape, wait_for, wait_gone
from mounts import Mount, fuse_available
from s3gw import Key, boto3_client

from appendfs.mount.helper import build_argv
from appendfs.mount.main import MountError, preflight


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    reason = fuse_available()
    if reason:
        print(f"SKIP REASON: {reason}")
        pytest.skip(reason)


def _run(cluster: Cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPENDFS, *args], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def _unmount_and_wait(path: Path, pid_hint: str = "") -> None:
    subprocess.run(["umount", str(path)], check=True, capture_output=True)
    wait_for(lambda: not os.path.ismount(path), f"{path} to be unmounted", 30)


def test_daemon_mount_returns_once_mounted_and_exits_on_umount(make_cluster: object, sqlite_url: str,
                                                              tmp_path: Path) -> None:
    cluster: Cluster = make_cluster(sqlite_url)  # type: ignore[operator]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    res = _run(cluster, "mount", "--meta", sqlite_url, "--log-file", str(log), str(mnt))
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(mnt), "the parent returned before the mount was up"
    (mnt / "f").write_bytes(b"daemon")
    assert (mnt / "f").read_bytes() == b"daemon"
    pid = int(res.stderr.split("pid ")[1].split(";")[0])
    _unmount_and_wait(mnt)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the daemon to exit after umount", 60)
    assert "mounted" in log.read_text()


def test_busy_missing_and_dead_mountpoints_get_one_clear_line(make_cluster: object, make_mount: object,
                                                             sqlite_url: str, tmp_path: Path) -> None:
    cluster: Cluster = make_cluster(sqlite_url)  # type: ignore[operator]
    res = _run(cluster, "mount", "--meta", sqlite_url, "-f", str(tmp_path / "nope"))
    assert res.returncode != 0 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    m: Mount = make_mount(cluster)  # type: ignore[operator]
    res = _run(cluster, "mount", "--meta", sqlite_url, "-f", str(m.path))
    assert res.returncode != 0 and "busy" in res.stderr and "Traceback" not in res.stderr
    os.stat(m.path)  # the kernel caches the root's attributes (attr TTL 1 s)...
    m.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    m.popen.wait()  # type: ignore[union-attr]
    with pytest.raises(MountError, match="dead FUSE mount"):
        preflight(m.path)  # ...and may still answer stat from them: a dead mount is not "busy"
    res = _run(cluster, "mount", "--meta", sqlite_url, "-f", str(m.path))
    assert res.returncode != 0 and "dead FUSE mount" in res.stderr and "fusermount3 -u" in res.stderr
    m.detach()
    m.start()  # after the advised cleanup the same directory mounts again
    assert (m.path / "x").write_bytes(b"1") == 1


def test_unknown_mount_option_is_refused_with_exit_2(make_cluster: object, sqlite_url: str, tmp_path: Path) -> None:
    cluster: Cluster = make_cluster(sqlite_url, datanodes=0)  # type: ignore[operator]
    (tmp_path / "m").mkdir()
    res = _run(cluster, "mount", "--meta", sqlite_url, "-o", "bogus_opt", "-f", str(tmp_path / "m"))
    assert res.returncode == 2 and "bogus_opt" in res.stderr


def test_mount_helper_translates_fstab_arguments() -> None:
    assert build_argv(["sqlite:////d/meta.db", "/mnt/x", "-o", "rw,_netdev,allow_other,log=/l,config=/c"]) == [
        "mount", "--meta", "sqlite:////d/meta.db", "--log-file", "/l", "--config", "/c", "-o", "rw,_netdev,allow_other",
        "/mnt/x"]
    assert build_argv(["-s", "url", "/m", "-n"])[-1] == "/m"
    with pytest.raises(ValueError):
        build_argv(["only-one"])


def test_mount_helper_mounts_like_mount8_calls_it(make_cluster: object, sqlite_url: str, tmp_path: Path) -> None:
    cluster: Cluster = make_cluster(sqlite_url)  # type: ignore[operator]
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    helper = Path(APPENDFS[0]).parent / "mount.appendfs"
    res = subprocess.run([str(helper), sqlite_url, str(mnt), "-o", f"rw,_netdev,noatime,log={tmp_path}/h.log"],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        assert os.path.ismount(mnt)
        (mnt / "via-fstab").write_bytes(b"ok")
        assert (mnt / "via-fstab").read_bytes() == b"ok"
        assert "noatime" in Path("/proc/mounts").read_text().split(str(mnt))[1].splitlines()[0]
    finally:
        _unmount_and_wait(mnt)


def test_up_with_mount_and_s3_serves_files_and_stops_cleanly(tmp_path: Path) -> None:
    data, mnt = tmp_path / "up", tmp_path / "mnt"
    port = free_port()
    with running_up("--data", str(data), "--mount", str(mnt), "--s3", f"127.0.0.1:{port}"):
        assert os.path.ismount(mnt)
        (mnt / "docs").mkdir()
        (mnt / "docs" / "hello").write_bytes(b"hi" * 100_000)
        assert (mnt / "docs" / "hello").read_bytes() == b"hi" * 100_000
        run_info = json.loads((data / "run.json").read_text())
        assert run_info["mount"] == str(mnt) and "mount" in run_info["pids"]
        assert run_info["s3"] == f"127.0.0.1:{port}" and "s3" in run_info["pids"]
        # the key pair `up` printed (and keeps in DIR/s3-credentials) works at once
        creds = dict(line.split(" = ") for line in (data / "s3-credentials").read_text().splitlines() if " = " in line)
        s3 = boto3_client(f"http://127.0.0.1:{port}", Key(creds["aws_access_key_id"], creds["aws_secret_access_key"],
                                                           "default"))
        s3.create_bucket(Bucket="arch")
        s3.put_object(Bucket="arch", Key="via/s3", Body=b"object")
        wait_for(lambda: (mnt / "arch" / "via" / "s3").exists(), "the object in the mount", 10, 0.2)
        assert (mnt / "arch" / "via" / "s3").read_bytes() == b"object"
        # every daemon serves Prometheus metrics on the port run.json names, and they move
        metrics = run_info["metrics"]
        assert set(metrics) == {"metanode", "datanode-1", "datanode-2", "datanode-3", "mount", "s3"}
        samples = {name: scrape(int(address.rsplit(":", 1)[1])) for name, address in metrics.items()}
        assert samples["metanode"]["appendfs_metanode_leader"] == 1.0
        assert sum(samples[f"datanode-{i}"]["appendfs_datanode_append_bytes"] for i in (1, 2, 3)) >= 200_000
        assert any(k.startswith("appendfs_mount_fuse_request_seconds_count") and 'op="create"' in k and v >= 1
                   for k, v in samples["mount"].items())
        assert any(k.startswith("appendfs_s3_") and v > 0 for k, v in samples["s3"].items())
    assert not os.path.ismount(mnt)
    wait_gone(run_info["pids"].values(), "every child of `up` to exit")


def test_a_second_signal_does_not_cut_the_shutdown_short(make_cluster: object, make_mount: object,
                                                         sqlite_url: str) -> None:
    """An impatient second SIGTERM (or Ctrl-C) while the mount stops is logged, not obeyed:
    the buffered data of a file still open is committed, and the mount exits 0. (The old
    mount restored the default action after the first signal: the second killed it in the
    middle of its shutdown and the buffered bytes were lost.)"""
    cluster: Cluster = make_cluster(sqlite_url)  # type: ignore[operator]
    m: Mount = make_mount(cluster)  # type: ignore[operator]
    assert m.popen is not None
    data = os.urandom(6 << 20)
    fd = os.open(m.path / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # not closed: the shutdown commits what is buffered
        m.popen.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        m.popen.send_signal(signal.SIGTERM)
        code = m.popen.wait(60)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    assert code == 0, m.text()[-2000:]
    assert "already stopping" in m.text()
    again: Mount = make_mount(cluster)  # type: ignore[operator]
    assert (again.path / "open").read_bytes() == data
