"""vLLM's FileSystemTierManager and kvuring's KvuringTier on one workload, through vLLM's tier interface.

Run it with a Python that has vLLM (the environment .ci/vllm-env.sh makes)::

    python benchmarks/vllm_tier.py --dir /dev/shm/tierbench --dir /var/tmp/tierbench

Per round, medium and chunk size, each tier (in alternating order) runs a
scheduler loop: every step submits one store job of 32 chunks and polls
get_finished_jobs(), until all chunks are stored; then the same with load
jobs; then lookups of every chunk (32 a step, resolved through
on_schedule_end).  Every step also runs a fixed piece of pure Python on the
scheduler thread, timed, to see how much the tier's transfers slow it down.

Each run is a process of its own.  Reported per tier: chunks/s and GB/s of the store and load phases, the
whole process's CPU seconds per GB (all threads), the CPU the tier's own
calls take on the scheduler thread per GB, and the slowdown of the
scheduler-thread workload during transfers against the same workload with
the tier idle.  vLLM's tier says which I/O path it ran: its C extension
(needs a CUDA build of torch) or its pure-Python fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import vllm.v1.kv_offload.tiering.fs.io as vllm_io
    from vllm_helpers import END, FileSystemTierManager, Primary, ReqContext, job, key, spec

    from kvuring.vllm import KvuringTier

JOB = 32  # chunks per job
SLOTS = 256  # primary slots the chunks cycle through


def _work(n: int = 3000) -> float:
    """The scheduler thread's own Python work for one step; its wall time in seconds."""
    t = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return time.perf_counter() - t


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timed:
    """Wraps a tier: the scheduler-thread CPU of every call it gets."""

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.cpu = 0.0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.tier, name)

        def call(*a: Any, **kw: Any) -> Any:
            t = time.thread_time()
            try:
                out = fn(*a, **kw)
                if name == "get_finished_jobs":
                    out = list(out)
                return out
            finally:
                self.cpu += time.thread_time() - t

        return call


def _make(which: str, root: Path, primary: Primary) -> Any:
    common = {"offloading_spec": spec(), "primary_kv_view": primary.view, "root_dir": str(root)}
    if which == "vllm":
        return FileSystemTierManager(tier_type="fs", **common)
    return KvuringTier(tier_type="KvuringTier", verify=which != "kvuring-raw", **common)


def _phase(tier: Timed, n: int, base: int, load: bool, work_base: float) -> dict[str, float]:
    """One scheduler loop over n chunks: a job of JOB chunks a step, polled each step."""
    t0, c0, s0 = time.perf_counter(), _cpu(), tier.cpu
    pending: set[int] = set()
    slowdowns: list[float] = []
    submitted = failed = 0
    jid = base
    while submitted < n or pending:
        if submitted < n:
            keys = [key(base + submitted + i) for i in range(min(JOB, n - submitted))]
            slots = [(submitted + i) % SLOTS for i in range(len(keys))]
            (tier.submit_load if load else tier.submit_store)(job(jid, keys, slots, load=load))
            pending.add(jid)
            jid += 1
            submitted += len(keys)
        for r in tier.get_finished_jobs():
            pending.discard(r.job_id)
            failed += not r.success
        tier.on_schedule_end(END)
        slowdowns.append(_work() / work_base)
        if submitted >= n and pending:
            time.sleep(0.0002)  # the engine's idle step
    wall, cpu, sched = time.perf_counter() - t0, _cpu() - c0, tier.cpu - s0
    return {"wall": wall, "cpu": cpu, "sched_cpu": sched, "failed": failed,
            "slowdown": statistics.median(slowdowns) - 1.0}  # fmt: skip


def _lookups(tier: Timed, n: int, base: int) -> dict[str, float]:
    t0, s0 = time.perf_counter(), tier.cpu
    hits = 0
    for start in range(0, n, JOB):
        ctx = ReqContext(f"look-{base}-{start}")
        keys = [key(base + start + i) for i in range(min(JOB, n - start))]
        while True:
            got = [tier.lookup(k, ctx) for k in keys]
            if all(g.name != "RETRY" for g in got):
                break
            tier.on_schedule_end(END)
            time.sleep(0.0002)
        hits += sum(g.name == "HIT" for g in got)
        tier.on_request_finished(ctx)
    return {"wall": time.perf_counter() - t0, "sched_cpu": tier.cpu - s0, "hits": hits}


