"""Operations as words: how Python hands a batch of SQEs to C in one call.

An operation is ``OP_WORDS`` unsigned 64-bit words appended to an
``array('Q')`` with a single ``extend``; ``kvu_prep_ops`` (C) turns the
whole array into SQEs, and the thread engine's ``kvu_run_chain`` (C) runs the
same words with plain syscalls.  Word layout (see build_uring.py):

    0 opcode  1 sqe flags  2 fd/slot/dirfd  3 addr  4 len  5 offset
    6 user_data  7 arg1  8 arg2  9 arg3
"""

from __future__ import annotations

from array import array

from kvuring._binding import OP_WORDS, SQE_IO_HARDLINK, SQE_IO_LINK

LINKED = SQE_IO_LINK | SQE_IO_HARDLINK


def new_words() -> array[int]:
    return array("Q")


def chain_bounds(words: array[int]) -> list[tuple[int, int]]:
    """Split an operation array into linked chains: (first op, op count) each."""
    n = len(words) // OP_WORDS
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(n):
        if not words[i * OP_WORDS + 1] & LINKED:
            bounds.append((start, i + 1 - start))
            start = i + 1
    if start < n:
        # A chain still open at the end of a batch: the kernel ends it there too.
        bounds.append((start, n - start))
    return bounds
