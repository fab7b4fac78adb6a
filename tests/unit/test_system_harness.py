"""The helpers the integration tests and the benchmark share (issue 12, point 6): settings →
a child's environment (app/child_env.py), consumer-group lag (events/consumer_groups.py),
the env file of ``make up`` (reference/system_harness.py)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from app.child_env import NO_ENV_FILE, child_env, variable_name
from app.settings import Settings
from events.consumer_groups import records_behind
from reference.system_harness import env_file_values, local_env_file


def _settings() -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, environment="development", topic_prefix="x.", topic_partitions=5,
        kafka_bootstrap_servers="kafka:1", database_url="postgresql+asyncpg://u@h/d",
        funding_decline_sources=["card-a", "card-b"], pin_pepper=SecretStr("p" * 40))


def test_a_child_reads_back_exactly_the_settings_it_was_given(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings = _settings()
    env = child_env(settings, inherited={"PATH": "/bin", "BIZ_TOPIC_PREFIX": "parent.",
                                         "DATABASE_URL": "parent", "HOME": "/home/x"})
    assert env["PATH"] == "/bin" and env["HOME"] == "/home/x"
    assert env["BIZ_ENV_FILE"] == NO_ENV_FILE
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:1"
    assert env["BIZ_PIN_PEPPER"] == "p" * 40  # secrets in clear
    assert env["BIZ_FUNDING_DECLINE_SOURCES"] == '["card-a", "card-b"]'
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == settings  # type: ignore[call-arg]


def test_every_setting_has_one_variable() -> None:
    names = [variable_name(f) for f in Settings.model_fields]
    assert len(set(names)) == len(names)
    assert variable_name("database_url") == "DATABASE_URL"
    assert variable_name("topic_prefix") == "BIZ_TOPIC_PREFIX"


def test_pythonpath_goes_first() -> None:
    env = child_env(_settings(), inherited={"PYTHONPATH": "/other"}, pythonpath=Path("/repo"))
    assert env["PYTHONPATH"] == "/repo:/other"


def test_records_behind_counts_from_zero_without_a_commit() -> None:
    assert records_behind(10, 4) == 6
    assert records_behind(10, None) == 10
    assert records_behind(10, -1) == 10


def test_env_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("BIZ_ENV_FILE", raising=False)
    assert local_env_file(tmp_path) == tmp_path / ".local" / "env"
    path = tmp_path / "env"
    path.write_text("# comment\nKAFKA_BOOTSTRAP_SERVERS = k:1\nnot a line\nX=a=b\n")
    assert env_file_values(path) == {"KAFKA_BOOTSTRAP_SERVERS": "k:1", "X": "a=b"}
    assert env_file_values(tmp_path / "missing") == {}
    monkeypatch.setenv("BIZ_ENV_FILE", str(path))
    assert local_env_file(tmp_path) == path
