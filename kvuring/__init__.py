"""kvuring: an asyncio-native KV-cache block store on io_uring.

from kvuring import BlockStore, Status, aligned_buffer

async with BlockStore("/mnt/nvme/kv", block_size=2 << 20) as store:
    statuses = await store.put_many(keys, bufs)
    n = await store.get_prefix(keys, bufs)
"""

from __future__ import annotations

from typing import Any

from kvuring.aio import AsyncRing, StatxResult
from kvuring.engine import (
    Engine,
    EngineUnavailable,
    Ring,
    ThreadRing,
    open_engine,
    resolve_backend,
)
from kvuring.poll import Finished, PollingStore
from kvuring.store import BlockStore, Status, aligned_buffer

__version__ = "0.1.0"

__all__ = [
    "AsyncRing",
    "BlockStore",
    "Engine",
    "EngineUnavailable",
    "Finished",
    "PollingStore",
    "Ring",
    "Status",
    "StatxResult",
    "ThreadRing",
    "__version__",
    "aligned_buffer",
    "backend_info",
    "open_engine",
    "resolve_backend",
]


def backend_info(backend: str | None = None) -> dict[str, Any]:
    """Which engine ``backend`` (default: ``KVURING_BACKEND`` or ``auto``) gives here, and why.

    Opens an engine briefly to find out; returns its name and the features it found.
    """
    engine = open_engine(backend, slots=8)
    try:
        return {"engine": engine.name, "features": dict(engine.features)}
    finally:
        engine.close()
