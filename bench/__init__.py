"""End-to-end benchmark of the business center (issue 5): ``python -m bench``.

Starts an isolated copy of the system (its own topics, consumer groups, PostgreSQL schemas
and worker data), drives complete transfers from K virtual users, measures the plain
aiokafka request→reply echo on the same broker as the ceiling, checks the money, and writes
``bench/results/<timestamp>/`` plus one line of ``docs/performance.md``.
"""
