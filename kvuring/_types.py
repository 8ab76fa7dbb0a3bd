"""Typing helpers shared by the public modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only type checkers need the Buffer protocol (PEP 688); at run time any
    # object with the buffer protocol is accepted and checked by cffi.
    from typing_extensions import Buffer as Buffer
else:
    Buffer = object
