"""Gather concurrent calls into rounds run on one thread.

A call submits its work and waits. The round loop takes the oldest work waiting, waits up to
`window_s` for more when the round is not full, takes work (oldest first) until the next item
would bring the round past `max_weight` (at least one item), and runs `run_round` on its single
thread: torch runs on that thread only. Work whose caller has gone is dropped before a round
starts; a round that raises fails each of its calls with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger("imagegen.evaluator")

Work = TypeVar("Work")
Result = TypeVar("Result")


class Batcher(Generic[Work, Result]):
    def __init__(
        self,
        run_round: Callable[[Sequence[Work]], Sequence[Result]],
        weight: Callable[[Work], int],
        window_s: float,
        max_weight: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self._run_round = run_round
        self._weight = weight
        self._window = window_s
        self._max_weight = max_weight
        self._executor = executor
        self._waiting: list[tuple[Work, asyncio.Future[Result]]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.rounds = 0  # rounds run: for tests and benchmarks

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._rounds(), name="scoring-rounds")

    async def close(self) -> None:
        """Stops taking rounds; calls still waiting fail with CancelledError."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for _, future in self._waiting:
            future.cancel()
        self._waiting.clear()

    async def submit(self, work: Work) -> Result:
        """The result of `work`, once a round has run it."""
        if self._loop_task is None or self._loop_task.done():
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, future))
        self._wake.set()
        return await future

    async def _rounds(self) -> None:
        while True:
            await self._wake.wait()
            self._drop_abandoned()
            if not self._waiting:
                self._wake.clear()
                continue
            if self._window and self._waiting_weight() < self._max_weight:
                await asyncio.sleep(self._window)  # a short wait for round-mates
                self._drop_abandoned()
            taken = self._take()
            if not self._waiting:
                self._wake.clear()
            if taken:
                await self._run(taken)

    def _drop_abandoned(self) -> None:
        self._waiting = [(w, f) for w, f in self._waiting if not f.done()]

    def _waiting_weight(self) -> int:
        return sum(self._weight(work) for work, _ in self._waiting)

    def _take(self) -> list[tuple[Work, asyncio.Future[Result]]]:
        taken: list[tuple[Work, asyncio.Future[Result]]] = []
        weight = 0
        for work, future in self._waiting:
            if taken and weight + self._weight(work) > self._max_weight:
                break
            taken.append((work, future))
            weight += self._weight(work)
        self._waiting = self._waiting[len(taken) :]
        return taken

    async def _run(self, taken: list[tuple[Work, asyncio.Future[Result]]]) -> None:
        self.rounds += 1
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_round, [work for work, _ in taken]
            )
        except asyncio.CancelledError:  # closing: the round's callers are told, not left waiting
            for _, future in taken:
                future.cancel()
            raise
        except Exception as error:  # handed to every caller of the round
            log.exception("a scoring round failed")
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(taken, results, strict=True):
            if not future.done():
                future.set_result(result)
