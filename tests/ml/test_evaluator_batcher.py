"""The evaluator's batcher: concurrent work shares rounds on one thread, oldest first, within the
round's weight; a failing round fails each of its callers; abandoned work is not run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.evaluator.batcher import Batcher


class Rounds:
    """A round function that records what each round held and on which thread it ran."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.threads: set[int] = set()
        self.fail = False

    def __call__(self, works: Sequence[int]) -> list[int]:
        self.rounds.append(list(works))
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("the round broke")
        return [work * 10 for work in works]


@pytest.fixture
async def rounds() -> AsyncIterator[tuple[Batcher[int, int], Rounds]]:
    record = Rounds()
    executor = ThreadPoolExecutor(max_workers=1)
    batcher: Batcher[int, int] = Batcher(record, lambda w: w, 0.05, 10, executor)
    batcher.start()
    yield batcher, record
    await batcher.close()
    executor.shutdown()


async def test_concurrent_work_shares_a_round_and_gets_its_own_result(
    rounds: tuple[Batcher[int, int], Rounds],
) -> None:
    batcher, record = rounds
    results = await asyncio.gather(*(batcher.submit(w) for w in (1, 2, 3)))
    assert results == [10, 20, 30]
    assert record.rounds == [[1, 2, 3]]
    assert len(record.threads) == 1 and threading.get_ident() not in record.threads


async def test_rounds_take_the_oldest_work_up_to_the_weight_and_never_split_a_call(
    rounds: tuple[Batcher[int, int], Rounds],
) -> None:
    batcher, record = rounds
    await asyncio.gather(*(batcher.submit(w) for w in (4, 5, 3, 12, 1)))
    assert record.rounds == [[4, 5], [3], [12], [1]]


async def test_a_failing_round_fails_each_of_its_callers(
    rounds: tuple[Batcher[int, int], Rounds],
) -> None:
    batcher, record = rounds
    record.fail = True
    results = await asyncio.gather(*(batcher.submit(w) for w in (1, 2)), return_exceptions=True)
    assert [str(r) for r in results] == ["the round broke", "the round broke"]
    record.fail = False
    assert await batcher.submit(3) == 30


async def test_work_whose_caller_has_gone_is_not_run(
    rounds: tuple[Batcher[int, int], Rounds],
) -> None:
    batcher, record = rounds
    gone = asyncio.create_task(batcher.submit(7))
    await asyncio.sleep(0)
    gone.cancel()
    assert await batcher.submit(2) == 20
    assert record.rounds == [[2]]
