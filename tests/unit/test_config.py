"""Settings and where they come from (broker/config.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.config import ConfigError, Settings, load_settings
from broker.subscription import OverflowPolicy

WriteToml = Callable[[str], str]  # TOML text -> path of a file holding it


@pytest.fixture
def toml(tmp_path: Path) -> WriteToml:
    def write(text: str) -> str:
        path = tmp_path / "broker.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults_are_valid_and_documented_values() -> None:
    settings = Settings()
    assert settings == load_settings(environ={})
    assert settings.heartbeat_seconds == 15.0
    assert settings.buffer_bytes == 1024 * 1024
    assert settings.overflow_policy is OverflowPolicy.CATCHUP
    assert settings.dedupe_window_seconds == 120.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_replace_validates_too() -> None:
    assert Settings().replace(port=0).port == 0  # 0: pick a free port
    with pytest.raises(ConfigError, match="buffer_events"):
        Settings().replace(buffer_events=0)


def test_file_then_env_then_overrides(toml: WriteToml) -> None:
    path = toml(
        """
        port = 9001
        buffer_events = 11
        heartbeat_seconds = 5
        overflow_policy = "drop"
        log_level = "debug"
        """
    )
    environ = {"BROKER_BUFFER_EVENTS": "22", "BROKER_HEARTBEAT_SECONDS": "2.5"}
    overrides = {"heartbeat_seconds": "1.5", "host": None}  # None: the flag was not given
    settings = load_settings(config_file=path, environ=environ, overrides=overrides)
    assert settings.port == 9001  # file only
    assert settings.overflow_policy is OverflowPolicy.DROP
    assert settings.log_level == "debug"
    assert settings.buffer_events == 22  # env beats file
    assert settings.heartbeat_seconds == 1.5  # override beats env and file
    assert settings.host == "127.0.0.1"  # a None override leaves the default


def test_config_file_named_by_the_environment(toml: WriteToml) -> None:
    path = toml("port = 9002\n")
    assert load_settings(environ={"BROKER_CONFIG": path}).port == 9002


def test_broker_table(toml: WriteToml) -> None:
    path = toml('[broker]\nport = 9003\noverflow_policy = "DISCONNECT"\n')
    settings = load_settings(config_file=path, environ={})
    assert settings.port == 9003
    assert settings.overflow_policy is OverflowPolicy.DISCONNECT


def test_top_level_keys_beside_a_broker_table_are_not_silently_ignored(toml: WriteToml) -> None:
    path = toml('port = 9004\n[broker]\nhost = "0.0.0.0"\n')
    try:
        settings = load_settings(config_file=path, environ={})
    except ConfigError:
        return  # refusing the ambiguous file is fine
    assert (settings.host, settings.port) == ("0.0.0.0", 9004)  # so is honouring both


def test_types_are_converted_from_strings() -> None:
    settings = load_settings(
        environ={
            "BROKER_PORT": "0",
            "BROKER_RETENTION_SECONDS": "60",
            "BROKER_OVERFLOW_POLICY": "Drop",
            "BROKER_HOST": "::1",
        }
    )
    assert (settings.port, settings.retention_seconds) == (0, 60.0)
    assert isinstance(settings.retention_seconds, float)
    assert settings.overflow_policy is OverflowPolicy.DROP
    assert settings.host == "::1"


def test_whole_floats_are_accepted_for_integers(toml: WriteToml) -> None:
    settings = load_settings(config_file=toml("buffer_events = 3.0\n"), environ={})
    assert settings.buffer_events == 3
    assert isinstance(settings.buffer_events, int)


def test_unknown_key_in_file(toml: WriteToml) -> None:
    with pytest.raises(ConfigError, match="buffer_event"):
        load_settings(config_file=toml("buffer_event = 5\n"), environ={})
    with pytest.raises(ConfigError, match="nope"):
        load_settings(config_file=toml("[broker]\nnope = 1\n"), environ={})


def test_unreadable_or_malformed_file(tmp_path: Path, toml: WriteToml) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_file=str(tmp_path / "missing.toml"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_file=toml("port = = 3\n"), environ={})


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("port", "-1"),
        ("buffer_events", "-5"),
        ("buffer_events", "0"),
        ("heartbeat_seconds", "-0.5"),
        ("heartbeat_seconds", "0"),
        ("retention_bytes", "many"),
        ("heartbeat_seconds", "soon"),
        ("buffer_events", "1.5"),
        ("buffer_events", ""),
        ("overflow_policy", "block"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
    ],
)
def test_bad_value_from_env_or_overrides_is_a_config_error(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(environ={"BROKER_" + key.upper(): raw})
    with pytest.raises(ConfigError, match=key):
        load_settings(environ={}, overrides={key: raw})


@pytest.mark.parametrize(
    "line",
    [
        "buffer_events = -3",
        "buffer_events = 2.5",
        'buffer_events = "lots"',
        "retention_seconds = -1.0",
        'overflow_policy = "block"',
        "overflow_policy = 3",
    ],
)
def test_bad_value_in_file_is_a_config_error(toml: WriteToml, line: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(config_file=toml(line + "\n"), environ={})


@pytest.mark.parametrize(
    "line",
    [
        "buffer_events = [1, 2]",
        "buffer_events = { n = 1 }",
        "retention_seconds = 1979-05-27",
        "buffer_events = true",
        "heartbeat_seconds = false",
    ],
)
def test_non_number_toml_value_is_a_config_error(toml: WriteToml, line: str) -> None:
    # The CLI turns a ConfigError into a one-line message and exit 2; anything else is a
    # traceback (TypeError) or, worse, a silently accepted value (true -> 1).
    with pytest.raises(ConfigError):
        load_settings(config_file=toml(line + "\n"), environ={})


@pytest.mark.parametrize("key", ["heartbeat_seconds", "retention_seconds", "drain_seconds"])
def test_nan_is_a_config_error(key: str) -> None:
    # NaN passes "< 0" and "== 0"; a NaN heartbeat then crashes every writer at run time
    # (trio.move_on_after(nan) raises ValueError) instead of being refused at start.
    with pytest.raises(ConfigError, match=key):
        load_settings(environ={"BROKER_" + key.upper(): "nan"})


def test_a_policy_given_by_name_becomes_the_enum_and_a_bad_one_is_refused() -> None:
    assert Settings(overflow_policy="drop").overflow_policy is OverflowPolicy.DROP  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overflow_policy"):
        Settings(overflow_policy="explode")  # type: ignore[arg-type]


def test_retention_per_topic_may_be_zero_but_not_negative() -> None:
    assert Settings().retention_messages_per_topic == 0  # no limit
    assert (
        load_settings(
            environ={}, overrides={"retention_messages_per_topic": 0}
        ).retention_messages_per_topic
        == 0
    )
    with pytest.raises(ConfigError, match="retention_messages_per_topic"):
        load_settings(environ={}, overrides={"retention_messages_per_topic": -1})


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("off", False), ("0", False)])
def test_booleans_from_the_environment(raw: str, expected: bool) -> None:
    settings = load_settings(environ={"BROKER_NATIVE_STREAMS": raw})
    assert settings.native_streams is expected


def test_a_boolean_that_is_not_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="native_streams: expected true or false"):
        load_settings(environ={"BROKER_NATIVE_STREAMS": "maybe"})
