"""store/batch.py: calls within ``linger`` of each other leave as one, each caller gets its own result."""

from __future__ import annotations

import asyncio

import pytest

from dragoman.store.batch import Batcher


async def test_items_within_the_linger_are_one_run_each_caller_gets_its_own_result() -> None:
    runs: list[tuple[str, list[int]]] = []

    async def run(key: str, items: list[int]) -> list[object]:
        runs.append((key, list(items)))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    b: Batcher[str] = Batcher(run, linger=0.05)
    a, c, bad, other = await asyncio.gather(b.submit("k", 1), b.submit("k", 2), b.submit("k", -1), b.submit("j", 3),
                                            return_exceptions=True)
    assert (a, c, other) == (10, 20, 30)
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"  # raised in its own caller only
    assert sorted(runs) == [("j", [3]), ("k", [1, 2, -1])]
    assert (b.batches, b.items) == (2, 4)


async def test_a_full_batch_leaves_without_waiting_for_its_linger() -> None:
    async def run(key: str, items: list[int]) -> list[int]:
        return items

    b: Batcher[str] = Batcher(run, linger=60, max_items=3)
    assert await asyncio.wait_for(asyncio.gather(*(b.submit("k", i) for i in range(3))), 5) == [0, 1, 2]
    late = asyncio.ensure_future(b.submit("k", 9))  # the next batch waits for its linger...
    await asyncio.sleep(0)
    assert not late.done()
    await b.aclose()  # ...or for the close, which sends it
    assert late.result() == 9


async def test_a_run_that_fails_fails_every_caller_of_its_batch() -> None:
    async def run(key: str, items: list[int]) -> list[int]:
        raise ConnectionError("down")

    b: Batcher[str] = Batcher(run, linger=0.01)
    results = await asyncio.gather(b.submit("k", 1), b.submit("k", 2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_caller_that_stops_waiting_leaves_the_others_their_results() -> None:
    async def run(key: str, items: list[int]) -> list[int]:
        return items

    b: Batcher[str] = Batcher(run, linger=0.05)
    gone = asyncio.ensure_future(b.submit("k", 1))
    kept = asyncio.ensure_future(b.submit("k", 2))
    await asyncio.sleep(0)
    gone.cancel()
    assert await asyncio.wait_for(kept, 5) == 2
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_callbacks_get_their_own_result_and_one_that_raises_leaves_the_others_theirs() -> None:
    async def run(key: str, items: list[int]) -> list[object]:
        return [ValueError("bad") if i < 0 else i for i in items]

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, ctx: reported.append(ctx))
    got: list[tuple[object, object]] = []

    def broken(result: object, exc: BaseException | None) -> None:
        raise RuntimeError("a caller's bug")

    b: Batcher[str] = Batcher(run, linger=60)
    b.submit_then("k", 1, broken)
    b.submit_then("k", 2, lambda r, e: got.append((r, e)))
    b.submit_then("k", -1, lambda r, e: got.append((r, type(e))))
    await b.aclose()
    assert got == [(2, None), (None, ValueError)]
    assert [type(ctx["exception"]) for ctx in reported] == [RuntimeError]
