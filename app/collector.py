"""The cyclic garbage collector of the long-running processes (``BIZ_GC_GEN0_THRESHOLD``).

Measured under load (docs/performance.md, issue 13, session 22): with Python's defaults
the worker spent about a tenth of its CPU in the collector, a young-generation pass every
700 net allocations of container objects (~50 a second) and, every few seconds, a full
pass over every object the process holds (the imported modules, the Faust app, pydantic's
schemas: ~94 ms each, a pause of the event loop). What a process builds before it starts
serving lives as long as the process, so it is frozen out of the collector once built
(``gc.freeze``), and the young generation is collected every ``gen0`` net allocations
instead: cyclic garbage (a traceback, a cancelled task's frames) still goes, a little
later, and reference counting frees everything else at once as before.
"""

from __future__ import annotations

import gc

#: ``BIZ_GC_GEN0_THRESHOLD``'s default, and the benchmark's processes' (bench/).
DEFAULT_GEN0 = 50_000


def settle(gen0: int) -> None:
    """Freeze every object that exists now (a full collection first) and collect the
    youngest generation every ``gen0`` net allocations; 0 leaves Python's defaults."""
    if gen0 <= 0:
        return
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
