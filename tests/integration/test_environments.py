"""BIZ_ENVIRONMENT: in production every process refuses the development secrets, unset
ones and short ones, with one line naming the variables and exit status 78; the
development tools are refused there whatever the secrets. The real ``bizcenter`` commands
run as child processes with an environment built from scratch (no env file)."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.settings import (
    DEV_ACCESS_SECRET,
    DEV_OPERATOR_SECRET,
    DEV_OTP_PEPPER,
    DEV_PIN_PEPPER,
    DEV_TRANSFER_SECRET,
    EXIT_CONFIG,
    Settings,
)

ROOT = Path(__file__).resolve().parents[2]
DEV = {
    "BIZ_ACCESS_TOKEN_KEY": DEV_ACCESS_SECRET,
    "BIZ_TRANSFER_TOKEN_SECRET": DEV_TRANSFER_SECRET,
    "BIZ_PIN_PEPPER": DEV_PIN_PEPPER,
    "BIZ_OTP_PEPPER": DEV_OTP_PEPPER,
    "BIZ_OPERATOR_SECRET": DEV_OPERATOR_SECRET,
}
SECRET_VARIABLES = tuple(DEV)
PROCESSES = ("worker", "account-center", "funding-provider")


def strong() -> dict[str, str]:
    return {name: secrets.token_urlsafe(48) for name in SECRET_VARIABLES}


def bizcenter(tmp_path: Path, *args: str, env: dict[str, str],
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``bizcenter ARGS`` with only ``env`` (plus PATH and HOME): no env file, nothing
    inherited from this test process (which runs in development)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "HOME": os.environ.get("HOME", str(tmp_path)),
             "PYTHONPATH": str(ROOT), "BIZ_ENV_FILE": str(tmp_path / "no-such-env-file"),
             # Nothing must be reached: a refused process never connects.
             "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
             "DATABASE_URL": "postgresql+asyncpg://nobody:nothing@127.0.0.1:9/none"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env={**clean, **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=timeout, check=False)


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused process prints (stderr), after checking how it ended."""
    assert result.returncode == EXIT_CONFIG, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------------------
# the processes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", PROCESSES)
def test_production_is_the_default_and_refuses_unset_secrets(tmp_path: Path,
                                                              command: str) -> None:
    line = refusal(bizcenter(tmp_path, command, env={}))
    assert line.startswith(f"bizcenter {command}: refusing to start with "
                           f"BIZ_ENVIRONMENT=production: ")
    for name in SECRET_VARIABLES:
        assert f"{name} is unset" in line


@pytest.mark.parametrize("command", PROCESSES)
def test_production_refuses_the_development_secrets(tmp_path: Path, command: str) -> None:
    line = refusal(bizcenter(tmp_path, command,
                             env={"BIZ_ENVIRONMENT": "production", **DEV}))
    for name in SECRET_VARIABLES:
        assert f"{name} is a development value" in line
    for value in DEV.values():
        assert value not in line


def test_one_development_secret_among_good_ones_is_named_alone(tmp_path: Path) -> None:
    for name in SECRET_VARIABLES:
        # Any development value counts, also another secret's.
        env = {**strong(), name: DEV_ACCESS_SECRET if name != "BIZ_ACCESS_TOKEN_KEY"
               else DEV_PIN_PEPPER}
        line = refusal(bizcenter(tmp_path, "worker", env=env))
        named = set(re.findall(r"(BIZ_[A-Z_]+) is ", line))
        assert named == {name}, line


def test_production_refuses_secrets_too_short_for_their_algorithm(tmp_path: Path) -> None:
    short = {name: "s" * 31 for name in SECRET_VARIABLES}
    line = refusal(bizcenter(tmp_path, "account-center", env=short))
    for name in SECRET_VARIABLES:
        assert f"{name} is shorter than 32 bytes" in line
    # HS512 needs 64 bytes: a 40-byte access-token key is refused for it, not for HS256.
    key40 = {**strong(), "BIZ_ACCESS_TOKEN_KEY": "k" * 40}
    hs512 = {**key40, "BIZ_ACCESS_TOKEN_ALGORITHMS": '["HS512"]'}
    assert "BIZ_ACCESS_TOKEN_KEY is shorter than 64 bytes" in refusal(
        bizcenter(tmp_path, "funding-provider", env=hs512))
    # Every key of a key set is checked, named by its kid (never by its value).
    keys = json.dumps([{"kid": "k-new", "key": secrets.token_urlsafe(48)},
                       {"kid": "k-old", "key": "too-short"}])
    line = refusal(bizcenter(tmp_path, "worker", env={**strong(),
                                                      "BIZ_ACCESS_TOKEN_KEYS": keys}))
    assert "BIZ_ACCESS_TOKEN_KEYS (kid k-old) is shorter than 32 bytes" in line
    assert "k-new" not in line and "too-short" not in line


