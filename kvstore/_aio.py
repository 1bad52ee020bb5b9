"""Small asyncio helpers shared by the transfer and API layers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence, TypeVar

T = TypeVar("T")


async def settle(aw: Awaitable[T]) -> T:
    """Await ``aw`` to the end even if the caller is cancelled meanwhile, then re-raise the cancellation.

    Used around work that owns buffers or slots (a copy, a disk read): it must finish before its
    bookkeeping is rolled back or committed.
    """
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    return result


async def settle_thread(work: "concurrent.futures.Future[T]") -> T:
    """Await work done on another thread, to its end even if the caller is cancelled meanwhile (then re-raise
    the cancellation), as :func:`settle` does.

    Its end reaches the caller in two passes of the event loop (the thread's wake-up sets a future of this
    loop; the caller's task runs), against three for ``settle(loop.run_in_executor(...))`` (the thread's
    future, then ``shield``'s, then the task): on a busy loop each pass waits behind the callbacks queued
    before it, so a step that waits for the GPU resumes sooner.
    """
    loop = asyncio.get_running_loop()
    waiting: list["asyncio.Future[None]"] = [loop.create_future()]

    def wake() -> None:  # on the loop's thread: wakes whichever future the caller waits on now
        if not waiting[0].done():
            waiting[0].set_result(None)

    work.add_done_callback(lambda _: loop.call_soon_threadsafe(wake))
    cancelled = False
    while not work.done():
        try:
            await waiting[0]
        except asyncio.CancelledError:
            cancelled = True
            waiting[0] = loop.create_future()
    if cancelled:
        raise asyncio.CancelledError()
    return work.result()


async def wait_through(futures: "Sequence[asyncio.Future[Any]]") -> int:
    """Wait until every one of ``futures`` is done, whatever cancellations arrive meanwhile (they do not
    reach the futures); returns how many arrived, for the caller to re-raise or withdraw."""
    cancels = 0
    while not all(f.done() for f in futures):
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            cancels += 1
    return cancels


def thread_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are all started now (blocking briefly).

    ThreadPoolExecutor starts threads lazily on submit, and starting a thread waits for it to run:
    under load that stalls the submitting thread (the event loop) for milliseconds per thread.
    """
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers)
    for f in [pool.submit(barrier.wait) for _ in range(workers)]:
        f.result()
    return pool


class Gate:
    """Many shared holders or one exclusive holder; a waiting exclusive holder blocks new shared ones.

    Releasing is synchronous, so it cannot be lost to a cancellation inside a ``finally``.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._writers_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    async def acquire_shared(self) -> None:
        await self._wait(lambda: not self._exclusive and self._writers_waiting == 0)
        self._shared += 1

    def release_shared(self) -> None:
        self._shared -= 1
        self._wake()

    async def acquire_exclusive(self) -> None:
        self._writers_waiting += 1
        try:
            await self._wait(lambda: not self._exclusive and self._shared == 0)
        finally:
            self._writers_waiting -= 1
            self._wake()
        self._exclusive = True

    def release_exclusive(self) -> None:
        self._exclusive = False
        self._wake()
