"""The gateway's worker processes (`[s3] workers`, s3/server.py): a supervisor binds the
socket once and runs N workers that accept from it; a killed worker is replaced while the
others keep serving; /metrics is the sum over the workers; SIGTERM stops them all; a
worker that cannot start stops the gateway with the worker's clear error."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from cluster import APPENDFS, free_port, scrape, wait_for
from s3gw import S3Env, S3Gateway


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (any of its threads may have started them)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except FileNotFoundError:
            continue
    return {c for c in out if Path(f"/proc/{c}/stat").exists()
            and Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}


def metric(port: int, name: str) -> float | None:
    return scrape(port).get(name)


# The supervisor does not touch the namespace: one engine is enough (the suite's time budget).
@pytest.mark.parametrize("s3env", ["sqlite"], indirect=True)
def test_workers_serve_one_socket_and_a_killed_worker_is_replaced(s3env: S3Env, bucket: str) -> None:
    metrics = free_port()
    gw = S3Gateway(s3env.cluster, "s3-workers", env={"APPENDFS_S3_WORKERS": "3",
                                                      "APPENDFS_S3_METRICS": f"127.0.0.1:{metrics}"}).start()
    try:
        assert gw.proc.popen is not None
        supervisor = gw.proc.popen.pid
        wait_for(lambda: metric(metrics, "appendfs_s3_workers") == 3, "3 workers running")
        def three(exclude: int = 0) -> set[int] | None:
            c = children(supervisor)
            return c if len(c) == 3 and exclude not in c else None
        workers = wait_for(three, "3 worker processes")

        s3 = gw.client(s3env.key)
        for i in range(12):  # a fresh client each time: new connections, spread by the kernel
            gw.client(s3env.key).put_object(Bucket=bucket, Key=f"w/{i}", Body=f"object {i}".encode())
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        # the others keep serving while the supervisor starts a replacement
        for i in range(12):
            assert gw.client(s3env.key).get_object(Bucket=bucket, Key=f"w/{i}")["Body"].read() == \
                f"object {i}".encode()
        replaced = wait_for(lambda: three(exclude=victim), "a replacement for the killed worker", timeout_s=60)
        assert len(replaced & workers) == 2
        assert "starting it again" in gw.text()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="w/")["Contents"]]
        assert sorted(keys) == sorted(f"w/{i}" for i in range(12))
        wait_for(lambda: metric(metrics, "appendfs_s3_workers") == 3, "3 workers running again")
        wait_for(lambda: (metric(metrics, "appendfs_s3_requests") or 0) >= 1, "requests counted in /metrics")

        gw.proc.popen.send_signal(signal.SIGTERM)
        assert gw.proc.popen.wait(timeout=60) == 0
        for pid in replaced:
            wait_for(lambda p=pid: not Path(f"/proc/{p}").exists() or
                     Path(f"/proc/{p}/stat").read_text().split()[2] == "Z", f"worker {pid} to exit")
    finally:
        gw.stop()


@pytest.mark.parametrize("s3env", ["sqlite"], indirect=True)
def test_what_every_worker_needs_is_checked_once_with_one_clear_line(tmp_path: Path, s3env: S3Env) -> None:
    """A database that cannot be opened, a TLS certificate that cannot be loaded: the
    supervisor says so in one line (no traceback) and exits before starting workers."""
    port = f"127.0.0.1:{free_port()}"
    cases = [
        (["--meta", f"sqlite:///{tmp_path}/missing/meta.db", "--listen", port], "cannot open the namespace database", 1),
        (["--meta", s3env.cluster.meta_url, "--listen", port, "--tls-cert-file", str(tmp_path / "no.pem"),
          "--tls-key-file", str(tmp_path / "no.key")], "cannot load the TLS certificate", 2),
    ]
    for args, message, code in cases:
        for workers in ("1", "2"):
            out = subprocess.run([*APPENDFS, "s3", *args, "--workers", workers], capture_output=True, timeout=120,
                                 stdin=subprocess.DEVNULL, env=s3env.cluster.env)
            text = out.stderr.decode()
            assert out.returncode == code, text
            assert message in text and "Traceback" not in text and "S3 worker" not in text, text