def test_a_public_key_has_no_length_rule_but_the_development_value_is_refused(
        tmp_path: Path) -> None:
    env = {**strong(), "BIZ_ACCESS_TOKEN_ALGORITHMS": '["RS256"]',
           "BIZ_ACCESS_TOKEN_KEY": DEV_ACCESS_SECRET}
    line = refusal(bizcenter(tmp_path, "worker", env=env))
    assert re.findall(r"(BIZ_[A-Z_]+) is ", line) == ["BIZ_ACCESS_TOKEN_KEY"]


def test_bizcenter_token_refuses_to_mint_in_production(tmp_path: Path) -> None:
    for env in ({}, {**strong(), "BIZ_ENVIRONMENT": "production"}):
        line = refusal(bizcenter(tmp_path, "token", "alice", env=env))
        assert line.startswith("bizcenter token: refused with BIZ_ENVIRONMENT=production")
    for tool in (("seed-demo",), ("transfer", "--user", "alice", "--to", "acc-bob",
                                  "--amount", "1"), ("run",)):
        refusal(bizcenter(tmp_path, *tool, env=strong()))


def test_bizcenter_token_mints_in_development_with_a_kid(tmp_path: Path) -> None:
    result = bizcenter(tmp_path, "token", "alice", env={"BIZ_ENVIRONMENT": "development"})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["kid"] == "default" and header["alg"] == "HS256"


