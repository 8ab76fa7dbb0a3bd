"""Operations as words: how Python hands a batch of SQEs to C in one call.

An operation is ``OP_WORDS`` unsigned 64-bit words appended to an
``array('Q')`` with a single ``extend``; ``kvu_engine_submit`` (C) splits the
whole array into chains and hands them to the ring or to the thread engine's
workers, which run the same words with plain syscalls.  Word layout (see
kvuring/_csrc/kvu.h):

    0 opcode  1 sqe flags  2 fd/slot/dirfd  3 addr  4 len  5 offset
    6 user_data  7 arg1  8 arg2  9 arg3
"""

from __future__ import annotations

from array import array


def new_words() -> array[int]:
    return array("Q")
