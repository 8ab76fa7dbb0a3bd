"""A namespace's filesystem operations, run on an engine of their own: never on the caller's thread.

Opening a namespace makes directories, opens descriptors, registers the
writer, cleans up after dead writers, probes direct I/O and reads or writes
the manifest; closing it unlinks the registry entry and closes the
descriptors.  On a hung mount (FUSE, NFS) any of these can block for as
long as the hang lasts, so none of them is a plain syscall on the event
loop's (or the poller's) thread.  Each is an operation word run by an
:class:`AdminEngine`, a :class:`~kvuring.engine.ThreadRing` of two C threads
per namespace, which also runs the two steps io_uring has no opcode for
(``KVU_OP_FLOCK``, ``KVU_OP_GETDENTS``; kvuring/_csrc/chain.c).

The logic is written once, as *programs*: generators that yield a step (an
:class:`Op`, a tuple of ops to run at once, or a :class:`Sleep`) and receive
its result (an ``int``, as io_uring reports it: a value, or ``-errno``).  Two
drivers run them: :func:`run_async` awaits each step's completion on the
event loop (the engine's eventfd), :func:`run_sync` waits for it with
``select``.  Each step has a deadline; when it passes the driver raises
:class:`TimeoutError` (``ETIMEDOUT``, with the path) and abandons the
operation, which stays in its thread until the kernel lets go: its memory
stays referenced until then, and a descriptor it opens late is closed at
once.  Every descriptor opened through the engine is tracked until closed
through it, so :meth:`AdminEngine.release` can close what a failed or
timed-out program left open.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import struct
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from kvuring import _binding as b
from kvuring._ops import new_words
from kvuring.engine import ThreadRing

T = TypeVar("T")

OP_FLOCK: int = b.lib.KVU_OP_FLOCK
OP_GETDENTS: int = b.lib.KVU_OP_GETDENTS

_U64 = 0xFFFFFFFFFFFFFFFF
#: directories: no symlink in place of the last component
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: openat2 resolve flags for paths inside the namespace: no symlink anywhere, no escape
RESOLVE_INSIDE = b.RESOLVE_BENEATH | b.RESOLVE_NO_SYMLINKS | b.RESOLVE_NO_MAGICLINKS
_READ_CHUNK = 1 << 18


class Op:
    """One operation and everything its words point at, kept until its completion arrives.

    ``fields`` are the operation's words without the user_data: opcode, fd,
    addr, len, offset, arg1, arg2, arg3 (see kvuring/_csrc/kvu.h).
    """

    __slots__ = ("abandoned", "done", "fields", "keep", "opens", "path", "res", "what")

    def __init__(
        self,
        fields: tuple[int, ...],
        what: str,
        path: str,
        keep: tuple[object, ...] = (),
        *,
        opens: bool = False,
    ) -> None:
        self.fields = fields
        self.what = what
        self.path = path
        self.keep = keep
        self.opens = opens
        self.res = 0
        self.done = False
        self.abandoned = False


class Sleep:
    """A pause between two steps (waiting for another process to finish a file)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Step = Op | tuple[Op, ...] | Sleep
Program = Generator[Step, Any, T]


def os_error(res: int, path: str) -> OSError:
    """The OSError (its errno's subclass) for a negative result."""
    return OSError(-res, os.strerror(-res), path)


def _cpath(name: str | bytes) -> Any:
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise ValueError("path contains a NUL byte")
    return b.c_path(raw)


# -- operations -----------------------------------------------------------------------


def mkdirat(dfd: int, name: str | bytes, mode: int, path: str) -> Op:
    p = _cpath(name)
    return Op((b.OP_MKDIRAT, dfd, b.address_of(p), 0, 0, 0, mode, 0), "mkdir", path, (p,))


