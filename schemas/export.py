"""Export the wire contract as JSON Schema files: ``schemas/json/<ModelName>.json``.

    python -m schemas.export            write (or rewrite) every file
    python -m schemas.export --check    exit 1 and list the files that are missing, differ
                                        or belong to no model (CI; writes nothing)

One file per model of :data:`schemas.wire.WIRE_MODELS`: ``model_json_schema(by_alias=True)``
(camelCase, as on the wire), keys sorted, 2-space indent, a trailing newline, so the output
is byte-for-byte reproducible and diffs stay readable. The files are generated: change
``schemas/wire.py``, then run the export; ``tests/unit/test_schema_export.py`` fails while the
committed files are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel

from schemas.wire import WIRE_MODELS

#: Where the files live: ``schemas/json`` next to this module.
SCHEMA_DIR = Path(__file__).resolve().parent / "json"


def render(model: type[BaseModel]) -> str:
    """The exact text of one model's schema file."""
    schema = model.model_json_schema(by_alias=True)
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files(models: Iterable[type[BaseModel]] = WIRE_MODELS) -> dict[str, str]:
    """File name → content, one per model."""
    files: dict[str, str] = {}
    for model in models:
        name = f"{model.__name__}.json"
        if name in files:
            raise ValueError(f"two wire models are named {model.__name__}")
        files[name] = render(model)
    return files


def export(
    directory: Path = SCHEMA_DIR,
    *,
    check: bool = False,
    models: Iterable[type[BaseModel]] = WIRE_MODELS,
) -> list[str]:
    """Write the schema files, or with ``check`` only compare them.

    Returns the problems found before writing, one line each (``missing: X.json``,
    ``differs: X.json``, ``stale: X.json`` for a file that matches no model); an empty list
    means the directory was (or, after writing, is) current. Writing also removes stale
    ``*.json`` files: the directory holds generated files only.
    """
    wanted = expected_files(models)
    problems: list[str] = []
    for name, content in sorted(wanted.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"missing: {name}")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"differs: {name}")
    present = sorted(p.name for p in directory.glob("*.json")) if directory.is_dir() else []
    stale = [name for name in present if name not in wanted]
    problems.extend(f"stale: {name}" for name in stale)
    if check:
        return problems
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8", newline="\n")
    for name in stale:
        (directory / name).unlink()
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export",
        description="Write the JSON Schema files of the wire contract into schemas/json/.",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 listing the files that are missing, differ or are stale",
    )
    parser.add_argument(
        "--dir", type=Path, default=SCHEMA_DIR, help=f"output directory (default {SCHEMA_DIR})"
    )
    args = parser.parse_args(argv)
    problems = export(args.dir, check=args.check)
    if args.check:
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            print(
                f"{len(problems)} schema file(s) out of date: run `python -m schemas.export`",
                file=sys.stderr,
            )
            return 1
        print(f"{len(WIRE_MODELS)} schema files in {args.dir} are current")
        return 0
    changed = len(problems)
    print(f"wrote {len(WIRE_MODELS)} schema files to {args.dir} ({changed} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
