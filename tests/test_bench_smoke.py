"""The benchmark runs end to end at tiny sizes and writes its three reports.

Numbers are never checked: on a shared CI machine they mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import kvuring
from kvuring.cli import main

FIGURE_KEYS = {
    "impl",
    "block_size",
    "op",
    "gb_per_s",
    "blocks_per_s",
    "cpu_s_per_gb",
    "errors",
    "rounds",
}
LATENCY_KEYS = {"count", "p50_ms", "p99_ms", "max_ms", "errors"}


def _expected_impls() -> set[str]:
    impls = {"kvuring-threads", "seed-pool"}
    if kvuring.backend_info()["engine"] == "uring":
        impls.add("kvuring-asyncio")
        if importlib.util.find_spec("uvloop") is not None:
            impls.add("kvuring-uvloop")
    if shutil.which("fio"):
        impls.add("fio")
    return impls


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    status = main(["bench", "--smoke", "--dir", str(data), "--out", str(out)])
    assert status == 0

    result = json.loads((out / "results.json").read_text())
    assert {
        "schema",
        "machine",
        "config",
        "impls",
        "unavailable",
        "results",
        "latency",
        "targets",
    } <= result.keys()
    assert {"nproc", "kernel", "filesystem", "python", "kvuring_engine"} <= result["machine"].keys()
    expected = _expected_impls()
    assert expected <= set(result["impls"]), result["unavailable"]

    rows = {(r["impl"], r["op"]): r for r in result["results"]}
    for impl in expected:
        for op in ("store", "load"):
            assert rows[(impl, op)].keys() >= FIGURE_KEYS
            assert rows[(impl, op)]["block_size"] == 64 * 1024
    assert rows[("kvuring-threads", "store")]["vs_pool"] is not None

    latency = result["latency"]["impls"]
    assert expected - {"fio"} <= latency.keys()
    for row in latency.values():
        assert row.keys() >= LATENCY_KEYS

    assert result["targets"] and all("results" in t for t in result["targets"])
    assert "## kvuring benchmark" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    # The run cleans up after itself unless --keep.
    assert list(data.iterdir()) == []