def openat(dfd: int, name: str | bytes, flags: int, path: str, mode: int = 0) -> Op:
    """Open (a plain descriptor, O_CLOEXEC); ``what`` is "create" with O_CREAT."""
    p = _cpath(name)
    what = "create" if flags & os.O_CREAT else "open"
    fields = (b.OP_OPENAT, dfd, b.address_of(p), 0, 0, flags | os.O_CLOEXEC, mode, 0)
    return Op(fields, what, path, (p,), opens=True)


def openat_inside(dfd: int, name: str | bytes, flags: int, path: str) -> Op:
    """openat2 beneath ``dfd`` with no symlink anywhere on ``name`` (ELOOP, EXDEV otherwise)."""
    p = _cpath(name)
    how = b.ffi.new("struct open_how *")
    how.flags = flags | os.O_CLOEXEC
    how.resolve = RESOLVE_INSIDE
    fields = (b.OP_OPENAT2, dfd, b.address_of(p), 0, 0, 0, b.address_of(how), 0)
    return Op(fields, "open", path, (p, how), opens=True)


def close(fd: int, path: str) -> Op:
    return Op((b.OP_CLOSE, fd, 0, 0, 0, 0, 0, 0), "close", path)


def read(fd: int, buf: Any, length: int, offset: int, path: str) -> Op:
    """Read into ``buf`` (cffi memory, kept with the op); -1 as offset: the file position."""
    fields = (b.OP_READ, fd, b.address_of(buf), length, offset, 0, 0, 0)
    return Op(fields, "read", path, (buf,))


def write(fd: int, data: bytes, offset: int, path: str) -> Op:
    buf = b.ffi.from_buffer(data)
    return Op((b.OP_WRITE, fd, b.address_of(buf), len(data), offset, 0, 0, 0), "write", path,
              (buf, data))  # fmt: skip


def write_buffer(fd: int, buf: Any, length: int, offset: int, path: str) -> Op:
    """Write ``length`` bytes of ``buf`` (a pinned buffer, kept with the op)."""
    fields = (b.OP_WRITE, fd, b.address_of(buf), length, offset, 0, 0, 0)
    return Op(fields, "write", path, (buf,))


def fsync(fd: int, path: str) -> Op:
    return Op((b.OP_FSYNC, fd, 0, 0, 0, 0, 0, 0), "fsync", path)


def renameat(
    old_dfd: int, old: str, new_dfd: int, new: str, flags: int, path: str
) -> Op:  # fmt: skip
    po, pn = _cpath(old), _cpath(new)
    fields = (b.OP_RENAMEAT, old_dfd, b.address_of(po), 0, 0, flags, new_dfd, b.address_of(pn))
    return Op(fields, "rename", path, (po, pn))


def unlinkat(dfd: int, name: str | bytes, path: str) -> Op:
    p = _cpath(name)
    return Op((b.OP_UNLINKAT, dfd, b.address_of(p), 0, 0, 0, 0, 0), "unlink", path, (p,))


def statx(dfd: int, name: str | bytes, flags: int, mask: int, path: str) -> tuple[Op, Any]:
    """The op and the ``struct statx`` it fills."""
    p = _cpath(name)
    buf = b.ffi.new("struct statx *")
    fields = (b.OP_STATX, dfd, b.address_of(p), 0, 0, flags, mask, b.address_of(buf))
    return Op(fields, "statx", path, (p, buf)), buf


def flock(fd: int, operation: int, path: str) -> Op:
    return Op((OP_FLOCK, fd, 0, 0, 0, operation, 0, 0), "flock", path)


def getdents(fd: int, buf: Any, length: int, path: str) -> Op:
    return Op((OP_GETDENTS, fd, b.address_of(buf), length, 0, 0, 0, 0), "list", path, (buf,))


# -- small programs ---------------------------------------------------------------------


