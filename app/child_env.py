"""Settings → the environment of a child process.

A process started by another (the test harness, the benchmark, an operator's script) is
configured through its environment only, exactly as an operator configures it: every
setting written out under its own variable name, and no env file read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import AliasChoices, SecretStr

from app.settings import Settings

#: Where a child looks for its env file: nowhere (every setting is in its environment).
NO_ENV_FILE = "/nonexistent"


def variable_name(field: str) -> str:
    """The environment variable of a setting: its first alias (``KAFKA_BOOTSTRAP_SERVERS``,
    ``DATABASE_URL``), else ``BIZ_<FIELD>``."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"BIZ_{field.upper()}"


def variable_value(value: object) -> str:
    """A setting's value as its variable holds it: secrets in clear, lists as JSON."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def child_env(settings: Settings, *, inherited: Mapping[str, str] | None = None,
              pythonpath: Path | None = None) -> dict[str, str]:
    """The environment of a child process that runs on ``settings``: the ``inherited``
    environment (this process's by default) without any setting of its own, then every
    setting explicit, and ``BIZ_ENV_FILE`` pointing at no file. With ``pythonpath``, that
    directory first on the child's ``PYTHONPATH``."""
    names = {variable_name(field): field for field in Settings.model_fields}
    env = {k: v for k, v in (os.environ if inherited is None else inherited).items()
           if not k.startswith("BIZ_") and k not in names}
    for variable, field in names.items():
        env[variable] = variable_value(getattr(settings, field))
    env["BIZ_ENV_FILE"] = NO_ENV_FILE
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return env
