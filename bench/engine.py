"""The generator's engine alone (services/generator/engine.py), no mesh: what batching buys, what
the engine costs per step over a bare diffusers call, and how it compares with Ray Serve.

- Throughput: 1, 4 and 16 concurrent single-image requests (tiny-sd, 128x128, 10 steps, each a
  different seed), each client submitting a fixed number back to back (bench/closed_loop.py),
  through the engine at max_batch 1 (batching off), 4 (the registry's) and 8.
- The peer users would pick, under the same load: Ray Serve around the same pipeline folder,
  `@serve.batch` at max_batch_size 1, 4 and 8 with the engine's batch window, called through its
  DeploymentHandle (no HTTP on either side): bench/ray_peer.py. Ray is a bench-only dependency
  in its own virtualenv, .venv-bench (`make bench-deps`: ray[serve] brings uvloop, fastapi and
  more, which uvicorn would pick up in the services' virtualenv).
- Overhead: one request alone through the engine (max_batch 1) against
  `pipe(prompt, num_inference_steps=..., generator=...)` on the same folder, alternated.

Each system runs in a process of its own, as each Ray Serve replica does (bench/engine_host.py
says why), driven from here over a pipe; this process runs no torch. Runs interleave (every
system once per concurrency per repeat), so load from other work on the machine falls on all
alike; a run during which other processes used more than OTHER_CPU_LIMIT of a core is run again
(the results count those). Every system runs torch at THREADS threads, at the same priority.
Figures are medians of the repeats.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psutil

from bench.client import ROOT
from bench.closed_loop import medians
from bench.stats import median

THREADS = 2
PARAMS = {"prompt": "a red bicycle leaning on a wall", "width": 128, "height": 128, "steps": 10}
MAX_BATCHES = (1, 4, 8)
BATCH_WINDOW_S = 0.005
# Requests per client, by concurrency.
PER_CLIENT = {1: 16, 4: 8, 16: 4}
QUICK_PER_CLIENT = {1: 6, 4: 3, 16: 2}
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
ANSWER_TIMEOUT_S = 300  # for one answer of a host
# A run during which processes outside this benchmark used more CPU than this (in cores) is run
# again, up to RETRIES times: on 2 cores, one busy process elsewhere stalls torch's 2 threads.
OTHER_CPU_LIMIT = 0.1
RETRIES = 2


async def run(quick: bool) -> dict[str, Any]:
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"{PEER_PYTHON} is missing: run `make bench-deps` first")
    from services.common.models import load_registry
    from services.common.settings import GeneratorSettings

    settings = GeneratorSettings()
    model = load_registry(settings.model_registry, settings.model_dir).get("")
    repeats = 1 if quick else 5
    per_client = QUICK_PER_CLIENT if quick else PER_CLIENT
    plan = {
        "model_path": model.path,
        "threads": THREADS,
        "params": PARAMS,
        "max_batches": list(MAX_BATCHES),
        "batch_window_s": BATCH_WINDOW_S,
        "max_clients": max(per_client),
    }
    load_before = os.getloadavg()[0]
    runs: dict[str, dict[int, dict[int, list[dict[str, Any]]]]] = {
        system: {b: {n: [] for n in per_client} for b in MAX_BATCHES}
        for system in ("engine", "ray_serve")
    }
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-engine-") as folder:
        plan_path = Path(folder) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        async with AsyncExitStack() as stack:
            # Ray first and alone, so that its start time is its own.
            peer = await stack.enter_async_context(
                _Host(folder, "ray-peer", PEER_PYTHON, "bench.ray_peer", str(plan_path))
            )
            engines = {
                b: await stack.enter_async_context(
                    _Host(
                        folder,
                        f"engine-{b}",
                        sys.executable,
                        "bench.engine_host",
                        str(plan_path),
                        "engine",
                        str(b),
                    )
                )
                for b in MAX_BATCHES
            }
            bare = await stack.enter_async_context(
                _Host(folder, "bare", sys.executable, "bench.engine_host", str(plan_path), "bare")
            )
            overhead = await _overhead(engines[1], bare, runs=3 if quick else 9)
            seed = 0
            for _ in range(repeats):
                for clients, count in per_client.items():
                    for batch in MAX_BATCHES:
                        load = {"clients": clients, "per_client": count, "first_seed": seed}
                        engine_run = await _run(engines[batch], {"op": "load", **load})
                        runs["engine"][batch][clients].append(engine_run)
                        peer_run = await _run(peer, {"batch": batch, **load})
                        runs["ray_serve"][batch][clients].append(peer_run)
                        seed += clients * count
    every = [
        r
        for by_batch in runs.values()
        for by_level in by_batch.values()
        for rs in by_level.values()
        for r in rs
    ]
    systems = {
        system: {
            str(b): {str(n): medians(repeats) for n, repeats in by_level.items()}
            for b, by_level in by_batch.items()
        }
        for system, by_batch in runs.items()
    }
    return {
        "params": PARAMS,
        "model": model.id,
        "threads": THREADS,
        "batch_window_s": BATCH_WINDOW_S,
        "per_client": {str(n): count for n, count in per_client.items()},
        "repeats": repeats,
        "load_average": [load_before, os.getloadavg()[0]],
        "other_cpu_limit": OTHER_CPU_LIMIT,
        "runs": len(every),
        "runs_redone": sum(r["attempts"] > 1 for r in every),
        "runs_disturbed": sum(
            r["attempts"] > RETRIES and r["other_cpu"] > OTHER_CPU_LIMIT for r in every
        ),
        "systems": systems,
        "ratios": _ratios(systems),
        "overhead": overhead,
        "ray_serve": peer.info,
    }


async def _overhead(engine: _Host, bare: _Host, runs: int) -> dict[str, Any]:
    """One request alone through the engine (max_batch 1) against the bare pipeline call,
    alternated, after two warm-up pairs."""
    steps = int(PARAMS["steps"])
    pairs = [
        (
            await _run(engine, {"op": "one", "seed": seed}),
            await _run(bare, {"op": "one", "seed": seed}),
        )
        for seed in range(runs + 2)
    ][2:]
    engine_ms = median([e["ms"] for e, _ in pairs])
    bare_ms = median([b["ms"] for _, b in pairs])
    return {
        "runs": runs,
        "engine_ms": engine_ms,
        "bare_ms": bare_ms,
        "engine_ms_per_step": engine_ms / steps,
        "bare_ms_per_step": bare_ms / steps,
        "overhead_ms_per_step": (engine_ms - bare_ms) / steps,
        "ratio": engine_ms / bare_ms,
        "engine_render_ms": median([e["render_ms"] for e, _ in pairs]),
        "engine_encode_ms": median([e["encode_ms"] for e, _ in pairs]),
    }


async def _run(host: _Host, command: dict[str, Any]) -> dict[str, Any]:
    """One run, again (up to RETRIES times) while other processes disturb it."""
    attempts = 0
    while True:
        attempts += 1
        started, other_before = time.perf_counter(), _other_cpu_s()
        result: dict[str, Any] = await host.ask(command)
        wall = time.perf_counter() - started
        other = _other_cpu_s() - other_before
        # Three clock ticks of slack: CPU times are counted in 10 ms ticks, process by process.
        if other <= OTHER_CPU_LIMIT * wall + 0.03 or attempts > RETRIES:
            return {**result, "other_cpu": other / wall, "attempts": attempts}


def _other_cpu_s() -> float:
    """CPU seconds the machine has spent outside this process and its descendants (the hosts,
    Ray's processes), since boot; a descendant that has ended counts in its parent's children
    times."""
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    ours = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            t = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        ours += t.user + t.system + t.children_user + t.children_system
    return busy + machine.steal - ours


class _Host:
    """A system under test in its own process (bench/engine_host.py, bench/ray_peer.py): started
    on entry, ready once it says so (`info` holds what it said before that), one JSON line per
    `ask`, stopped by closing its input on exit. Its output goes to a log, shown if it fails."""

    def __init__(self, folder: str, name: str, python: Path | str, *args: str) -> None:
        self._command = [str(python), "-m", *args]
        self._log = Path(folder) / f"{name}.log"
        self._process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    async def __aenter__(self) -> _Host:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),  # .venv-bench has no .pth for the project
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_worker_niceness": "0",  # Ray starts its workers at nice 15; the engine runs at 0
        }
        with self._log.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self._command,
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        try:
            while not (answer := await self._answer()).get("ready"):
                self.info.update(answer)
        except BaseException:
            await self._stop(timeout_s=20)
            raise
        return self

    async def ask(self, command: dict[str, Any]) -> Any:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(command) + "\n").encode())
        await self._process.stdin.drain()
        return await self._answer()

    async def _answer(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), ANSWER_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            print(self._log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise RuntimeError(f"{' '.join(self._command)} stopped answering; its log is above")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def __aexit__(self, *exc: object) -> None:
        await self._stop(timeout_s=60)

    async def _stop(self, timeout_s: float) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        process.stdin.close()  # end of input: the host stops (Ray shut down) and exits
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()


def _ratios(systems: dict[str, Any]) -> dict[str, Any]:
    """Ratios of median images/s: batching on / off, engine / Ray Serve at the same max batch,
    and each system's best max batch against the other's."""

    def rate(system: str, batch: int, level: str) -> float:
        return float(systems[system][str(batch)][level]["images_per_s"])

    levels = list(systems["engine"]["1"])
    on = [b for b in MAX_BATCHES if b > 1]
    return {
        "batching": {
            system: {
                str(b): {n: rate(system, b, n) / rate(system, 1, n) for n in levels} for b in on
            }
            for system in systems
        },
        "engine_vs_ray_serve": {
            str(b): {n: rate("engine", b, n) / rate("ray_serve", b, n) for n in levels}
            for b in MAX_BATCHES
        },
        "best_vs_best": {
            n: max(rate("engine", b, n) for b in MAX_BATCHES)
            / max(rate("ray_serve", b, n) for b in MAX_BATCHES)
            for n in levels
        },
    }
