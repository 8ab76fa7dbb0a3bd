"""Shared pieces of the tests against real vLLM (tests/test_vllm_*.py).

Importing this module skips the importing test module, with the reason,
where vLLM's offloading tiers cannot be imported: the main test
environment (.venv) has no vLLM; .ci/vllm-env.sh makes the one that does.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# vLLM's import chain (torch among it) warns about its own deprecations; the
# suite turns warnings into errors, so they are silenced for the import alone.
_quiet = warnings.catch_warnings()
_quiet.__enter__()
warnings.simplefilter("ignore")
try:
    import numpy as np
    from vllm.v1.kv_offload.base import (
        LookupResult,
        OffloadingKVEventsConfig,
        ReqContext,
        ScheduleEndContext,
        make_offload_key,
    )
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )
    from vllm.v1.kv_offload.tiering.base import JobResult, TransferJob
    from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
    from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager

    from kvuring.vllm import KvuringTier
except ImportError as exc:
    if os.environ.get("KVURING_REQUIRE_VLLM") == "1":  # .ci/vllm-env.sh: no skipping there
        raise
    pytest.skip(
        f"vLLM's offloading tiers are not importable here ({exc}); these tests run in "
        "the vLLM environment that .ci/vllm-env.sh makes (.ci/run runs them)",
        allow_module_level=True,
    )
finally:
    _quiet.__exit__(None, None, None)

from kvuring import aligned_buffer  # noqa: E402  (after the skip above)

__all__ = [
    "END",
    "FileSystemTierManager",
    "JobResult",
    "LookupResult",
    "Primary",
    "ReqContext",
    "SecondaryTierFactory",
    "collect",
    "drain",
    "job",
    "key",
    "kvuring_tier",
    "lookup_and_wait",
    "spec",
    "tier_files",
]

CHUNK = 16384
END = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())
CTX = ReqContext(req_id="test")


def spec(*, events: bool = False, model: str = "test/model") -> Any:
    """An offloading spec as the tier factory passes it (the parts tiers read)."""
    config = OffloadingConfig(
        groups=(),
        worker_kv_bytes_per_block=0,
        enable_kv_cache_events=events,
        extra_config={},
        engine_id="kvuring-test",
        model=OffloadingModelConfig(name=model, dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )  # fmt: skip
    return SimpleNamespace(
        config=config,
        blocks_per_chunk=1,
        kv_events_config=OffloadingKVEventsConfig(
            enable_kv_cache_events=events, self_describing_kv_events=False
        ),
    )


class Primary:
    """The primary tier's memory as vLLM hands it to a tier: a 2-D int8 view, one row per chunk."""

    def __init__(self, chunks: int, chunk: int = CHUNK) -> None:
        self.buf = aligned_buffer(chunks * chunk)
        self.rows = np.frombuffer(self.buf, dtype=np.int8).reshape(chunks, chunk)
        self.view = memoryview(self.buf).cast("b", [chunks, chunk])
        assert self.view.strides[0] == chunk

    def fill(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rows[:] = rng.integers(-128, 128, size=self.rows.shape, dtype=np.int8)

    def row(self, i: int) -> bytes:
        return self.rows[i].tobytes()


def key(n: int, group: int = 0) -> bytes:
    """A vLLM OffloadKey: a 32-byte block hash and the 4-byte group index."""
    return make_offload_key(n.to_bytes(32, "big"), group)


def job(
    job_id: int, keys: list[bytes], chunk_ids: list[int], *, load: bool = False,
    ctx: ReqContext = CTX,
) -> TransferJob:  # fmt: skip
    return TransferJob(
        job_id=job_id, keys=keys, chunk_ids=np.array(chunk_ids, dtype=np.int64),
        is_promotion=load, req_context=ctx,
    )  # fmt: skip


def drain(tier: Any) -> list[JobResult]:
    """drain_jobs(), then every result it left: each job at most once."""
    tier.drain_jobs()
    results = list(tier.get_finished_jobs())
    ids = [r.job_id for r in results]
    assert len(ids) == len(set(ids)), f"a job reported twice: {ids}"
    return results


def collect(tier: Any, ids: set[int], timeout: float = 30.0) -> dict[int, JobResult]:
    """Poll get_finished_jobs (never drain) until every job in ``ids`` reported, once each."""
    out: dict[int, JobResult] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(ids):
        assert time.monotonic() < deadline, f"jobs never finished: {sorted(ids - set(out))}"
        for r in tier.get_finished_jobs():
            assert r.job_id in ids, f"unknown job {r.job_id}"
            assert r.job_id not in out, f"job {r.job_id} reported twice"
            out[r.job_id] = r
        time.sleep(0.0005)
    return out


def lookup_and_wait(
    tier: Any, keys: list[bytes], ctx: ReqContext = CTX, timeout: float = 10.0
) -> list[Any]:
    """Look the keys up, end the step, and repeat until no answer is RETRY (as a scheduler does)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [tier.lookup(k, ctx) for k in keys]
        if LookupResult.RETRY not in got:
            return got
        assert time.monotonic() < deadline, f"lookups never resolved: {got}"
        tier.on_schedule_end(END)
        time.sleep(0.0005)


def kvuring_tier(root: Path, backend: str, **options: Any) -> KvuringTier:
    chunks = options.pop("chunks", 16)
    primary = options.pop("primary", None) or Primary(chunks)
    the_spec = options.pop("spec", None) or spec()
    tier = KvuringTier(
        offloading_spec=the_spec, primary_kv_view=primary.view, tier_type="KvuringTier",
        root_dir=str(root), backend=backend, **options,
    )  # fmt: skip
    tier.primary = primary  # type: ignore[attr-defined]
    return tier


def tier_files(root: Path) -> Iterator[Path]:
    """Block files under ``root`` (no kvuring registry, no vLLM config.json)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".tmp"]
        for name in filenames:
            if name.endswith((".bin", ".kvb")):
                yield Path(dirpath, name)
