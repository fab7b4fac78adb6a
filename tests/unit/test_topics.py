"""The topics the application creates cover every table the worker declares."""

from __future__ import annotations

from agents.worker import create_app
from app.settings import Settings
from events.topics import TABLES, changelog_topic


def test_every_table_changelog_is_created_up_front(tmp_path: object) -> None:
    """The worker declares no Faust table any more (the query tables are PostgreSQL's), so
    no changelog is created; one declared again must be listed in TABLES."""
    settings = Settings(app_id="t-topics", table_store="memory://",
                        data_dir=str(tmp_path))
    worker = create_app(settings)
    declared = set(worker.app.tables.keys())
    assert declared == set(TABLES) == set()
    for name in declared:
        table = worker.app.tables[name]
        assert table.changelog_topic.get_topic_name() == changelog_topic(settings, name)


def test_partition_of_is_the_producers_default_partitioner() -> None:
    """The operator commands and the query agents compute where a key lands; a producer
    that names no partition must put it there (aiokafka's default partitioner)."""
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from events.topics import partition_of

    rng = random.Random(5)
    partitioner = DefaultPartitioner()
    for partitions in (1, 6, 7, 32):
        every = list(range(partitions))
        for _ in range(500):
            key = rng.randbytes(rng.randint(1, 40))
            assert partition_of(key, partitions) == partitioner(key, every, every)


def test_the_cached_partitioner_is_the_default_one() -> None:
    """The producers' partitioner (its answers cached per key) puts every key where
    aiokafka's default one does, asked once or again, and a record without a key on an
    available partition."""
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from events.topics import cached_partitioner

    rng = random.Random(7)
    default = DefaultPartitioner()
    keys = [rng.randbytes(rng.randint(1, 40)) for _ in range(300)]
    for partitions in (1, 6, 32):
        every = list(range(partitions))
        for key in keys + keys:  # the second time from the cache
            assert cached_partitioner(key, every, every) == default(key, every, every)
        for _ in range(50):
            assert cached_partitioner(None, every, every[-1:]) == every[-1]


def test_only_keys_of_ids_length_are_cached() -> None:
    """A hostile record's key may be as long as its size limit: such keys are not cached
    (the cache holds at most 65,536 short keys), and still land where they must."""
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from events import topics

    rng = random.Random(11)
    every = list(range(6))
    before = topics._cached_partition.cache_info().currsize
    for _ in range(50):
        key = rng.randbytes(topics.CACHED_KEY_BYTES + rng.randint(1, 4096))
        assert topics.partition_of(key, 6) == DefaultPartitioner()(key, every, every)
    assert topics._cached_partition.cache_info().currsize == before


def test_murmur2_is_kafkas() -> None:
    """The partitioner's murmur2 gives aiokafka's values for keys of every length (each
    remainder of 4, none to well past an id's length, uncached sizes too), and the Java
    client's own test vectors (``UtilsTest.testMurmur2``, signed there)."""
    import random

    from aiokafka.partitioner import murmur2 as aiokafka_murmur2

    from events.topics import murmur2

    rng = random.Random(11)
    for length in range(0, 140):
        for _ in range(30):
            key = rng.randbytes(length)
            assert murmur2(key) == aiokafka_murmur2(key)
    java = {b"21": -973932308, b"foobar": -790332482,
            b"a-little-bit-long-string": -985981536,
            b"a-little-bit-longer-string": -1486304829,
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
            b"abc": 479470107}
    for key, signed in java.items():
        assert murmur2(key) == signed & 0xFFFFFFFF
