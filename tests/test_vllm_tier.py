"""KvuringTier against vLLM's secondary-tier contract, on both engines.

The contract as vLLM's own filesystem-tier tests check it, through the
public interface only: round trips into the right chunk slots, stores of
chunks already present skipped, lookups before and after a store (RETRY
until on_schedule_end, one presence batch per step), partial and failed
loads (successful_keys, then MISS), many jobs in flight with one result
each, drain_jobs, shutdown with jobs in flight, two tiers on one root,
restart, KV events, and construction through vLLM's tier factory.
Skipped where vLLM is not importable (see vllm_helpers.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import (
    END,
    LookupResult,
    Primary,
    ReqContext,
    collect,
    drain,
    job,
    key,
    kvuring_tier,
    lookup_and_wait,
    spec,
    tier_files,
)

from kvuring import PollingStore
from kvuring.vllm import KvuringTier

HIT, MISS, RETRY = LookupResult.HIT, LookupResult.MISS, LookupResult.RETRY


@pytest.fixture
def tier(tmp_path: Path, backend: str) -> Iterator[KvuringTier]:
    t = kvuring_tier(tmp_path, backend)
    yield t
    t.shutdown()


def _primary(t: KvuringTier) -> Primary:
    p: Primary = t.primary  # type: ignore[attr-defined]
    return p


def _kvb(root: Path) -> list[Path]:
    return sorted(tier_files(root))


def test_round_trip_into_the_right_chunk_slots(tier: KvuringTier, tmp_path: Path) -> None:
    p = _primary(tier)
    p.fill(1)
    want = [p.row(i) for i in range(5)]
    keys = [key(i) for i in range(5)]
    tier.submit_store(job(1, keys, [0, 1, 2, 3, 4]))
    [r] = drain(tier)
    assert (r.job_id, r.success, r.transfer_bytes) == (1, True, 5 * 16384)
    assert len(_kvb(tmp_path)) == 5
    p.rows[:] = 0
    # into other slots, in another order
    tier.submit_load(job(2, keys, [15, 9, 11, 8, 10], load=True))
    [r] = drain(tier)
    assert (r.job_id, r.success, r.successful_keys) == (2, True, None)
    for k, slot in enumerate([15, 9, 11, 8, 10]):
        assert p.row(slot) == want[k]
    for untouched in (0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14):
        assert p.row(untouched) == bytes(16384)
    # a successful load leaves the files and the verdicts alone
    assert len(_kvb(tmp_path)) == 5
    assert lookup_and_wait(tier, keys) == [HIT] * 5


def test_empty_jobs_report_success(tier: KvuringTier) -> None:
    tier.submit_store(job(1, [], []))
    tier.submit_load(job(2, [], [], load=True))
    assert sorted((r.job_id, r.success) for r in drain(tier)) == [(1, True), (2, True)]


def test_lookups_retry_until_the_step_ends_then_resolve(tier: KvuringTier) -> None:
    keys = [key(i) for i in range(10)]
    assert [tier.lookup(k, ReqContext("a")) for k in keys] == [RETRY] * 10
    time.sleep(0.05)  # time alone resolves nothing: only on_schedule_end does
    assert [tier.lookup(k, ReqContext("b")) for k in keys] == [RETRY] * 10
    before = tier.stats()["contains"]
    tier.on_schedule_end(END)
    assert tier.stats()["contains"] - before == 10  # one presence batch for both requests
    assert lookup_and_wait(tier, keys, ReqContext("a")) == [MISS] * 10
    tier.on_schedule_end(END)
    assert tier.stats()["contains"] - before == 10  # nothing new to check


def test_one_presence_batch_per_step(tier: KvuringTier, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = PollingStore.submit_contains

    def counting(self: PollingStore, keys: Any, **kw: Any) -> int:
        calls.append(len(keys))
        return real(self, keys, **kw)

    monkeypatch.setattr(PollingStore, "submit_contains", counting)
    for step in range(3):
        for r in range(4):
            for i in range(5):
                tier.lookup(key(100 * step + 10 * r + i), ReqContext(f"r{step}-{r}"))
        tier.on_schedule_end(END)
    tier.on_schedule_end(END)
    assert calls == [20, 20, 20]


def test_lookups_before_and_after_a_store(tier: KvuringTier) -> None:
    keys = [key(1), key(2)]
    ctx = ReqContext("before")
    assert lookup_and_wait(tier, keys, ctx) == [MISS, MISS]
    tier.submit_store(job(1, keys, [0, 1]))
    assert [r.success for r in drain(tier)] == [True]
    # the tier's own store turns the cached MISS into a HIT, for the same
    # request and a new one
    assert [tier.lookup(k, ctx) for k in keys] == [HIT, HIT]
    assert lookup_and_wait(tier, keys, ReqContext("after")) == [HIT, HIT]
    tier.on_request_finished(ctx)
    tier.on_request_finished(ReqContext("after"))
    assert lookup_and_wait(tier, [key(1), key(3)], ReqContext("later")) == [HIT, MISS]


def test_stores_of_chunks_known_present_are_skipped(tier: KvuringTier, tmp_path: Path) -> None:
    p = _primary(tier)
    p.fill(2)
    keys = [key(i) for i in range(4)]
    tier.submit_store(job(1, keys, [0, 1, 2, 3]))
    assert [r.success for r in drain(tier)] == [True]
    files = {f: f.stat().st_mtime_ns for f in _kvb(tmp_path)}
    puts = tier.stats()["puts"]
    p.fill(3)
    tier.submit_store(job(2, keys, [4, 5, 6, 7]))  # same keys from other slots
    [r] = drain(tier)
    assert (r.job_id, r.success, r.transfer_bytes) == (2, True, 0)
    assert tier.stats()["puts"] == puts  # no I/O at all
    # half known: only the new half is written
    tier.submit_store(job(3, [key(2), key(3), key(8), key(9)], [8, 9, 10, 11]))
    [r] = drain(tier)
    assert (r.success, r.transfer_bytes) == (True, 2 * 16384)
    assert tier.stats()["puts"] == puts + 2
    assert {f: f.stat().st_mtime_ns for f in _kvb(tmp_path) if f in files} == files


def test_store_of_a_chunk_on_disk_but_unknown_is_not_rewritten(
    tmp_path: Path, backend: str
) -> None:
    a = kvuring_tier(tmp_path, backend)
    a.primary.fill(4)  # type: ignore[attr-defined]
    a.submit_store(job(1, [key(1)], [0]))
    assert [r.success for r in drain(a)] == [True]
    [f] = _kvb(tmp_path)
    ino, mtime = f.stat().st_ino, f.stat().st_mtime_ns
    b = kvuring_tier(tmp_path, backend)
    try:
        b.submit_store(job(7, [key(1)], [3]))
        [r] = drain(b)
        assert (r.job_id, r.success, r.transfer_bytes) == (7, True, 0)  # EXISTS: nothing written
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == (ino, mtime)
    finally:
        a.shutdown()
        b.shutdown()


def test_failed_load_of_a_missing_chunk(tier: KvuringTier) -> None:
    ctx = ReqContext("missing")
    tier.submit_load(job(1, [key(99)], [0], load=True, ctx=ctx))
    [r] = drain(tier)
    assert (r.job_id, r.success, r.successful_keys) == (1, False, None)
    # the request that asked now gets MISS at once, so the scheduler stops retrying
    assert tier.lookup(key(99), ctx) == MISS


@pytest.mark.parametrize("verify", [True, False])
def test_partial_load_reports_the_keys_that_loaded(
    tmp_path: Path, backend: str, verify: bool
) -> None:
    t = kvuring_tier(tmp_path, backend, verify=verify)
    try:
        p = _primary(t)
        p.fill(5)
        keys = [key(1), key(2), key(3), key(4)]
        want = [p.row(i) for i in range(4)]
        t.submit_store(job(1, keys, [0, 1, 2, 3]))
        assert [r.success for r in drain(t)] == [True]
        ctx = ReqContext("partial")
        assert lookup_and_wait(t, keys, ctx) == [HIT] * 4
        # the file of key(2) goes away behind the tier's back
        [gone] = [f for f in _kvb(tmp_path) if f.name.startswith(key(2).hex()[:64])]
        gone.unlink()
        t.submit_load(job(2, keys, [8, 9, 10, 11], load=True, ctx=ctx))
        [r] = drain(t)
        assert (r.job_id, r.success) == (2, False)
        assert r.successful_keys is not None
        assert set(r.successful_keys) == {key(1), key(3), key(4)}
        assert [p.row(8), p.row(10), p.row(11)] == [want[0], want[2], want[3]]
        assert [t.lookup(k, ctx) for k in keys] == [HIT, MISS, HIT, HIT]
        t.on_request_finished(ctx)
        assert lookup_and_wait(t, keys, ReqContext("fresh")) == [HIT, MISS, HIT, HIT]
        # the scheduler stores it again: it is written, not skipped
        t.submit_store(job(3, [key(2)], [1]))
        [r] = drain(t)
        assert (r.success, r.transfer_bytes) == (True, 16384)
    finally:
        t.shutdown()


def test_bad_chunk_ids_fail_the_job_not_the_caller(tier: KvuringTier) -> None:
    tier.submit_store(job(1, [key(1)], [16]))  # one past the last row
    tier.submit_load(job(2, [key(1)], [-1], load=True))
    tier.submit_store(job(3, [key(1), key(2)], [0]))  # fewer ids than keys
    assert sorted((r.job_id, r.success) for r in drain(tier)) == [
        (1, False),
        (2, False),
        (3, False),
    ]
    assert tier.lookup(key(1), ReqContext("x")) in (RETRY, MISS)


def test_many_jobs_in_flight_one_result_each(tier: KvuringTier) -> None:
    p = _primary(tier)
    p.fill(6)
    want = [p.row(i) for i in range(16)]
    n = 60
    for j in range(n):  # 4 chunks a job, no poll in between
        tier.submit_store(job(j, [key(1000 + 4 * j + i) for i in range(4)],
                              [(4 * j + i) % 16 for i in range(4)]))  # fmt: skip
    results = collect(tier, set(range(n)))
    assert all(r.success for r in results.values())
    p.rows[:] = 0
    for j in range(n):
        tier.submit_load(job(n + j, [key(1000 + 4 * j + i) for i in range(4)],
                             [(4 * j + i) % 16 for i in range(4)], load=True))  # fmt: skip
    results = collect(tier, set(range(n, 2 * n)))
    assert all(r.success for r in results.values())
    assert [p.row(i) for i in range(16)] == want
    assert list(tier.get_finished_jobs()) == []


def test_drain_jobs_leaves_every_result_for_the_next_poll(tier: KvuringTier) -> None:
    _primary(tier).fill(7)
    for j in range(8):
        tier.submit_store(job(j, [key(j)], [j]))
    for j in range(8):
        tier.submit_load(job(100 + j, [key(j)], [8 + j], load=True))
    tier.drain_jobs()
    assert tier.stats()["pending_batches"] == 0
    results = list(tier.get_finished_jobs())
    assert sorted(r.job_id for r in results) == [*range(8), *range(100, 108)]
    assert list(tier.get_finished_jobs()) == []
    tier.drain_jobs()  # nothing in flight: returns at once
    assert list(tier.get_finished_jobs()) == []


def test_shutdown_with_jobs_in_flight(tmp_path: Path, backend: str) -> None:
    t = kvuring_tier(tmp_path, backend, chunks=64)
    p = _primary(t)
    p.fill(8)
    for j in range(32):
        t.submit_store(job(j, [key(j)], [j]))
    for j in range(32):
        t.submit_load(job(100 + j, [key(j)], [32 + j], load=True))
    t.shutdown()
    assert t.stats()["pending_batches"] == 0
    assert t.stats()["engine"] is None  # the store is closed
    # nothing touches primary memory after shutdown returns
    p.rows[:] = 7
    time.sleep(0.05)
    assert (p.rows == 7).all()
    # whatever finished is reported at most once, and only for known jobs
    results = list(t.get_finished_jobs())
    ids = [r.job_id for r in results]
    assert len(ids) == len(set(ids)) and set(ids) <= {*range(32), *range(100, 132)}
    assert list(t.get_finished_jobs()) == []
    # no temp files left, and a second shutdown is a no-op
    assert not [f for f in tmp_path.rglob("*.tmp") if f.is_file() and f.parent.name != ".tmp"]
    t.shutdown()
    # after shutdown: no I/O, a failed result, MISS
    t.submit_store(job(500, [key(1)], [0]))
    assert [(r.job_id, r.success) for r in t.get_finished_jobs()] == [(500, False)]
    assert t.lookup(key(1), ReqContext("late")) == MISS


def test_two_tiers_on_one_root(tmp_path: Path, backend: str) -> None:
    a = kvuring_tier(tmp_path, backend)
    b = kvuring_tier(tmp_path, backend)
    try:
        pa, pb = _primary(a), _primary(b)
        pa.fill(9)
        pb.rows[:] = pa.rows
        keys = [key(i) for i in range(8)]
        # both store the same chunks at once
        a.submit_store(job(1, keys, list(range(8))))
        b.submit_store(job(1, keys, list(range(8))))
        assert [r.success for r in drain(a)] == [True]
        assert [r.success for r in drain(b)] == [True]
        assert len(_kvb(tmp_path)) == 8
        a.submit_store(job(2, [key(20)], [9]))
        assert [r.success for r in drain(a)] == [True]
        # b sees what a stored, and loads it
        assert lookup_and_wait(b, [key(20), key(21)]) == [HIT, MISS]
        b.submit_load(job(3, [key(20)], [15], load=True))
        assert [r.success for r in drain(b)] == [True]
        assert pb.row(15) == pa.row(9)
    finally:
        a.shutdown()
        b.shutdown()


def test_restart_finds_what_was_stored(tmp_path: Path, backend: str) -> None:
    t = kvuring_tier(tmp_path, backend)
    _primary(t).fill(10)
    want = [_primary(t).row(i) for i in range(4)]
    t.submit_store(job(1, [key(i) for i in range(4)], [0, 1, 2, 3]))
    assert [r.success for r in drain(t)] == [True]
    t.shutdown()
    again = kvuring_tier(tmp_path, backend)
    try:
        keys = [key(i) for i in range(5)]
        assert lookup_and_wait(again, keys) == [HIT] * 4 + [MISS]
        again.submit_load(job(2, keys[:4], [12, 13, 14, 15], load=True))
        assert [r.success for r in drain(again)] == [True]
        assert [_primary(again).row(i) for i in range(12, 16)] == want
    finally:
        again.shutdown()


def test_big_chunks_checksummed_round_trip(tmp_path: Path, backend: str) -> None:
    big = 2 << 20  # hash threads do the checksums of chunks of 256 KiB and more
    t = kvuring_tier(tmp_path, backend, primary=Primary(8, big))
    try:
        p = _primary(t)
        p.fill(11)
        want = [p.row(i) for i in range(4)]
        t.submit_store(job(1, [key(i) for i in range(4)], [0, 1, 2, 3]))
        assert [(r.success, r.transfer_bytes) for r in drain(t)] == [(True, 4 * big)]
        t.submit_load(job(2, [key(i) for i in range(4)], [7, 6, 5, 4], load=True))
        assert [r.success for r in drain(t)] == [True]
        assert [p.row(i) for i in (7, 6, 5, 4)] == want
    finally:
        t.shutdown()


def test_kv_events(tmp_path: Path, backend: str) -> None:
    from vllm.v1.kv_offload.base import Locality, Medium

    t = kvuring_tier(tmp_path, backend, spec=spec(events=True), enable_kv_events=True,
                     locality="LOCAL")  # fmt: skip
    try:
        keys = [key(1), key(2)]
        t.submit_store(job(1, keys, [0, 1]))
        t.submit_load(job(2, [key(9)], [5], load=True))  # loads emit nothing
        drain(t)
        [ev] = list(t.take_events())
        assert (ev.keys, ev.medium, ev.removed, ev.locality) == (keys, Medium.STORAGE, False,
                                                                 Locality.LOCAL)  # fmt: skip
        assert list(t.take_events()) == []
        t.submit_store(job(3, keys, [0, 1]))  # skipped, but stored all the same
        drain(t)
        assert [e.keys for e in t.take_events()] == [keys]
    finally:
        t.shutdown()


def test_kv_events_off_when_vllm_has_them_off(tmp_path: Path, backend: str) -> None:
    t = kvuring_tier(tmp_path, backend, enable_kv_events=True)  # events off globally
    try:
        t.submit_store(job(1, [key(1)], [0]))
        drain(t)
        assert list(t.take_events()) == []
    finally:
        t.shutdown()


def test_built_by_vllms_tier_factory(tmp_path: Path, backend: str) -> None:
    from vllm.v1.kv_offload.base import Locality
    from vllm.v1.kv_offload.tiering.base import SecondaryTierManager
    from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    p = Primary(8)
    config = {"type": "KvuringTier", "module_path": "kvuring.vllm", "root_dir": str(tmp_path),
              "verify": True, "direct": "auto", "queue_depth": 64, "backend": backend,
              "locality": "LOCAL"}  # fmt: skip
    t = SecondaryTierFactory.create_secondary_tier(config, p.view, spec())
    try:
        assert isinstance(t, KvuringTier) and isinstance(t, SecondaryTierManager)
        assert t.tier_type == "KvuringTier" and t.locality is Locality.LOCAL
        assert t.cache_hit_source is CacheHitSource.DISK
        assert t.block_size_bytes == 16384
        info = t.config_info()
        assert set(info) == set(KvuringTier.config_info_keys(config))
        assert info["kvuring_engine"] == backend and info["kvuring_queue_depth"] == 64
        stats = t.stats()
        assert stats["engine"] == backend and stats["verify"] is True
        p.fill(12)
        want = p.row(0)
        t.submit_store(job(1, [key(1)], [0]))
        assert [r.success for r in drain(t)] == [True]
        t.submit_load(job(2, [key(1)], [7], load=True))
        assert [r.success for r in drain(t)] == [True]
        assert p.row(7) == want
    finally:
        t.shutdown()
    with pytest.raises(TypeError):
        SecondaryTierFactory.create_secondary_tier({**config, "no_such_option": 1}, p.view, spec())
    with pytest.raises(ValueError):
        SecondaryTierFactory.create_secondary_tier({**config, "queue_depth": 0}, p.view, spec())


def test_built_with_a_backpressure_detector(tmp_path: Path, backend: str) -> None:
    from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

    p = Primary(4)
    config = {"type": "KvuringTier", "module_path": "kvuring.vllm", "root_dir": str(tmp_path),
              "backend": backend,
              "backpressure": {"backpressure_cls": "EMABackpressureDetector"}}  # fmt: skip
    t = SecondaryTierFactory.create_secondary_tier(config, p.view, spec())
    try:
        assert t.bp_detector is not None
    finally:
        t.shutdown()


def test_namespace_from_vllms_file_mapper_or_given(tmp_path: Path, backend: str) -> None:
    t = kvuring_tier(tmp_path, backend, spec=spec(model="org/Model-1.5B"))
    try:
        assert t.namespace.startswith("org_Model-1.5B_") and t.namespace.endswith("_r0")
        assert (tmp_path / t.namespace).is_dir()
        assert (tmp_path / t.namespace.removesuffix("_r0") / "config.json").is_file()
    finally:
        t.shutdown()
    with pytest.raises(ValueError, match="'namespace' option"):
        kvuring_tier(tmp_path, backend, spec=spec(model="my model"))
    t = kvuring_tier(tmp_path, backend, spec=spec(model="my model"), namespace="mine")
    try:
        t.submit_store(job(1, [key(1)], [0]))
        assert [r.success for r in drain(t)] == [True]
        assert [f.relative_to(tmp_path).parts[0] for f in tier_files(tmp_path)] == ["mine"]
    finally:
        t.shutdown()