def test_invalid_settings_are_refused_without_showing_their_value(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(48)
    keys = json.dumps([{"kid": "k1", "key": secret}, {"kid": "k1", "key": secret}])
    line = refusal(bizcenter(tmp_path, "worker", env={**strong(),
                                                      "BIZ_ACCESS_TOKEN_KEYS": keys}))
    assert "kid 'k1' appears twice" in line and secret not in line


@pytest.mark.parametrize("args", [("sagas", "list"), ("sagas", "show", "t-1"),
                                  ("dlq", "list"), ("dlq", "show", "0:1"),
                                  ("users", "unlock", "alice")])
def test_operator_commands_that_use_no_secret_need_none(tmp_path: Path,
                                                        args: tuple[str, ...]) -> None:
    """Finding F6: reading the sagas table and the topics (sagas list|show, dlq) or
    unlocking a user uses no secret, so production with none set does not refuse them:
    they go on and fail only at the unreachable broker or database (exit 2, or an error
    that is not 78)."""
    result = bizcenter(tmp_path, *args, env={}, timeout=120)
    assert result.returncode not in (0, EXIT_CONFIG), (result.returncode, result.stderr)
    assert "refusing to start" not in result.stderr, result.stderr
    if args[0] == "sagas":  # the sagas are read from PostgreSQL first
        assert result.returncode == 2 and "PostgreSQL" in result.stderr, result.stderr


def test_sagas_resolve_needs_the_operator_secret_and_only_it(tmp_path: Path) -> None:
    """Finding F6: ``sagas resolve`` signs with BIZ_OPERATOR_SECRET: refused while it is
    unset, a development value or short, whatever the other secrets; with it alone it
    goes on (to the unreachable database, where it reads the saga first: exit 2)."""
    args = ("sagas", "resolve", "t-1", "--refund", "--operator", "ops-anna", "--reason",
            "why", "--wait", "1")
    for value in (None, DEV_OPERATOR_SECRET, DEV_PIN_PEPPER, "s" * 31):
        env = {**strong()}
        if value is None:
            del env["BIZ_OPERATOR_SECRET"]
        else:
            env["BIZ_OPERATOR_SECRET"] = value
        line = refusal(bizcenter(tmp_path, *args, env=env))
        assert line.startswith("bizcenter sagas resolve: refusing to start"), line
        assert re.findall(r"(BIZ_[A-Z_]+) is ", line) == ["BIZ_OPERATOR_SECRET"], line
    alone = bizcenter(tmp_path, *args, env={"BIZ_OPERATOR_SECRET": secrets.token_urlsafe(48)},
                      timeout=120)
    assert alone.returncode == 2, (alone.returncode, alone.stderr)
    assert "PostgreSQL" in alone.stderr, alone.stderr


@pytest.mark.integration
def test_production_with_good_secrets_starts(tmp_path: Path, kafka_bootstrap: str,
                                             database_url: str) -> None:
    """The control: the same gate lets a production process with proper secrets through
    (``ping`` reaches the broker and the database and exits 0)."""
    result = bizcenter(tmp_path, "ping", env={
        **strong(), "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url})
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


# --------------------------------------------------------------------------------------
# the settings, in process
# --------------------------------------------------------------------------------------


def test_production_problems_of_settings() -> None:
    good = {k.removeprefix("BIZ_").lower(): SecretStr(v) for k, v in strong().items()}
    assert Settings(_env_file=None, **good).production_problems() == []  # type: ignore[call-arg]
    assert Settings(_env_file=None, **{**good, "otp_pepper": SecretStr("")}  # type: ignore[call-arg]
                    ).production_problems() == ["BIZ_OTP_PEPPER is unset"]
    # A key set replaces the single key, which is then checked only when given.
    keys = SecretStr(json.dumps([{"kid": "k1", "key": secrets.token_urlsafe(48)}]))
    without_single = {k: v for k, v in good.items() if k != "access_token_key"}
    assert Settings(_env_file=None, access_token_keys=keys,  # type: ignore[call-arg]
                    **without_single).production_problems() == []
    assert Settings(_env_file=None, access_token_keys=keys,  # type: ignore[call-arg]
                    **{**without_single, "access_token_key": SecretStr(DEV_ACCESS_SECRET)}
                    ).production_problems() == ["BIZ_ACCESS_TOKEN_KEY is a development value"]


def test_a_variable_of_an_earlier_version_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """BIZ_WEB_FORWARD_SECRET (read until the HTTP forwarding went, issue 13) left in an
    operator's environment neither stops a process nor is checked: Settings ignores the
    BIZ_ variables it has no field for."""
    monkeypatch.setenv("BIZ_WEB_FORWARD_SECRET", "short")
    good = {k.removeprefix("BIZ_").lower(): SecretStr(v) for k, v in strong().items()}
    settings = Settings(_env_file=None, **good)  # type: ignore[call-arg]
    assert not hasattr(settings, "web_forward_secret")
    assert settings.production_problems() == []


def test_production_goes_past_a_leftover_forward_secret(tmp_path: Path) -> None:
    """The same through the real commands: with good secrets and the development value of
    BIZ_WEB_FORWARD_SECRET (an earlier version's), a process that checks every secret is not
    refused (``ping`` goes on to the unreachable broker: exit 1, not 78) and ``config`` does
    not list the variable."""
    env = {**strong(),
           "BIZ_WEB_FORWARD_SECRET": "dev-only-web-forward-secret-change-me-0123456789"}
    result = bizcenter(tmp_path, "ping", env=env, timeout=120)
    assert result.returncode not in (0, EXIT_CONFIG), (result.returncode, result.stderr)
    assert "refusing to start" not in result.stderr, result.stderr
    config = bizcenter(tmp_path, "config", "--json", env=env)
    assert config.returncode == 0, (config.returncode, config.stderr[-2000:])
    assert "FORWARD" not in config.stdout


# --------------------------------------------------------------------------------------
# where development is set explicitly
# --------------------------------------------------------------------------------------


def test_make_run_test_and_bench_say_development() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target, command in (("run", "$(VENV)/bin/bizcenter run"),
                            ("test", "$(VENV)/bin/python -m pytest"),
                            ("bench", "$(VENV)/bin/python -m bench")):
        assert f"BIZ_ENVIRONMENT=development {command}" in makefile, target
    up = (ROOT / "infra" / "up.sh").read_text()
    assert "'BIZ_ENVIRONMENT=development'" in up


def test_docker_compose_requires_the_secrets_outside_the_demo() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    for name in SECRET_VARIABLES:
        if name == "BIZ_ACCESS_TOKEN_KEY":  # or the key set: one of the two is required
            assert re.search(r"\$\{BIZ_ACCESS_TOKEN_KEY:-\$\{BIZ_ACCESS_TOKEN_KEYS:\?",
                             compose)
        else:
            assert re.search(rf"^  {name}: \$\{{{name}:\?", compose, re.MULTILINE), name
    assert "BIZ_ENVIRONMENT: ${BIZ_ENVIRONMENT:-production}" in compose
    demo = dict(line.split("=", 1) for line in
                (ROOT / "infra" / "compose-demo.env").read_text().splitlines()
                if line and not line.startswith("#"))
    assert demo["COMPOSE_PROFILES"] == "demo"
    assert demo["BIZ_ENVIRONMENT"] == "development"
    assert {k: demo[k] for k in DEV} == DEV  # the placeholders of app/settings.py