def makedirs(path: str, mode: int = 0o755) -> Program[None]:
    """``os.makedirs(path, exist_ok=True)``: each missing level made with mkdirat."""
    res = yield mkdirat(b.AT_FDCWD, path, mode, path)
    if res == -errno.ENOENT:
        parent = os.path.dirname(path)
        if parent and parent != path:
            yield from makedirs(parent, mode)
            res = yield mkdirat(b.AT_FDCWD, path, mode, path)
    if res < 0 and res != -errno.EEXIST:
        raise os_error(res, path)


def read_all(fd: int, path: str, limit: int = 1 << 30) -> Program[bytes]:
    """Everything from offset 0 to the end of the file (at most ``limit`` bytes)."""
    buf = b.ffi.new("char[]", _READ_CHUNK)
    chunks: list[bytes] = []
    offset = 0
    while offset < limit:
        n = yield read(fd, buf, _READ_CHUNK, offset, path)
        if n < 0:
            raise os_error(n, path)
        if n == 0:
            break
        chunks.append(b.ffi.buffer(buf, n)[:])
        offset += n
    return b"".join(chunks)


_DIRENT = struct.Struct("=QqHB")  # struct linux_dirent64, up to d_name
DT_UNKNOWN, DT_REG = 0, 8


def read_dir(fd: int, path: str) -> Program[list[tuple[bytes, int]]]:
    """The (name, d_type) entries of the directory open as ``fd`` (without . and ..)."""
    buf = b.ffi.new("char[]", 1 << 16)
    out: list[tuple[bytes, int]] = []
    while True:
        n = yield getdents(fd, buf, 1 << 16, path)
        if n < 0:
            raise os_error(n, path)
        if n == 0:
            return out
        raw = b.ffi.buffer(buf, n)[:]
        pos = 0
        while pos < n:
            _ino, _off, reclen, dtype = _DIRENT.unpack_from(raw, pos)
            name = raw[pos + _DIRENT.size : pos + reclen].split(b"\0", 1)[0]
            if name not in (b".", b".."):
                out.append((name, dtype))
            pos += reclen


# -- the engine ------------------------------------------------------------------------


class AdminEngine:
    """A small thread engine for one namespace's operations, and what it has open.

    ``fds`` maps every descriptor opened through it (and not yet closed
    through it) to its path.  Not for use from two places at once.
    """

    def __init__(self, threads: int = 2) -> None:
        self.engine = ThreadRing(slots=4, threads=threads)
        self.ops: dict[int, Op] = {}
        self.fds: dict[int, str] = {}
        #: set by release(): a descriptor that opens from now on is closed at once
        self.releasing = False
        self.closed = False
        self._ud = 0

    def fileno(self) -> int:
        return self.engine.fileno()

    def busy(self) -> bool:
        """Operations submitted whose completions have not been reaped."""
        return bool(self.ops)

    def submit(self, ops: Sequence[Op], *, chain: bool = False) -> None:
        """Start ``ops``: independent, or (``chain``) one after another on one thread, hard-linked."""
        words = new_words()
        last = len(ops) - 1
        for i, op in enumerate(ops):
            self._ud += 1
            self.ops[self._ud] = op
            opcode, fd, addr, length, offset, arg1, arg2, arg3 = op.fields
            if opcode == b.OP_CLOSE:
                self.fds.pop(fd, None)
            flags = b.SQE_IO_HARDLINK if chain and i < last else 0
            words.extend((opcode, flags, fd & _U64, addr, length, offset & _U64, self._ud,
                          arg1 & _U64, arg2 & _U64, arg3 & _U64))  # fmt: skip
        try:
            self.engine.submit(words)
        except OSError as exc:  # the threads took none of it (ENOMEM)
            for ud in range(self._ud - last, self._ud + 1):
                self._complete(ud, -(exc.errno or errno.ENOMEM))

    def reap(self) -> None:
        """Take every completion there is and hand each to its op."""
        uds, results = self.engine.reap()
        for ud, res in zip(uds, results):
            self._complete(ud, res)

    def _complete(self, ud: int, res: int) -> None:
        op = self.ops.pop(ud, None)
        if op is None:
            return
        op.res = res
        op.done = True
        if op.opens and res >= 0:
            if op.abandoned or self.releasing:
                self.submit([close(res, op.path)])
            else:
                self.fds[res] = op.path

    def release(self, first: Sequence[Op] = ()) -> None:
        """Run ``first``, then close every descriptor still open (last opened first), in one chain."""
        self.releasing = True
        ops = [*first, *(close(fd, path) for fd, path in reversed(list(self.fds.items())))]
        if ops:
            self.submit(ops, chain=True)

    def close(self) -> bool:
        """Stop the threads; False (and nothing done) while operations are in flight."""
        if self.closed:
            return True
        if self.ops:
            return False
        self.engine.close()
        self.closed = True
        return True


