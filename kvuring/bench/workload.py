"""What every implementation moves: keys, and block buffers carved from one aligned region."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence

import kvuring


def make_key(tag: str, index: int) -> bytes:
    """A 16-byte key that looks like a content hash, so files spread over all directories."""
    return hashlib.blake2b(f"{tag}/{index}".encode(), digest_size=16).digest()


def make_keys(tag: str, count: int) -> list[bytes]:
    return [make_key(tag, i) for i in range(count)]


def warmup_keys(keys: Sequence[bytes], count: int) -> list[bytes]:
    """Keys unlike ``keys`` (derived from the first), for an untimed first pass."""
    return make_keys(f"warmup/{keys[0].hex()}", count) if keys else []


def key_batches(tag: str, size: int) -> Iterator[list[bytes]]:
    """Endless fresh keys, ``size`` at a time (background store streams)."""
    start = 0
    while True:
        yield [make_key(tag, i) for i in range(start, start + size)]
        start += size


class Region:
    """One page-aligned region cut into ``slots`` block-sized memoryviews.

    Allocated and written once before any timing: guest memory faults in
    slowly on first touch, and the writes give the blocks non-zero content.
    """

    def __init__(self, block_size: int, slots: int) -> None:
        self.block_size = block_size
        self._mm = kvuring.aligned_buffer(block_size * slots)
        self._whole = memoryview(self._mm)
        pattern = os.urandom(block_size)
        self.views = [self._whole[i * block_size : (i + 1) * block_size] for i in range(slots)]
        for view in self.views:
            view[:] = pattern

    @property
    def nbytes(self) -> int:
        return self.block_size * len(self.views)

    def slot(self, index: int) -> memoryview:
        return self.views[index % len(self.views)]

    def close(self) -> None:
        for view in self.views:
            view.release()
        self.views = []
        self._whole.release()
        # If something (an engine's registration) still exports the buffer,
        # the mapping goes when the last reference does.
        with contextlib.suppress(BufferError):
            self._mm.close()