def run_one(which: str, root: Path, chunk: int, total_bytes: int, base: int) -> dict[str, Any]:
    n = max(JOB, total_bytes // chunk)
    primary = Primary(SLOTS, chunk)
    primary.fill(base)
    root.mkdir(parents=True, exist_ok=True)
    work_base = statistics.median(_work() for _ in range(200))
    tier = Timed(_make(which, root, primary))
    try:
        store = _phase(tier, n, base, False, work_base)
        load = _phase(tier, n, base, True, work_base)
        look = _lookups(tier, n, base)
        engine = tier.tier.stats()["engine"] if which != "vllm" else None
    finally:
        tier.tier.shutdown()
    gb = n * chunk / 1e9
    return {
        "tier": which, "chunk": chunk, "chunks": n, "dir": str(root.parent),
        "store_chunks_s": n / store["wall"], "store_gb_s": gb / store["wall"],
        "store_cpu_s_gb": store["cpu"] / gb, "store_sched_cpu_s_gb": store["sched_cpu"] / gb,
        "store_slowdown": store["slowdown"], "store_failed": store["failed"],
        "load_chunks_s": n / load["wall"], "load_gb_s": gb / load["wall"],
        "load_cpu_s_gb": load["cpu"] / gb, "load_sched_cpu_s_gb": load["sched_cpu"] / gb,
        "load_slowdown": load["slowdown"], "load_failed": load["failed"],
        "lookups_s": n / look["wall"], "lookup_hits": look["hits"],
        "lookup_sched_cpu_us": 1e6 * look["sched_cpu"] / n,
        "path": ("C extension" if vllm_io._HAS_FSIO_C else "pure Python")
        if which == "vllm"
        else f"{engine} engine",
    }  # fmt: skip


COLUMNS = [
    ("store_chunks_s", "stores/s", "{:,.0f}"), ("store_gb_s", "GB/s", "{:.2f}"),
    ("store_cpu_s_gb", "CPU s/GB", "{:.2f}"), ("store_sched_cpu_s_gb", "sched CPU s/GB", "{:.3f}"),
    ("store_slowdown", "slowdown", "{:+.0%}"),
    ("load_chunks_s", "loads/s", "{:,.0f}"), ("load_gb_s", "GB/s", "{:.2f}"),
    ("load_cpu_s_gb", "CPU s/GB", "{:.2f}"), ("load_sched_cpu_s_gb", "sched CPU s/GB", "{:.3f}"),
    ("load_slowdown", "slowdown", "{:+.0%}"),
    ("lookups_s", "lookups/s", "{:,.0f}"),
]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dir"], r["chunk"], r["tier"]), []).append(r)
    head = "| medium | chunk | tier (path) | " + " | ".join(c[1] for c in COLUMNS) + " |"
    out = [head, "|" + "---|" * 3 + "--:|" * len(COLUMNS)]
    for (d, chunk, tier), rs in groups.items():
        med = {c: statistics.median(r[c] for r in rs) for c, _, _ in COLUMNS}
        cells = [fmt.format(med[c]) for c, _, fmt in COLUMNS]
        size = f"{chunk >> 20} MiB" if chunk >= 1 << 20 else f"{chunk >> 10} KiB"
        out.append(f"| {d} | {size} | {tier} ({rs[0]['path']}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", action="append", type=Path, help="a directory per medium (repeat)")
    ap.add_argument(
        "--chunk", action="append", type=int, help="chunk bytes (repeat); default 64 KiB and 2 MiB"
    )
    ap.add_argument("--mib", type=int, default=256, help="MiB per phase and run (default 256)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiers", default="vllm,kvuring,kvuring-raw",
                    help="vllm, kvuring (verify=True), kvuring-raw (verify=False)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    ap.add_argument(
        "--one", help=argparse.SUPPRESS
    )  # TIER,ROOT,CHUNK,BYTES,BASE: one run, JSON out
    a = ap.parse_args(argv)
    if a.one:
        which, root, chunk, nbytes, first = a.one.split(",")
        print(json.dumps(run_one(which, Path(root), int(chunk), int(nbytes), int(first))))
        return 0
    dirs = a.dir or [Path("/dev/shm/kvuring-tierbench"), Path("bench-results/tierbench")]
    chunks = a.chunk or [64 << 10, 2 << 20]
    rows: list[dict[str, Any]] = []
    base = 0
    for rnd in range(a.rounds):
        for d in dirs:
            for chunk in chunks:
                tiers = a.tiers.split(",")
                order = tiers if rnd % 2 == 0 else tiers[::-1]
                for which in order:
                    base += 1 << 24
                    root = d / f"{which}-{rnd}-{chunk}"
                    # each run in a process of its own: one tier's leftovers (memory,
                    # libraries) must not bill the next
                    one = f"{which},{root},{chunk},{a.mib << 20},{base}"
                    try:
                        out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--one", one],
                                             check=True, capture_output=True, text=True).stdout  # fmt: skip
                    finally:
                        shutil.rmtree(root, ignore_errors=True)
                    r = json.loads(out.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"round {rnd} {d} {chunk} {which}: stores {r['store_chunks_s']:,.0f}/s "
                          f"loads {r['load_chunks_s']:,.0f}/s", file=sys.stderr, flush=True)  # fmt: skip
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
