"""Status: the outcome for one block, as every front end reports it."""

from __future__ import annotations

import enum
from typing import Any


class Status(enum.Enum):
    """The outcome for one block."""

    STORED = "stored"  #: put wrote the block
    EXISTS = "exists"  #: put found the block already there and left it alone
    HIT = "hit"  #: get loaded the block and it checked out
    MISS = "miss"  #: get found no block
    CORRUPT = "corrupt"  #: get found a damaged block; it was removed
    FAILED = "failed"  #: an OS error (ENOSPC, EACCES, EIO, ...); see the log and stats()


#: Status by the block core's code (kvuring/_csrc/kvu.h); UNVERIFIED never
#: reaches a caller, PRESENT and ABSENT are a presence check's or a delete's
#: True and False.
STATUS_OF: tuple[Any, ...] = (
    None, Status.STORED, Status.EXISTS, Status.HIT, Status.MISS, Status.CORRUPT, Status.FAILED,
    None, True, False,
)  # fmt: skip
