"""appendfs.config.load: precedence of sources and one-line errors that name the key."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest

from appendfs.config import describe, load, option, parse_host_port, positive
from appendfs.errors import ConfigError


@dataclass(frozen=True)
class Demo:
    port: int = option(7100, "port to listen on", positive)
    name: str = option("dn", "a name")
    ratio: float = option(0.5, "a fraction")
    verbose: bool = option(False, "chatty logs")
    data: Path | None = option(None, "data directory")
    peers: tuple[str, ...] = option((), "peer addresses")
    limit: int | None = option(None, "an optional cap", positive)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appendfs.toml"
    path.write_text(text)
    return path


def test_defaults_only(tmp_path: Path) -> None:
    cfg = load(Demo, "demo", environ={})
    assert cfg == Demo()
    with pytest.raises(FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


def test_precedence_default_toml_env_flags(tmp_path: Path) -> None:
    path = toml(tmp_path, '[demo]\nport = 1\nname = "from-toml"\nratio = 0.25\n[other]\nport = 99\n')
    env = {"APPENDFS_DEMO_PORT": "2", "APPENDFS_DEMO_NAME": "from-env", "APPENDFS_OTHER_RATIO": "0.9"}
    flags = {"port": 3, "verbose": None}
    assert load(Demo, "demo", file=path, environ={}) == Demo(port=1, name="from-toml", ratio=0.25)
    assert load(Demo, "demo", file=path, environ=env) == Demo(port=2, name="from-env", ratio=0.25)
    cfg = load(Demo, "demo", file=path, environ=env, flags=flags)
    assert cfg == Demo(port=3, name="from-env", ratio=0.25)  # a None flag means "not given"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(tmp_path, "[demo]\nport = 11\n")
    monkeypatch.setenv("APPENDFS_CONFIG", str(path))
    assert load(Demo, "demo", environ={}).port == 11


def test_environment_strings_are_coerced() -> None:
    env = {"APPENDFS_DEMO_PORT": "0x10", "APPENDFS_DEMO_VERBOSE": "yes", "APPENDFS_DEMO_RATIO": "0.75",
           "APPENDFS_DEMO_DATA": "/tmp/d", "APPENDFS_DEMO_PEERS": "a:1, b:2,", "APPENDFS_DEMO_LIMIT": "1_000"}
    assert load(Demo, "demo", environ=env) == Demo(port=16, verbose=True, ratio=0.75, data=Path("/tmp/d"),
                                                   peers=("a:1", "b:2"), limit=1000)
    assert load(Demo, "demo", environ={"APPENDFS_DEMO_LIMIT": ""}).limit is None
    assert load(Demo, "demo", environ={"APPENDFS_DEMO_VERBOSE": "off"}).verbose is False


def test_toml_values_keep_their_types(tmp_path: Path) -> None:
    path = toml(tmp_path, '[demo]\nverbose = true\npeers = ["x:1", "y:2"]\nlimit = 5\n')
    assert load(Demo, "demo", file=path, environ={}) == Demo(verbose=True, peers=("x:1", "y:2"), limit=5)


def assert_one_line(err: pytest.ExceptionInfo[ConfigError], *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    for word in words:
        assert word in text, text


def test_bad_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, "[demo]\nport = = 3\n")
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=path, environ={})
    assert_one_line(err, str(path), "TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=tmp_path / "nope.toml", environ={})
    assert_one_line(err, "nope.toml")


def test_unknown_key(tmp_path: Path) -> None:
    path = toml(tmp_path, "[demo]\nport = 1\nprot = 2\n")
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=path, environ={})
    assert_one_line(err, "demo.prot")


def test_section_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=toml(tmp_path, "demo = 3\n"), environ={})
    assert_one_line(err, "[demo]")


@pytest.mark.parametrize(("body", "key"), [
    ('port = "many"', "demo.port"),
    ("port = 3.7", "demo.port"),  # never silently truncated
    ("port = true", "demo.port"),
    ("name = 5", "demo.name"),
    ("ratio = true", "demo.ratio"),
    ('ratio = "half"', "demo.ratio"),
    ('verbose = "maybe"', "demo.verbose"),
    ("verbose = 2", "demo.verbose"),
    ("data = 5", "demo.data"),
    ("peers = 5", "demo.peers"),
    ("peers = [1, 2]", "demo.peers"),
    ('limit = "lots"', "demo.limit"),
])
def test_wrong_type_in_toml(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=toml(tmp_path, f"[demo]\n{body}\n"), environ={})
    assert_one_line(err, key, "config file")


@pytest.mark.parametrize(("name", "value"), [("PORT", "seven"), ("PORT", "7.5"), ("VERBOSE", "maybe"),
                                             ("RATIO", "x"), ("LIMIT", "1e3")])
def test_wrong_type_in_environment(name: str, value: str) -> None:
    key = f"APPENDFS_DEMO_{name}"
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", environ={key: value})
    assert_one_line(err, f"demo.{name.lower()}", key)


def test_failing_check_names_key_and_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", file=toml(tmp_path, "[demo]\nport = 0\n"), environ={})
    assert_one_line(err, "demo.port", "must be > 0", "config file")
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", environ={"APPENDFS_DEMO_LIMIT": "-4"})
    assert_one_line(err, "demo.limit", "APPENDFS_DEMO_LIMIT")
    with pytest.raises(ConfigError) as err:
        load(Demo, "demo", environ={}, flags={"port": -1})
    assert_one_line(err, "demo.port", "--port")


def test_describe_lists_every_key_with_its_doc() -> None:
    rows = describe(Demo)
    assert [r[0] for r in rows] == ["port", "name", "ratio", "verbose", "data", "peers", "limit"]
    assert all(doc for _, _, doc in rows)


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1:7100", ("127.0.0.1", 7100)),
                                                ("[::1]:80", ("::1", 80)), ("host:0", ("host", 0))])
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["host", ":80", "host:", "host:x", "host:65536", "host:-1"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_a_stray_environment_key_of_the_section_is_refused() -> None:
    """A typo such as APPENDFS_DEMO_PORTT must not be silently ignored."""
    with pytest.raises(ConfigError, match="APPENDFS_DEMO_PORTT"):
        load(Demo, "demo", environ={"APPENDFS_DEMO_PORTT": "1"})


def test_decimal_with_a_leading_zero_from_the_environment() -> None:
    assert load(Demo, "demo", environ={"APPENDFS_DEMO_PORT": "010"}).port == 10
