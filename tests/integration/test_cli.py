"""The `appendfs` command as users meet it: clear one-line errors, exit codes, `format`, `up`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from cluster import files_equal, random_file, running_up, wait_gone

APPENDFS = [sys.executable, "-m", "appendfs"]


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPENDFS, *args], capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload, no-any-return]


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("appendfs: error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["datanode", "--listen", "nonsense", "--metanode", "127.0.0.1:1"], "datanode.listen"),
    (["datanode", "--listen", "127.0.0.1:1", "--high-water", "1.5", "--metanode", "127.0.0.1:1"], "datanode.high_water"),
    (["datanode", "--listen", "127.0.0.1:1"], "at least one MetaNode"),
    (["datanode", "--metanode", "127.0.0.1:1", "--secret-file", "/nonexistent/secret"], "does not exist"),
    (["store", "put", "--meta", "sqlite:////tmp/x.db", "--redundancy", "rep:0", "/etc/hostname"], "--redundancy"),
    (["store", "get", "--meta", "sqlite:////tmp/x.db", "not-a-locator"], "not an appendfs locator"),
    (["metanode", "--meta", "mysql://x/y"], "unsupported database"),
    (["stats", "-n", "1"], "--metrics HOST:PORT"),
    (["stats", "--data", "/nonexistent/up", "-n", "1"], "is `appendfs up --data /nonexistent/up` running"),
])
def test_bad_input_prints_one_line_and_exits_2(args: list[str], says: str) -> None:
    assert says in one_line_error(run(*args))


def test_stats_says_when_nothing_serves_mount_metrics_there(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"metrics": {"metanode": "127.0.0.1:1"}}))
    assert "names no mount" in one_line_error(run("stats", "--data", str(tmp_path), "-n", "1"))
    assert "Connection refused" in one_line_error(run("stats", "--metrics", "127.0.0.1:1", "-n", "1"), code=1)


def test_a_bad_config_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[datanode]\nlisten = 'x:1'\nbogus = 1\n")
    assert "unknown key datanode.bogus" in one_line_error(run("datanode", "--config", str(cfg)))
    cfg.write_text("[datanode\n")
    assert "not valid TOML" in one_line_error(run("datanode", "--config", str(cfg)))
    cfg.write_text("[datanode]\nmetanode = ['127.0.0.1:1']\nheartbeat_interval_s = 'soon'\n")
    assert "datanode.heartbeat_interval_s" in one_line_error(run("datanode", "--config", str(cfg)))


def test_an_unformatted_database_says_what_to_do(meta_url: str) -> None:
    assert "appendfs format" in one_line_error(run("metanode", "--meta", meta_url, "--listen", "127.0.0.1:0"))


def test_format_is_idempotent_and_a_schema_of_another_version_is_refused(meta_url: str, tmp_path: Path) -> None:
    first = run("format", meta_url, "--secret-file", str(tmp_path / "s1"))
    assert first.returncode == 0 and first.stdout.startswith("formatted: cluster")
    again = run("format", meta_url, "--secret-file", str(tmp_path / "s2"))
    assert again.returncode == 0 and again.stdout.startswith("already formatted")
    assert json.loads((tmp_path / "s1").read_text()) == json.loads((tmp_path / "s2").read_text())
    eng = sa.create_engine(meta_url)
    with eng.begin() as c:
        c.execute(sa.text("UPDATE store_schema SET version = 99"))
    eng.dispose()
    line = one_line_error(run("metanode", "--meta", meta_url, "--listen", "127.0.0.1:0"))
    assert "we speak version 3" in line and "version 99" in line


def test_format_upgrades_a_version_1_cluster_schema(sqlite_url: str, tmp_path: Path) -> None:
    """Cluster schema v2 added the EC columns, v3 the extents' local ids; `format` upgrades
    a v1 database in place."""
    from appendfs.store.metanode import schema

    eng = sa.create_engine(sqlite_url)
    v1 = sa.MetaData()
    for t in schema.md.sorted_tables:
        sa.Table(t.name, v1, *[c._copy() for c in t.columns if not c.name.startswith("ec_") and c.name != "local_id"])
    v1.create_all(eng)
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO store_schema (id, version) VALUES (1, 1)"))
        c.execute(sa.text("INSERT INTO store_counter (name, next_value) VALUES ('stream', 1), ('extent', 1)"))
    assert "we speak version 3, it has version 1" in one_line_error(
        run("metanode", "--meta", sqlite_url, "--listen", "127.0.0.1:0"))
    assert run("format", sqlite_url, "--secret-file", str(tmp_path / "s")).returncode == 0
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT version FROM store_schema")).scalar_one() == 3
        c.execute(sa.text("SELECT ec_backend, ec_cell_bytes FROM stream")).all()
        c.execute(sa.text("SELECT ec_backend, ec_cell_bytes, local_id FROM extent")).all()
    eng.dispose()


def test_up_refuses_a_bad_s3_address(tmp_path: Path) -> None:
    assert "is not HOST:PORT" in one_line_error(run("up", "--data", str(tmp_path), "--s3", "9000"))


def test_s3_commands_refuse_bad_input(tmp_path: Path, sqlite_url: str) -> None:
    assert "--meta" in one_line_error(run("s3", "--listen", "127.0.0.1:9000"))
    run("format", sqlite_url, "--secret-file", str(tmp_path / "secret"))
    line = one_line_error(run("s3", "keys", "create", "--meta", sqlite_url, "--file-mode", "0999"))
    assert "octal" in line
    line = one_line_error(run("s3", "keys", "create", "--meta", sqlite_url, "--tenant", "bad tenant!"))
    assert "tenant" in line
    line = one_line_error(run("s3", "--meta", sqlite_url, "--listen", "127.0.0.1:1", "--tls-cert-file", "x.pem"))
    assert "tls_cert_file and tls_key_file go together" in line


def test_up_runs_a_whole_cluster_and_stops_it(tmp_path: Path) -> None:
    data = tmp_path / "up"
    with running_up("--data", str(data)):
        run_info = json.loads((data / "run.json").read_text())
        meta = run_info["meta_url"]
        st = json.loads(run("status", "--meta", meta, "--json").stdout)
        assert sum(n["alive"] for n in st["nodes"]) == 3
        src = random_file(tmp_path / "f.bin", 3 << 20, seed=41)
        put = run("store", "put", "--meta", meta, str(src))
        assert put.returncode == 0
        out = tmp_path / "out.bin"
        with open(out, "wb") as f:
            assert subprocess.run([*APPENDFS, "store", "get", "--meta", meta, put.stdout.strip().splitlines()[-1]],
                                  stdout=f, timeout=120).returncode == 0
        assert files_equal(src, out)
    wait_gone(run_info["pids"].values(), "every child of `up` to exit")
    assert {p.name for p in (data / "logs").iterdir()} == {"metanode.log", "datanode-1.log", "datanode-2.log",
                                                           "datanode-3.log"}


def test_daemons_run_with_huge_pages_unless_the_user_chose_otherwise(make_cluster, sqlite_url: str,
                                                                      tmp_path: Path) -> None:
    """The daemons' data buffers sit in transparent huge pages (appendfs/runtime.py): the
    command re-executes itself with glibc's tunable, in the same process (same pid), and
    leaves a GLIBC_TUNABLES that names the tunable as the user set it."""
    from appendfs.runtime import with_huge_pages

    if with_huge_pages({}) is None:
        pytest.skip("no glibc or no transparent huge pages here: daemons start as they are")

    def tunables(pid: int) -> list[bytes]:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return [v for v in env if v.startswith(b"GLIBC_TUNABLES=")]
    c = make_cluster(sqlite_url, datanodes=1)
    for proc in (*c.metanodes, *c.datanodes):
        assert proc.alive and tunables(proc.popen.pid) == [b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1"], proc.name
    other = make_cluster(f"sqlite:///{tmp_path / 'other.db'}", datanodes=1,
                         env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    for proc in (*other.metanodes, *other.datanodes):
        assert proc.alive and tunables(proc.popen.pid) == [b"GLIBC_TUNABLES=glibc.malloc.hugetlb=0"], proc.name

