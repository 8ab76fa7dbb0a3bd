"""The parts of a disk budget that are data, not policy: the arguments, a root's index, the scan.

:class:`RootBudget` is one root's budget and LRU index (key -> file bytes,
oldest first) with its reservations; :func:`scan_namespace` builds an index
from what a namespace holds (run on the capacity worker's thread).  The
policy -- when to evict, the worker thread, mtime bumps -- is
:mod:`kvuring._capacity`.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from kvuring import _blocks as core_api
from kvuring._format import (
    MAX_KEY_BYTES,
    VLLM_GROUP_BYTES,
)

if TYPE_CHECKING:
    from kvuring._capacity import Capacity

log = logging.getLogger("kvuring")

#: evictions bring indexed + reserved bytes down to this share of the budget
LOW_WATER = 0.95
#: seconds between rescans (``KVURING_CAPACITY_RESCAN`` overrides)
RESCAN_SECONDS = 15.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HEX = frozenset("0123456789abcdef")


def check_capacity(capacity_bytes: object, nroots: int = 1) -> list[int] | None:
    """``capacity_bytes``: None (no budget), a positive int (each root's budget), or a list
    or tuple of them, one per root.  Returns the budget of each root."""
    if capacity_bytes is None:
        return None
    if isinstance(capacity_bytes, (list, tuple)):
        if len(capacity_bytes) != nroots:
            raise ValueError(
                f"capacity_bytes: {len(capacity_bytes)} budgets for {nroots} "
                f"root{'s' if nroots != 1 else ''} (give one per root, or one int for each)"
            )
        return [_check_budget(one) for one in capacity_bytes]
    return [_check_budget(capacity_bytes)] * nroots


def _check_budget(capacity_bytes: object) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise TypeError(
            f"capacity_bytes must be an int, a list of ints (one per root) or None, "
            f"not {capacity_bytes!r}"
        )
    if capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
    return int(capacity_bytes)


def rescan_seconds() -> float:
    """The rescan interval: ``KVURING_CAPACITY_RESCAN`` seconds, else RESCAN_SECONDS."""
    text = os.environ.get("KVURING_CAPACITY_RESCAN")
    if not text:
        return RESCAN_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"KVURING_CAPACITY_RESCAN must be seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"KVURING_CAPACITY_RESCAN must be positive, got {text!r}")
    return value


def capacity_stats(capacity: Capacity | None, budgets: list[int] | None) -> dict[str, Any]:
    """The budget's keys of stats() (totals over the roots); ``used_bytes`` is None without a budget."""
    if capacity is None:
        total = sum(budgets) if budgets is not None else None
        return {"capacity_bytes": total, "used_bytes": None, "evicted": 0}
    return capacity.stats()


def capacity_root_stats(
    capacity: Capacity | None, budgets: list[int] | None, root: int
) -> dict[str, Any]:
    """The budget's keys of stats()["roots"][root]."""
    if capacity is None:
        return {"capacity_bytes": budgets[root] if budgets is not None else None,
                "used_bytes": None, "evicted": 0}  # fmt: skip
    return capacity.root_stats(root)


ScanEntry = tuple[int, bytes, int]  # (mtime in ns, key, file bytes)


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and _HEX.issuperset(name)


def _key_of(hexed: str) -> bytes | None:
    """The key whose file name is ``<hexed><suffix>``, or None when kvuring would not name it so."""
    if len(hexed) % 2 or not 2 <= len(hexed) <= 2 * MAX_KEY_BYTES or not _HEX.issuperset(hexed):
        return None
    return bytes.fromhex(hexed)


def scan_namespace(
    ns_fd: int, *, layout: str, suffix: str, file_size: int, stop: Callable[[], bool]
) -> list[ScanEntry] | None:
    """Every block file of the namespace as (mtime ns, key, bytes), oldest first.

    Only names this store's layout gives a key are counted: ``abc/de/<hex><suffix>``
    (``layout='vllm'``: ``abc/de_g<G>/<hash hex>.bin``), regular files, not
    followed through symlinks.  Temp files (``.tmp``) and the registry
    (``.tmp/``) are left out.  Directories that vanish or cannot be read
    are skipped.  None when ``stop()`` turned true meanwhile.
    """
    out: list[ScanEntry] = []
    cut = -len(suffix)
    vllm = layout == "vllm"
    with os.scandir(ns_fd) as top:
        uppers = [e.name for e in top if _is_hex(e.name, 3) and e.is_dir(follow_symlinks=False)]
    for upper in uppers:
        if stop():
            return None
        try:
            ufd = os.open(upper, _DIR_FLAGS, dir_fd=ns_fd)
        except OSError:
            continue
        try:
            with os.scandir(ufd) as mid:
                leaves = [e.name for e in mid if e.is_dir(follow_symlinks=False)]
            for leaf in leaves:
                group = b""
                if vllm:
                    if leaf[2:4] != "_g" or not _is_hex(leaf[:2], 2) or not leaf[4:].isdigit():
                        continue
                    g = int(leaf[4:])
                    if str(g) != leaf[4:] or g >= 1 << 32:
                        continue
                    group = g.to_bytes(VLLM_GROUP_BYTES, "big")
                elif not _is_hex(leaf, 2):
                    continue
                fan = upper + leaf[:2]
                try:
                    lfd = os.open(leaf, _DIR_FLAGS, dir_fd=ufd)
                except OSError:
                    continue
                try:
                    with os.scandir(lfd) as files:
                        for e in files:
                            name = e.name
                            if not name.endswith(suffix):
                                continue
                            hexed = name[:cut]
                            kb = _key_of(hexed)
                            if kb is None or hexed.ljust(5, "0")[:5] != fan:
                                continue
                            if vllm:
                                kb += group
                                if len(kb) > MAX_KEY_BYTES:
                                    continue
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            if stat.S_ISREG(st.st_mode):
                                size = st.st_size
                                out.append(
                                    (st.st_mtime_ns, kb, file_size if size == file_size else size)
                                )
                finally:
                    os.close(lfd)
        except OSError:
            continue
        finally:
            os.close(ufd)
    out.sort(key=itemgetter(0))
    return out


class RootBudget:
    """One root's share: its budget, its index, its reservations and evictions."""

    def __init__(self, number: int, capacity_bytes: int, fd: int) -> None:
        self.number = number
        self.capacity = capacity_bytes
        self.low = int(capacity_bytes * LOW_WATER)
        #: key -> file bytes, least recently used first
        self.index: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.used = 0  # bytes in the index
        self.reserved = 0  # bytes of new keys in put batches in flight, bound for this root
        self.evicting: set[bytes] = set()  # victims whose delete is in flight
        self.evicted = 0
        # What this store did on the root while a scan runs, replayed onto its
        # result: (True, keys) used, (False, keys) gone.  None when no scan runs.
        self.journal: list[tuple[bool, Sequence[bytes]]] | None = None
        self.touched: set[bytes] = set()  # keys bumped (or stored) in the current second
        #: the worker's descriptor of the root's namespace (the store's may close under it)
        self.fd = fd

    def over(self) -> bool:
        return self.used + self.reserved > self.capacity

    def use(self, kbs: Sequence[bytes], size: int) -> None:
        """The blocks are present and were just used: to the young end (added if unknown)."""
        index = self.index
        move = index.move_to_end
        added = 0
        for kb in kbs:
            if kb in index:
                move(kb)
            else:
                index[kb] = size
                added += 1
        self.used += added * size
        if self.journal is not None:
            self.journal.append((True, kbs))

    def gone(self, kbs: Sequence[bytes]) -> None:
        """The blocks are no longer on this root (MISS, CORRUPT, deleted, evicted)."""
        pop = self.index.pop
        freed = 0
        for kb in kbs:
            freed += pop(kb, 0)
        self.used -= freed
        if self.journal is not None:
            self.journal.append((False, kbs))

    def install(
        self, found: collections.OrderedDict[bytes, int] | None, used: int, size: int
    ) -> collections.OrderedDict[bytes, int] | None:
        """A scan's result, with the journal replayed onto it; the old index (None: the scan failed)."""
        journal, self.journal = self.journal, None
        if found is None:
            return None
        old = self.index
        self.index = found
        self.used = used
        self.gone(list(self.evicting))  # deletes in flight that the scan still saw
        for used_now, kbs in journal or ():
            if used_now:
                self.use(kbs, size)
            else:
                self.gone(kbs)
        return old


def _by_root(
    kbs: Sequence[bytes], status: Sequence[int], where: Any
) -> dict[int, tuple[list[bytes], list[int]]]:
    """The blocks grouped by the root they ended on: (keys, statuses) per root."""
    out: dict[int, tuple[list[bytes], list[int]]] = {}
    for i, (kb, st) in enumerate(zip(kbs, status)):
        r = where[i]
        group = out.get(r)
        if group is None:
            out[r] = ([kb], [st])
        else:
            group[0].append(kb)
            group[1].append(st)
    return out


_GONE_HERE = (core_api.MISS, core_api.CORRUPT)
_CORRUPT_ONLY = (core_api.CORRUPT,)
