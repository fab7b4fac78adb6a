"""app/collector.py: the long-running processes' garbage collector settings."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app import collector
from app.settings import Settings


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_zero_keeps_python_s_defaults(restored: None) -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    collector.settle(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen


def test_what_exists_is_frozen_and_the_young_generation_collected_less_often(
        restored: None) -> None:
    built = [[i] for i in range(1_000)]  # containers the collector tracks
    before = gc.get_threshold()
    collector.settle(50_000)
    assert gc.get_threshold() == (50_000, before[1], before[2])
    assert gc.get_freeze_count() >= len(built)

    class Node:
        ref: Node | None = None

    cycle = Node()
    cycle.ref = cycle  # garbage only the collector can free
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None, "cyclic garbage made after the freeze is still collected"


def test_the_processes_settle_by_default() -> None:
    assert Settings(environment="development").gc_gen0_threshold == collector.DEFAULT_GEN0 > 700