# -- drivers ----------------------------------------------------------------------------


def _timed_out(ops: Sequence[Op], timeout: float) -> TimeoutError:
    """Abandon the ops still in flight; the error naming the first."""
    stuck = [op for op in ops if not op.done]
    _abandon(stuck)
    first = stuck[0]
    return TimeoutError(
        errno.ETIMEDOUT,
        f"{first.what} did not finish within {timeout:g} s (the filesystem may be hung)",
        first.path,
    )


def _ops_of(step: Op | tuple[Op, ...]) -> tuple[Op, ...]:
    return step if isinstance(step, tuple) else (step,)


def _results(step: Op | tuple[Op, ...]) -> Any:
    return tuple(op.res for op in step) if isinstance(step, tuple) else step.res


def wait_sync(admin: AdminEngine, ready: Callable[[], bool], deadline: float | None) -> bool:
    """Reap until ``ready()`` (True) or the deadline passes (False), blocking in select."""
    fd = admin.fileno()
    while True:
        admin.reap()
        if ready():
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        select.select([fd], [], [], left)


async def wait_async(admin: AdminEngine, ready: Callable[[], bool], deadline: float | None) -> bool:
    """As :func:`wait_sync`, awaiting the engine's eventfd on the running loop."""
    loop = asyncio.get_running_loop()
    fd = admin.fileno()
    while True:
        admin.reap()
        if ready():
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        woken: asyncio.Future[None] = loop.create_future()
        wake = _waker(woken)
        loop.add_reader(fd, wake)
        timer = loop.call_later(left, wake) if left is not None else None
        try:
            await woken
        finally:
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()


def _waker(fut: asyncio.Future[None]) -> Callable[[], None]:
    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    return wake


def _all_done(ops: Sequence[Op]) -> Callable[[], bool]:
    return lambda: all(op.done for op in ops)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def run_sync(admin: AdminEngine, program: Program[T], timeout: float | None) -> T:
    """Run ``program`` to its end on this thread; each step within ``timeout`` seconds."""
    send: Any = None
    try:
        while True:
            step = program.send(send)
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                send = None
                continue
            ops = _ops_of(step)
            admin.submit(ops)
            try:
                done = wait_sync(admin, _all_done(ops), _deadline(timeout))
            except BaseException:  # interrupted: the ops finish in their threads
                _abandon(ops)
                raise
            if not done:
                assert timeout is not None
                raise _timed_out(ops, timeout)
            send = _results(step)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        program.close()


async def run_async(admin: AdminEngine, program: Program[T], timeout: float | None) -> T:
    """Run ``program`` to its end, awaiting each step on the running loop."""
    send: Any = None
    try:
        while True:
            step = program.send(send)
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                send = None
                continue
            ops = _ops_of(step)
            admin.submit(ops)
            try:
                done = await wait_async(admin, _all_done(ops), _deadline(timeout))
            except BaseException:  # cancelled: the ops finish in their threads
                _abandon(ops)
                raise
            if not done:
                assert timeout is not None
                raise _timed_out(ops, timeout)
            send = _results(step)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        program.close()


def _abandon(ops: Sequence[Op]) -> None:
    for op in ops:
        if not op.done:
            op.abandoned = True
