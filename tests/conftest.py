"""Shared fixtures: every async test runs on both event loops and both engines.

Event loops
    pytest-asyncio (1.4+) parametrizes each ``@pytest.mark.asyncio`` test over
    the loop factories that the ``pytest_asyncio_loop_factories`` hook below
    returns, so test ids gain ``[asyncio-...]`` / ``[uvloop-...]``.  Async
    fixtures run on the same loop as the test.

Engines
    ``pytest_generate_tests`` below adds the ``backend`` fixture (``uring`` /
    ``threads``) to every async test, whether or not the test names it.  The
    fixture also sets ``KVURING_BACKEND``, so code that opens a ring without
    naming a backend gets the engine under test.  A test narrows the choice
    with ``@pytest.mark.parametrize("backend", ["uring"], indirect=True)``.
    Where io_uring is refused (seccomp, ``kernel.io_uring_disabled``), the
    ``uring`` variants are skipped, not failed.

Fixtures for any test module (the store tests use them too)
    ``backend``    the engine name, ``"uring"`` or ``"threads"``
    ``loop_name``  the running loop, ``"asyncio"`` or ``"uvloop"`` (async tests)
    ``ring``       an open :class:`kvuring.aio.AsyncRing` on ``backend``; on
                   teardown it is closed and must have nothing left in flight
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import pytest_asyncio
import uvloop

from kvuring.aio import AsyncRing
from kvuring.engine import open_engine

BACKENDS = ("uring", "threads")

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    """True when the test itself has ``@pytest.mark.parametrize`` over ``name``."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wants_backend = "backend" in metafunc.fixturenames
    if not (inspect.iscoroutinefunction(metafunc.function) or wants_backend):
        return
    if _parametrizes(metafunc, "backend"):
        return
    if not wants_backend:
        # pytest-asyncio adds its loop-factory fixture the same way.
        metafunc.fixturenames.append("backend")
    metafunc.parametrize("backend", BACKENDS, indirect=True)


@functools.cache
def uring_unavailable() -> str | None:
    """Why io_uring cannot be used in this process, or None when it can."""
    try:
        open_engine("uring").close()
    except OSError as exc:
        return str(exc)
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    # Probe before any test runs: a test that switches io_uring off
    # (kernel.io_uring_disabled) must not decide it for the whole session.
    uring_unavailable()


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str = getattr(request, "param", "threads")
    if name == "uring" and (reason := uring_unavailable()) is not None:
        pytest.skip(f"io_uring unavailable here: {reason}")
    monkeypatch.setenv("KVURING_BACKEND", name)
    return name


@pytest_asyncio.fixture
async def loop_name() -> str:
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


@pytest_asyncio.fixture
async def ring(backend: str) -> AsyncIterator[AsyncRing]:
    async with AsyncRing(backend=backend) as opened:
        yield opened
    stats = opened.stats()
    assert stats["in_flight"] == 0, stats
    assert stats["waiting"] == 0, stats
    assert stats["stray_cqes"] == 0, stats
