"""settle_thread: work on another thread awaited to its end, cancellations held until then, in two loop passes."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import pytest

from kvstore._aio import settle, settle_thread


@pytest.fixture
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


async def test_returns_the_threads_result(pool):
    assert await settle_thread(pool.submit(lambda: 6 * 7)) == 42


async def test_raises_the_threads_error(pool):
    def fail() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await settle_thread(pool.submit(fail))


async def test_a_cancelled_caller_waits_for_the_thread_then_is_cancelled(pool):
    gate, finished = threading.Event(), []

    def work() -> None:
        gate.wait(10)
        finished.append(True)

    task = asyncio.ensure_future(settle_thread(pool.submit(work)))
    await asyncio.sleep(0.01)
    for _ in range(3):  # every cancellation is held until the thread ends
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]


async def test_work_already_done_returns_without_a_loop_pass(pool):
    work = pool.submit(lambda: "ready")
    work.result()
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    asyncio.get_running_loop().call_soon(tick)
    assert await settle_thread(work) == "ready"
    assert ticks == 0


async def _passes_after_the_thread_ends(wait: Callable[[Any], Awaitable[Any]], pool: ThreadPoolExecutor) -> int:
    """Loop passes from the thread's end to the caller's wake-up: a ticker counts passes while the loop is held
    (in a callback) until the thread has ended and posted its wake-up."""
    loop = asyncio.get_running_loop()
    gate, posted = threading.Event(), threading.Event()
    ticks, woke = 0, []

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if not woke:
            loop.call_soon(tick)

    def hold() -> None:  # the thread ends and its wake-up is queued while the loop is busy here
        nonlocal ticks
        work.add_done_callback(lambda _: posted.set())  # runs after the wake-up's own callback
        gate.set()
        posted.wait(10)
        ticks = 0
        loop.call_soon(tick)

    work = pool.submit(gate.wait, 10)
    loop.call_soon(hold)
    await wait(work)
    woke.append(ticks)
    return ticks + 1  # the passes that ticked, then the caller's own


async def test_the_caller_wakes_two_loop_passes_after_the_thread_ends(pool):
    fast = await _passes_after_the_thread_ends(settle_thread, pool)
    slow = await _passes_after_the_thread_ends(lambda w: settle(asyncio.wrap_future(w)), pool)
    assert fast == 2 < slow
