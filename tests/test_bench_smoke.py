"""The benchmark runs end to end at tiny sizes and writes its three reports.

Numbers are never checked: on a shared CI machine they mean nothing.  Also
here: the C pool program on its own, and the ``kvuring`` command without
the ``bench`` extra (tqdm, matplotlib, uvloop blocked from importing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvuring
from kvuring.bench import check_extras, cpool
from kvuring.bench.config import add_arguments, config_from_args
from kvuring.bench.workload import make_keys
from kvuring.cli import main

needs_cc = pytest.mark.skipif(cpool.compiler() is None, reason="no C compiler (cc) on PATH")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test compiles the C pool afresh (with -Werror), into its own cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


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
    if cpool.compiler() is not None:
        impls.add("cpool")
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
    if "cpool" in expected:
        assert rows[("kvuring-threads", "store")]["vs_cpool"] is not None

    latency = result["latency"]["impls"]
    assert expected - {"fio"} <= latency.keys()
    for row in latency.values():
        assert row.keys() >= LATENCY_KEYS

    assert result["targets"] and all("results" in t for t in result["targets"])
    assert "## kvuring benchmark" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    # The run cleans up after itself unless --keep.
    assert list(data.iterdir()) == []


@needs_cc
def test_bench_smoke_cpool(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    argv = ["bench", "--smoke", "--no-progress", "--impls", "cpool,seed-pool,kvuring-threads"]
    assert main([*argv, "--dir", str(data), "--out", str(out)]) == 0

    result = json.loads((out / "results.json").read_text())
    assert result["unavailable"] == {}
    rows = {(r["impl"], r["op"]): r for r in result["results"]}
    blocks = result["config"]["bytes_per_size"] // (64 * 1024)
    for op in ("store", "load"):
        row = rows[("cpool", op)]
        assert row.keys() >= FIGURE_KEYS
        assert row["errors"] == 0
        assert row["rounds"][0]["blocks"] == blocks
        assert row["vs_pool"] is not None
        assert rows[("seed-pool", op)]["vs_cpool"] is not None
        assert rows[("kvuring-threads", op)]["vs_cpool"] is not None
        (stats,) = result["cpool_stats"][f"64K/{op}"]
        assert stats["threads"] == 16
        assert stats["startup_cpu_s"] == result["cpool_startup_cpu_s"]["65536"][op]
    latency = result["latency"]["impls"]["cpool"]
    assert latency["count"] == result["config"]["latency_requests"]
    assert latency["errors"] == 0 and latency["background_blocks"] > 0
    checks = [t for t in result["targets"] if "C pool" in t["check"]]
    # Only 64 KiB ran: its C pool checks have ratios, the 2 MiB ones none.
    small = [t for t in checks if t["group"].startswith("64 KiB")]
    assert small and all(t["results"]["kvuring-threads"]["ratio"] for t in small)
    md = (out / "results.md").read_text()
    assert "GB/s x C pool" in md and "| 64 KiB | cpool |" in md
    assert list(data.iterdir()) == []


def _block_file(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / name[:3] / name[3:5] / f"{name}.bin"


@needs_cc
def test_cpool_program(tmp_path: Path) -> None:
    exe = cpool.build()
    stamp = os.stat(exe).st_mtime_ns
    assert cpool.build() == exe and os.stat(exe).st_mtime_ns == stamp  # cached

    bs = 64 * 1024
    pool = cpool.CPool(exe, bs, threads=4, slots=8, timeout=60)
    root = tmp_path / "store"
    root.mkdir()
    warm, keys = make_keys("warm", 2), make_keys("keys", 20)
    stored, stats = pool.phase("store", str(root), warm, keys, startup_cpu=0.0)
    assert (stored.blocks, stored.errors, stored.nbytes) == (20, 0, 20 * bs)
    assert stats["threads"] == 4 and stats["process_cpu_s"] >= stats["phase_self_cpu_s"]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files == sorted(_block_file(root, k) for k in [*warm, *keys])
    assert all(p.stat().st_size == bs for p in files)

    loaded, _ = pool.phase("load", str(root), warm, keys, startup_cpu=0.0)
    assert (loaded.blocks, loaded.errors) == (20, 0)
    # Present blocks are skipped, not rewritten.
    inode = _block_file(root, keys[0]).stat().st_ino
    again, _ = pool.phase("store", str(root), warm, keys, startup_cpu=0.0)
    assert again.errors == 0 and _block_file(root, keys[0]).stat().st_ino == inode
    missing, _ = pool.phase("load", str(root), warm, make_keys("absent", 5), startup_cpu=0.0)
    assert (missing.blocks, missing.errors) == (5, 5)
    # A short file fails its load and is removed, as the tier does.
    short = _block_file(root, keys[1])
    os.truncate(short, 4096)
    partial, _ = pool.phase("load", str(root), warm, keys, startup_cpu=0.0)
    assert partial.errors == 1 and not short.exists()

    seconds, errors, bg_blocks = pool.latency(str(root), keys[:4], requests=3, bg_batch=4)
    assert len(seconds) == 3 and errors == 0 and bg_blocks >= 4
    assert not list(root.rglob("*.tmp"))


# --- without the bench extra ------------------------------------------------

EXTRAS = ("tqdm", "matplotlib", "uvloop")
# Runs the kvuring command with the modules named in argv[1] unimportable.
_BLOCKED = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from kvuring.cli import main\n"
    "raise SystemExit(main(sys.argv[2:]))\n"
)


def _kvuring(blocked: tuple[str, ...], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", _BLOCKED, ",".join(blocked), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["info", "--help"], ["info"]])
def test_cli_without_extras(tmp_path: Path, argv: list[str]) -> None:
    proc = _kvuring(EXTRAS, *argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_without_tqdm_names_the_extra(tmp_path: Path) -> None:
    proc = _kvuring(EXTRAS, "bench", "--smoke", "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install 'kvuring[bench]'" in proc.stderr and "--no-progress" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # stopped before making anything


def test_bench_uvloop_named_without_uvloop(tmp_path: Path) -> None:
    argv = ["bench", "--smoke", "--no-progress", "--impls", "kvuring-uvloop"]
    proc = _kvuring(("uvloop",), *argv, "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "uvloop" in proc.stderr and "pip install 'kvuring[bench]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_no_progress_without_extras(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    argv = ["bench", "--smoke", "--no-progress", "--impls", "seed-pool", "--no-latency"]
    proc = _kvuring(EXTRAS, *argv, "--dir", str(data), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no chart (results.png): matplotlib is not installed" in proc.stderr
    assert "png: not written: matplotlib cannot be imported" in proc.stdout
    assert "pip install 'kvuring[bench]'" in proc.stdout
    assert (out / "results.json").is_file() and not (out / "results.png").exists()


def test_default_impls_skip_uvloop_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--smoke", "--dir", str(tmp_path)])
    assert check_extras(config_from_args(args), impls_named=False) is None
    assert "kvuring-uvloop is skipped: uvloop is not installed" in capsys.readouterr().err
