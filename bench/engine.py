"""The generator's engine alone (services/generator/engine.py), no mesh: what batching buys, what
the engine costs per step over a bare diffusers call, and how it compares with Ray Serve.

- Throughput: 1, 4 and 16 concurrent single-image requests (tiny-sd, 128x128, 10 steps, each a
  different seed), each client submitting a fixed number back to back, through the engine at
  max_batch 1 (batching off), 4 (the registry's) and 8. Repeats interleave the engines.
- Overhead: one request alone through the engine (max_batch 1) against
  `pipe(prompt, num_inference_steps=..., generator=...)` on the same pipeline folder, alternated.
- The peer users would pick: Ray Serve around the same pipeline, `@serve.batch` at
  max_batch_size 1, 4 and 8 with the engine's batch window, called through its DeploymentHandle
  (no HTTP on either side), under the same load (bench/ray_peer.py). Ray is a bench-only
  dependency in its own virtualenv, .venv-bench (`make bench-deps`; ray[serve] brings uvloop,
  fastapi and more, which uvicorn would pick up in the services' virtualenv), so the peer runs as a
  subprocess that writes JSON. It runs after the engines, not interleaved with them: Ray's idle
  processes would share the cores with the engine's runs.

Every system runs torch at THREADS threads. Figures are medians of the repeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.client import ROOT
from bench.closed_loop import Call, closed_loop, medians
from bench.stats import median
from services.common.torch_compat import prepare_torch, set_torch_threads

THREADS = 2
PARAMS = {"prompt": "a red bicycle leaning on a wall", "width": 128, "height": 128, "steps": 10}
MAX_BATCHES = (1, 4, 8)
BATCH_WINDOW_S = 0.005
# Requests per client, by concurrency.
PER_CLIENT = {1: 16, 4: 8, 16: 4}
QUICK_PER_CLIENT = {1: 6, 4: 3, 16: 2}
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
PEER_TIMEOUT_S = 1800


async def run(quick: bool) -> dict[str, Any]:
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"{PEER_PYTHON} is missing: run `make bench-deps` first")
    repeats = 1 if quick else 5
    per_client = QUICK_PER_CLIENT if quick else PER_CLIENT
    set_torch_threads(THREADS)
    prepare_torch()
    from services.common.models import load_registry
    from services.common.settings import GeneratorSettings

    settings = GeneratorSettings()
    registry = load_registry(settings.model_registry, settings.model_dir)
    model = registry.get("")
    load_before = os.getloadavg()[0]
    engines = await _engine_runs(registry, per_client, repeats, overhead_runs=3 if quick else 9)
    plan = {
        "model_path": model.path,
        "threads": THREADS,
        "params": PARAMS,
        "max_batches": list(MAX_BATCHES),
        "batch_window_s": BATCH_WINDOW_S,
        "per_client": {str(n): count for n, count in per_client.items()},
        "repeats": repeats,
    }
    peer = await _peer_runs(plan)
    systems = {"engine": engines["throughput"], "ray_serve": peer["results"]}
    return {
        "params": PARAMS,
        "model": model.id,
        "threads": THREADS,
        "batch_window_s": BATCH_WINDOW_S,
        "per_client": plan["per_client"],
        "repeats": repeats,
        "load_average_before": load_before,
        "systems": systems,
        "ratios": _ratios(systems),
        "overhead": engines["overhead"],
        "ray_serve": {k: peer[k] for k in ("version", "start_s", "replica_threads")},
    }


async def _engine_runs(
    registry: Any, per_client: dict[int, int], repeats: int, overhead_runs: int
) -> dict[str, Any]:
    from services.common.models import Registry
    from services.generator.engine import Engine

    engines: dict[int, tuple[Engine, Registry]] = {}
    for batch in MAX_BATCHES:
        model = dataclasses.replace(registry.get(""), max_batch=batch)
        variant = Registry(models={model.id: model}, default=model.id)
        engine = Engine(variant, batch_window_s=BATCH_WINDOW_S)
        await engine.start()
        engines[batch] = (engine, variant)
    try:
        overhead = await _overhead(*engines[1], overhead_runs)
        calls = {batch: _engine_call(*pair) for batch, pair in engines.items()}
        for call in calls.values():  # warm-up: every batch shape at 128x128
            await closed_loop(call, max(per_client), 1, first_seed=10**6)
        runs: dict[int, dict[int, list[dict[str, Any]]]] = {
            b: {n: [] for n in per_client} for b in calls
        }
        seed = 0
        for _ in range(repeats):
            for clients, count in per_client.items():
                for batch, call in calls.items():
                    runs[batch][clients].append(
                        await closed_loop(call, clients, count, first_seed=seed)
                    )
                    seed += clients * count
    finally:
        for engine, _ in engines.values():
            engine.close()
    throughput = {
        str(b): {str(n): medians(repeats) for n, repeats in by_level.items()}
        for b, by_level in runs.items()
    }
    return {"throughput": throughput, "overhead": overhead}


def _engine_call(engine: Any, registry: Any) -> Call:
    async def call(seed: int) -> int:
        return int((await _render_one(engine, registry, seed)).batch_size)

    return call


async def _render_one(engine: Any, registry: Any, seed: int) -> Any:
    """One single-image request through the engine, to its Rendered item."""
    from services.common.spec import Spec, resolve
    from services.generator.engine import Rendered

    spec = resolve(
        Spec(
            prompt=str(PARAMS["prompt"]),
            seed=seed,
            num_variants=1,
            width=int(PARAMS["width"]),
            height=int(PARAMS["height"]),
            steps=int(PARAMS["steps"]),
        ),
        registry,
    )
    rendered = None
    async for item in engine.render(spec, threading.Event()):
        if isinstance(item, Rendered):
            rendered = item
    if rendered is None:
        raise RuntimeError("the engine ended a render without an image")
    return rendered


async def _overhead(engine: Any, registry: Any, runs: int) -> dict[str, Any]:
    """One request alone through the engine (max_batch 1) against the bare pipeline call,
    alternated, after two warm-up pairs."""
    import diffusers
    import torch

    steps = int(PARAMS["steps"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(registry.get("").path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    engine_ms: list[float] = []
    bare_ms: list[float] = []
    render_ms: list[float] = []  # the engine's own split: the runner's render, the PNG encode
    encode_ms: list[float] = []
    for seed in range(runs + 2):
        started = time.perf_counter()
        rendered = await _render_one(engine, registry, seed)
        engine_ms.append((time.perf_counter() - started) * 1e3)
        render_ms.append(rendered.render_ms)
        encode_ms.append(rendered.encode_ms)
        started = time.perf_counter()
        pipe(
            str(PARAMS["prompt"]),
            num_inference_steps=steps,
            width=int(PARAMS["width"]),
            height=int(PARAMS["height"]),
            generator=torch.Generator().manual_seed(seed),
        )
        bare_ms.append((time.perf_counter() - started) * 1e3)
    engine_total, bare_total = median(engine_ms[2:]), median(bare_ms[2:])
    return {
        "runs": runs,
        "engine_ms": engine_total,
        "bare_ms": bare_total,
        "engine_ms_per_step": engine_total / steps,
        "bare_ms_per_step": bare_total / steps,
        "overhead_ms_per_step": (engine_total - bare_total) / steps,
        "ratio": engine_total / bare_total,
        "engine_render_ms": median(render_ms[2:]),
        "engine_encode_ms": median(encode_ms[2:]),
    }


async def _peer_runs(plan: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imagegen-ray-peer-") as folder:
        plan_path, out_path, log_path = (Path(folder) / n for n in ("plan", "out", "log"))
        plan_path.write_text(json.dumps(plan))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                str(PEER_PYTHON),
                "-m",
                "bench.ray_peer",
                str(plan_path),
                str(out_path),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
            try:
                code = await asyncio.wait_for(process.wait(), PEER_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
        if code != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            print(tail, file=sys.stderr)
            raise RuntimeError(f"the Ray Serve peer exited with {code}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        return result


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
