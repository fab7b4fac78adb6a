"""The README's configuration table lists every field of ``app.settings.Settings``."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices

from app.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        assert isinstance(first, str)
        return first
    return f"BIZ_{field.upper()}"


def test_readme_configuration_table_lists_every_setting() -> None:
    text = README.read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, re.MULTILINE))
    expected = {_env_name(f) for f in Settings.model_fields}
    assert documented == expected, (
        f"missing from README: {sorted(expected - documented)}; "
        f"not settings: {sorted(documented - expected)}"
    )
