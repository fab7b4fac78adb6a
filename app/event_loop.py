"""The event loop of every process: uvloop by default (``BIZ_EVENT_LOOP``).

Each process here (worker, account center, funding provider, gateway tools) spends most of
its CPU moving small records through loopback sockets; uvloop (libuv) does the loop's and
the transports' part of that in C. Set before any loop exists: ``asyncio.run`` and Faust's
worker then create uvloop loops.
"""

from __future__ import annotations

import asyncio


def install_event_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif kind == "asyncio":
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    else:
        raise ValueError(f"unknown event loop {kind!r}")
