"""kvuring as a vLLM secondary offloading tier: :class:`KvuringTier`.

vLLM (0.33 or newer) loads it from a tier config dict, without patching vLLM::

    "secondary_tiers": [{"type": "KvuringTier", "module_path": "kvuring.vllm",
                         "root_dir": "/mnt/kv"}]

Every other key of the dict is a constructor keyword (``verify``,
``direct``, ``queue_depth``, ``backend``, ``namespace``, ``prioritize_loads``,
``enable_kv_events``, ``locality``, ``known_keys``, ``io_timeout``, ``durable``,
``capacity_bytes``).  The tier runs on a
:class:`~kvuring.PollingStore`: each ``submit_store``/``submit_load`` is one
batch submitted at once, ``get_finished_jobs`` polls without blocking, and
all lookups of a scheduler step become one presence batch at
``on_schedule_end``.  On the io_uring engine the tier starts no thread.

vLLM is imported only here; see docs/vllm.md.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvuring.poll import Finished, PollingStore
from kvuring.status import Status

__all__ = ["KvuringTier"]

log = logging.getLogger("kvuring.vllm")


def _import_vllm() -> tuple[Any, ...]:
    try:
        base = importlib.import_module("vllm.v1.kv_offload.base")
        tiering = importlib.import_module("vllm.v1.kv_offload.tiering.base")
        mapper = importlib.import_module("vllm.v1.kv_offload.file_mapper")
    except ImportError as exc:
        raise ImportError(
            "kvuring.vllm needs vLLM 0.33 or newer with its offloading tiers "
            f"(vllm.v1.kv_offload.tiering): pip install 'kvuring[vllm]' ({exc})"
        ) from exc
    return base, tiering, mapper


_base, _tiering, _mapper = _import_vllm()
_SecondaryTierManager: Any = _tiering.SecondaryTierManager
_JobResult: Any = _tiering.JobResult
_LookupResult: Any = _base.LookupResult
_Medium: Any = _base.Medium
_Locality: Any = _base.Locality
_OffloadingEvent: Any = _base.OffloadingEvent
_RequestOffloadingContext: Any = _base.RequestOffloadingContext
_FileMapper: Any = _mapper.FileMapper

_STORED_OK = (Status.STORED, Status.EXISTS)


@dataclass
class _Job:
    job_id: int
    load: bool
    keys: list[bytes]  # every key of the job, in order
    req_id: str
    start: float
    blocks: int  # blocks sent to the store (a store skips keys known present)


@dataclass
class _Lookup:
    generation: int
    result: bool | None = None  # None: not resolved yet
    in_flight: bool = False
    requests: set[str] = field(default_factory=set)


class KvuringTier(_SecondaryTierManager):  # type: ignore[misc]
    """A vLLM ``SecondaryTierManager`` on kvuring's :class:`~kvuring.PollingStore`.

    Chunks are rows of the primary view (``strides[0]`` bytes each); a
    chunk's kvuring key is its vLLM ``OffloadKey`` (block hash followed by
    the 4-byte big-endian KV-cache group index).  Files go under
    ``root_dir/<namespace>``; the default namespace is the directory vLLM's
    own filesystem tier uses for the same model and configuration
    (``<model>_<config hash>_r<rank>``, from vLLM's ``FileMapper``).
    """

    medium = _Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        root_dir: str,
        verify: bool = True,
        direct: bool | str = "auto",
        queue_depth: int = 256,
        backend: str = "auto",
        namespace: str | None = None,
        prioritize_loads: bool = True,
        enable_kv_events: bool = False,
        locality: str | None = None,
        known_keys: int = 1 << 20,
        io_timeout: float | None = 30.0,
        durable: bool = False,
        capacity_bytes: int | None = None,
        backpressure_detector: Any = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = _Locality(locality) if locality is not None else None
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be true or false, not {verify!r}")
        if not isinstance(known_keys, int) or known_keys < 0:
            raise ValueError(f"known_keys must be an int >= 0, not {known_keys!r}")
        self.events: list[Any] | None = None
        if enable_kv_events:
            if offloading_spec.kv_events_config.enable_kv_cache_events:
                self.events = []
            else:
                log.warning(
                    "enable_kv_events is set on secondary tier %r but KV cache events are "
                    "disabled globally; the tier will not emit events.",
                    tier_type,
                )
        self._view = primary_kv_view
        strides = primary_kv_view.strides
        if not strides or len(strides) != 2:
            raise ValueError("primary_kv_view must be a 2-D view, one row per chunk")
        self._chunk_bytes: int = strides[0]
        self.file_mapper = _FileMapper.from_offloading_spec(
            root_dir=root_dir,
            offloading_spec=offloading_spec,
            blocks_per_file=offloading_spec.blocks_per_chunk,
            parallel_agnostic=True,
        )
        derived = namespace is None
        if namespace is None:
            namespace = f"{os.path.basename(self.file_mapper.base_path)}_r{self.file_mapper.rank}"
        self.namespace = namespace
        # verify=False: raw files named as vLLM's FileMapper names them
        # (<h[0:3]>/<h[3:5]>_g<group>/<hash>.bin), so vLLM's own tier shares them.
        self.layout = "kvuring" if verify else "vllm"
        try:
            self._store = PollingStore(
                root_dir, self._chunk_bytes, namespace=namespace, backend=backend, direct=direct,
                verify=verify, queue_depth=queue_depth, prioritize_loads=prioritize_loads,
                layout=self.layout, io_timeout=io_timeout, durable=durable,
                capacity_bytes=capacity_bytes,
            )  # fmt: skip
        except ValueError as exc:
            if derived and "namespace" in str(exc):
                raise ValueError(f"{exc}: set the tier's 'namespace' option") from exc
            raise
        if derived:
            self._write_run_config()
        self._store.open()
        self._jobs: dict[int, _Job] = {}  # PollingStore batch id -> job
        self._results: list[Any] = []  # JobResults not yet handed out
        self._known_cap = known_keys
        self._known: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # Lookups, as vLLM's AsyncLookupManager keeps them: one verdict per
        # key while some request refers to it.
        self._lookups: dict[bytes, _Lookup] = {}
        self._req_keys: dict[str, set[bytes]] = {}
        self._pending_lookups: list[tuple[bytes, int]] = []
        self._probes: dict[int, list[tuple[bytes, int]]] = {}  # batch id -> (key, generation)
        self._generation = 0
        self._polled_since_flush = True
        self._shut_down = False

    # -- set-up ------------------------------------------------------------------------
    def _write_run_config(self) -> None:
        # What vLLM's filesystem tier writes beside its block directory, so that
        # either tier recognises the directory as the same cache.
        path = self.file_mapper.get_config_file_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.file_mapper.get_run_config(), f, indent=2, sort_keys=True)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)

    # -- requests ----------------------------------------------------------------------
    def on_new_request(self, req_context: Any) -> Any:
        return _RequestOffloadingContext()

    def on_request_finished(self, req_context: Any) -> None:
        req_id = req_context.req_id
        for key in self._req_keys.pop(req_id, ()):
            state = self._lookups.get(key)
            if state is None:
                continue
            state.requests.discard(req_id)
            if not state.requests and not state.in_flight:
                del self._lookups[key]

    # -- lookups -----------------------------------------------------------------------
    def lookup(self, key: bytes, req_context: Any) -> Any:
        """HIT or MISS once resolved, RETRY until then (resolved through on_schedule_end)."""
        if self._shut_down:
            return _LookupResult.MISS
        if self._probes and not self._polled_since_flush:
            self._polled_since_flush = True
            self._pump()
        key = bytes(key)
        state = self._lookups.get(key)
        if state is None:
            state = self._new_lookup(key)
            if key in self._known:
                state.result = True
            else:
                self._pending_lookups.append((key, state.generation))
        req_id = req_context.req_id
        state.requests.add(req_id)
        self._req_keys.setdefault(req_id, set()).add(key)
        if state.result is None:
            return _LookupResult.RETRY
        return _LookupResult.HIT if state.result else _LookupResult.MISS

    def _new_lookup(self, key: bytes) -> _Lookup:
        state = self._lookups[key] = _Lookup(self._generation)
        self._generation += 1
        return state

    def on_schedule_end(self, context: Any) -> None:
        """Collect what finished, then check this step's new lookups in one presence batch."""
        if self._shut_down:
            return
        self._pump()
        batch = [(k, g) for k, g in self._pending_lookups
                 if (s := self._lookups.get(k)) is not None and s.generation == g]  # fmt: skip
        self._pending_lookups = []
        if not batch:
            return
        for k, _g in batch:
            self._lookups[k].in_flight = True
        try:
            bid = self._store.submit_contains([k for k, _g in batch])
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            log.warning("kvuring.vllm: presence check of %d keys failed: %s", len(batch), exc)
            self._resolve(batch, [False] * len(batch))
            return
        self._probes[bid] = batch
        self._polled_since_flush = False

    def _resolve(self, batch: list[tuple[bytes, int]], found: Sequence[bool]) -> None:
        for (key, generation), hit in zip(batch, found):
            state = self._lookups.get(key)
            if state is None or state.generation != generation:
                continue
            state.in_flight = False
            if not state.requests:
                del self._lookups[key]
                continue
            if state.result is None:
                state.result = bool(hit)
            if hit:
                self._remember(key)

    def _set_verdicts(self, keys: Iterable[bytes], present: bool, req_id: str | None) -> None:
        """A store or load told us where ``keys`` stand; so do their cached verdicts.

        After a failed load the request that asked gets a MISS verdict even
        without a lookup of its own, so the scheduler does not retry the load.
        """
        for key in keys:
            state = self._lookups.get(key)
            if state is None:
                if present or req_id is None:
                    continue
                state = self._new_lookup(key)
            state.result = present  # a pending or in-flight probe of it is ignored
            if req_id is not None and not present:
                state.requests.add(req_id)
                self._req_keys.setdefault(req_id, set()).add(key)

    def _remember(self, key: bytes) -> None:
        if self._known_cap <= 0:
            return
        known = self._known
        if key in known:
            known.move_to_end(key)
            return
        known[key] = None
        if len(known) > self._known_cap:
            known.popitem(last=False)

    # -- transfers ---------------------------------------------------------------------
    def submit_store(self, job_metadata: Any) -> None:
        """Store the job's chunks; chunks this tier knows are on disk are skipped without I/O."""
        keys = [bytes(k) for k in job_metadata.keys]
        chunk_ids = job_metadata.chunk_ids
        todo = [i for i, k in enumerate(keys) if k not in self._known]
        if not todo and not self._shut_down:
            self._finish_now(job_metadata, keys, True, 0)
            return
        rows = chunk_ids if len(todo) == len(keys) else [int(chunk_ids[i]) for i in todo]
        self._submit(job_metadata, keys, [keys[i] for i in todo], rows, load=False)

    def submit_load(self, job_metadata: Any) -> None:
        """Load the job's chunks into their primary slots."""
        keys = [bytes(k) for k in job_metadata.keys]
        self._submit(job_metadata, keys, keys, job_metadata.chunk_ids, load=True)

    def _submit(
        self, job: Any, keys: list[bytes], send: list[bytes], rows: Any, *, load: bool
    ) -> None:
        req_id = job.req_context.req_id
        if self._shut_down:
            self._finish_now(job, keys, False, 0)
            return
        submit = self._store.submit_get_rows if load else self._store.submit_put_rows
        try:
            bid = submit(send, self._view, rows, row_bytes=self._chunk_bytes)
        except (OSError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            log.warning("kvuring.vllm: job %s (%d chunks) refused: %s", job.job_id, len(keys), exc)
            self._finish_now(job, keys, False, 0)
            if load:
                self._set_verdicts(keys, False, req_id)
            return
        self._jobs[bid] = _Job(job.job_id, load, keys, req_id, time.monotonic(), len(send))

    def _finish_now(self, job: Any, keys: list[bytes], success: bool, blocks: int) -> None:
        if success and not job.is_promotion:
            self._emit_stored(keys)
        self._results.append(_JobResult(job_id=job.job_id, success=success, transfer_time=0.0,
                                        transfer_bytes=blocks * self._chunk_bytes))  # fmt: skip

    def _emit_stored(self, keys: list[bytes]) -> None:
        if self.events is not None:
            self.events.append(_OffloadingEvent(keys=keys, medium=self.medium, removed=False,
                                                locality=self.locality))  # fmt: skip

    # -- completions -------------------------------------------------------------------
    def _pump(self) -> None:
        if not self._shut_down:
            for done in self._store.poll():
                self._finished(done)

    def _finished(self, done: Finished) -> None:
        probe = self._probes.pop(done.id, None)
        if probe is not None:
            self._resolve(probe, done.results)
            return
        job = self._jobs.pop(done.id, None)
        if job is None:
            return
        elapsed = time.monotonic() - job.start
        if done.errors:
            for i, err in done.errors.items():
                log.debug("kvuring.vllm: job %s chunk %d: %s", job.job_id, i, err)
        if job.load:
            self._finished_load(job, done, elapsed)
        else:
            self._finished_store(job, done, elapsed)

    def _finished_store(self, job: _Job, done: Finished, elapsed: float) -> None:
        stored = [k for k, st in zip(done.keys, done.results) if st in _STORED_OK]
        for k in stored:
            self._remember(k)
        self._set_verdicts(stored, True, None)
        success = len(stored) == len(done.keys)
        if success:
            self._emit_stored(job.keys)
        written = sum(st is Status.STORED for st in done.results)
        self._results.append(_JobResult(job_id=job.job_id, success=success, transfer_time=elapsed,
                                        transfer_bytes=written * self._chunk_bytes))  # fmt: skip

    def _finished_load(self, job: _Job, done: Finished, elapsed: float) -> None:
        hits = [st is Status.HIT for st in done.results]
        loaded = [k for k, hit in zip(job.keys, hits) if hit]
        for k in loaded:
            self._remember(k)
        nbytes = len(loaded) * self._chunk_bytes
        if len(loaded) == len(job.keys):
            self._results.append(_JobResult(job_id=job.job_id, success=True,
                                            transfer_time=elapsed, transfer_bytes=nbytes))  # fmt: skip
            return
        failed = [k for k, hit in zip(job.keys, hits) if not hit]
        for k in failed:
            self._known.pop(k, None)
        self._set_verdicts(failed, False, job.req_id)
        self._results.append(_JobResult(job_id=job.job_id, success=False,
                                        successful_keys=tuple(loaded) if loaded else None,
                                        transfer_time=elapsed, transfer_bytes=nbytes))  # fmt: skip

    def get_finished_jobs(self) -> Iterable[Any]:
        """Every job that finished since the last call, one JobResult each; never blocks."""
        self._pump()
        out, self._results = self._results, []
        return out

    def drain_jobs(self) -> None:
        """Block until every submitted job is over; their results come from get_finished_jobs()."""
        if self._shut_down:
            return
        for done in self._store.drain():
            self._finished(done)

    def take_events(self) -> Iterable[Any]:
        if self.events is not None:
            events, self.events = self.events, []
            yield from events

    def shutdown(self) -> None:
        """Finish every transfer in flight, then close the store: after this nothing touches primary memory."""
        if self._shut_down:
            return
        with contextlib.suppress(Exception):
            self.drain_jobs()
        self._shut_down = True
        self._store.close()
        self._probes.clear()
        self._jobs.clear()

    # -- introspection -----------------------------------------------------------------
    _INFO_KEYS = ("kvuring_engine", "kvuring_verify", "kvuring_direct_io", "kvuring_queue_depth")

    @classmethod
    def config_info_keys(cls, tier_config: dict[str, Any]) -> tuple[str, ...]:
        """The labels this tier puts on vLLM's vllm:kv_offload_config_info series."""
        return cls._INFO_KEYS

    def config_info(self) -> dict[str, str | int | float | bool]:
        stats = self._store.stats()
        values = (str(stats["engine"]), self._store.verify, bool(stats["direct_io"]),
                  self._store.queue_depth)  # fmt: skip
        return dict(zip(self._INFO_KEYS, values))

    def stats(self) -> dict[str, Any]:
        """The store's :meth:`~kvuring.PollingStore.stats`, plus the tier's own counts."""
        out = self._store.stats()
        out["tier_jobs_in_flight"] = len(self._jobs)
        out["tier_known_keys"] = len(self._known)
        out["tier_lookups"] = len(self._lookups)
        return out
