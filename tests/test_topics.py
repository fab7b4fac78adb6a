"""The topics the application creates cover every table the worker declares."""

from __future__ import annotations

from agents.worker import create_app
from app.settings import Settings
from events.topics import TABLES, changelog_topic


def test_every_table_changelog_is_created_up_front(tmp_path: object) -> None:
    settings = Settings(app_id="t-topics", table_store="memory://",
                        data_dir=str(tmp_path))
    worker = create_app(settings)
    declared = set(worker.app.tables.keys())
    assert declared == set(TABLES)
    for name in declared:
        table = worker.app.tables[name]
        assert table.changelog_topic.get_topic_name() == changelog_topic(settings, name)
