"""What the engine benchmark's host processes share: a closed-loop load (`clients` coroutines each
submitting `per_client` requests back to back, each a different seed), and the line protocol the
benchmark drives them with (bench/engine.py, bench/engine_host.py, bench/ray_peer.py). Stdlib and
bench.stats only: the Ray Serve peer imports it from .venv-bench."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from bench.stats import median, percentile

# One image for `seed`; returns how many rows the batch that rendered it held.
Call = Callable[[int], Awaitable[int]]

# What a repeat is summarised by, and a set of repeats by the median of each.
KEYS = ("images_per_s", "p50_ms", "p95_ms", "rows_per_batch")


async def closed_loop(
    call: Call, clients: int, per_client: int, first_seed: int = 0
) -> dict[str, Any]:
    latencies: list[float] = []
    rows: list[int] = []

    async def client(index: int) -> None:
        for i in range(per_client):
            seed = first_seed + index * per_client + i
            started = time.perf_counter()
            rows.append(await call(seed))
            latencies.append((time.perf_counter() - started) * 1e3)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return {
        "images_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        # Mean rows of the batch each image came from: batch-weighted, so 16 full batches of 4
        # read 4.0, and a lone request padded to 4 reads 1.0.
        "rows_per_batch": sum(rows) / len(rows),
        "images": len(latencies),
    }


def medians(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {k: median([r[k] for r in repeats]) for k in KEYS}
    summary["images_per_s_runs"] = [r["images_per_s"] for r in repeats]
    summary["images"] = sum(r["images"] for r in repeats)
    summary["repeats"] = len(repeats)
    return summary


def reply_channel() -> TextIO:
    """The host's stdout, kept for its answers; everything else the process (and any process it
    starts) writes to stdout goes to stderr from here on."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return reply


def send(reply: TextIO, message: dict[str, Any]) -> None:
    reply.write(json.dumps(message) + "\n")
    reply.flush()


async def answer(
    handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], reply: TextIO
) -> None:
    """Answers each JSON line read on stdin with one JSON line, until the end of input."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        send(reply, await handle(json.loads(line)))
