"""One system of the engine benchmark (bench/engine.py) in a process of its own: the engine at one
max_batch, or the bare diffusers pipeline.

`python -m bench.engine_host PLAN.json engine 4` (or `PLAN.json bare`) loads and warms up,
answers `{"ready": true}`, then answers each JSON line read on stdin (bench/closed_loop.py):
- `{"op": "load", "clients", "per_client", "first_seed"}`: a closed-loop run (the engine only);
- `{"op": "one", "seed"}`: one request alone, its wall time (the engine adds its own split).

A process each, as Ray Serve gives each replica one: once a second thread of a process has run
torch's CPU ops, every later op in that process runs slower (torch's OpenMP worker threads go to
sleep between parallel regions; on 2 cores the same pipe() call goes from ~110 ms to ~280 ms, in
either thread, for good). The engine runs torch on its one device thread; three engines in one
process, or a bare call on the main thread next to one, would measure that instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from bench.closed_loop import answer, closed_loop, reply_channel, send
from services.common.torch_compat import prepare_torch, set_torch_threads


async def engine_host(plan: dict[str, Any], max_batch: int, reply: TextIO) -> None:
    from services.common.models import Registry, load_registry
    from services.common.settings import GeneratorSettings
    from services.common.spec import Spec, resolve
    from services.generator.engine import Engine, Rendered

    settings = GeneratorSettings()
    model = load_registry(settings.model_registry, settings.model_dir).get("")
    model = dataclasses.replace(model, max_batch=max_batch, batch_pixels=0)
    registry = Registry(models={model.id: model}, default=model.id)
    params = plan["params"]

    async def render_one(seed: int) -> Rendered:
        spec = Spec(
            prompt=params["prompt"],
            seed=seed,
            num_variants=1,
            width=params["width"],
            height=params["height"],
            steps=params["steps"],
        )
        rendered = None
        async for item in engine.render(resolve(spec, registry), threading.Event()):
            if isinstance(item, Rendered):
                rendered = item
        if rendered is None:
            raise RuntimeError("the engine ended a render without an image")
        return rendered

    async def call(seed: int) -> int:
        return (await render_one(seed)).batch_size

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] == "load":
            return await closed_loop(
                call, command["clients"], command["per_client"], command["first_seed"]
            )
        started = time.perf_counter()
        rendered = await render_one(command["seed"])
        return {
            "ms": (time.perf_counter() - started) * 1e3,
            "render_ms": rendered.render_ms,
            "encode_ms": rendered.encode_ms,
        }

    engine = Engine(registry, batch_window_s=plan["batch_window_s"])
    try:
        await engine.start()
        await closed_loop(call, plan["max_clients"], 1, first_seed=10**6)  # this size, this batch
        send(reply, {"ready": True})
        await answer(handle, reply)
    finally:
        engine.close()


async def bare_host(plan: dict[str, Any], reply: TextIO) -> None:
    """The pipeline called as its documentation shows, on this process's only torch thread."""
    import diffusers
    import torch

    params = plan["params"]
    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.DiffusionPipeline.from_pretrained(plan["model_path"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        pipe(
            params["prompt"],
            num_inference_steps=params["steps"],
            width=params["width"],
            height=params["height"],
            generator=torch.Generator().manual_seed(command["seed"]),
        )
        return {"ms": (time.perf_counter() - started) * 1e3}

    await handle({"seed": 10**6})  # first-call costs
    send(reply, {"ready": True})
    await answer(handle, reply)


def main(plan_path: Path, mode: str, max_batch: int) -> None:
    reply = reply_channel()
    plan = json.loads(plan_path.read_text())
    set_torch_threads(plan["threads"])
    prepare_torch()
    if mode == "engine":
        asyncio.run(engine_host(plan, max_batch, reply))
    else:
        asyncio.run(bare_host(plan, reply))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
