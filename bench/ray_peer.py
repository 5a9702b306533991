"""The Ray Serve peer of the engine benchmark (bench/engine.py): the same diffusers pipeline behind
`@serve.batch`, one replica per batch size, called through its DeploymentHandle (no HTTP), under
the same closed-loop load (bench/closed_loop.py).

It runs in .venv-bench (`make bench-deps`), as a subprocess of the benchmark:
`.venv-bench/bin/python -m bench.ray_peer PLAN.json OUT.json` reads the plan and writes the
results. The deployment is what the Ray Serve batching guide shows: an async batch method that
calls the pipeline once with the batch's prompts and one `torch.Generator` per request, and
returns each request its image (here as PNG bytes, as the engine returns them).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from bench.closed_loop import closed_loop, medians


def peer(plan: dict[str, Any], max_batch: int) -> Any:
    """A deployment class for one batch size (serve.batch takes it at definition time)."""
    params = plan["params"]

    @serve.deployment(
        name=f"peer-b{max_batch}",
        # Above the most requests in flight, so that Serve's router queues none of them.
        max_ongoing_requests=4 * max(int(level) for level in plan["per_client"]),
        # Logical CPUs only (every replica is alive at once): torch's threads are set below.
        ray_actor_options={"num_cpus": 0.5},
    )
    class Peer:
        def __init__(self) -> None:
            from services.common.torch_compat import prepare_torch, set_torch_threads

            prepare_torch()
            set_torch_threads(plan["threads"])
            import diffusers

            diffusers.utils.logging.disable_progress_bar()
            self.pipe = diffusers.DiffusionPipeline.from_pretrained(
                plan["model_path"], local_files_only=True
            )
            self.pipe.set_progress_bar_config(disable=True)

        def threads(self) -> int:
            import torch

            return int(torch.get_num_threads())

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=plan["batch_window_s"])
        async def __call__(self, requests: list[tuple[str, int]]) -> list[tuple[bytes, int]]:
            import torch

            images = self.pipe(
                [prompt for prompt, _ in requests],
                num_inference_steps=params["steps"],
                width=params["width"],
                height=params["height"],
                generator=[torch.Generator().manual_seed(seed) for _, seed in requests],
            ).images
            return [(_png(image), len(requests)) for image in images]

    return Peer


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # the engine's level
    return buffer.getvalue()


async def measure(plan: dict[str, Any], handles: dict[int, Any]) -> dict[str, Any]:
    prompt = plan["params"]["prompt"]
    levels = {int(level): count for level, count in plan["per_client"].items()}

    def call(handle: Any) -> Any:
        async def one(seed: int) -> int:
            _, rows = await handle.remote((prompt, seed))
            return int(rows)

        return one

    for handle in handles.values():  # warm-up: every batch shape, first allocations
        await closed_loop(call(handle), max(levels), 1, first_seed=10**6)
    runs: dict[int, dict[int, list[dict[str, Any]]]] = {b: {n: [] for n in levels} for b in handles}
    seed = 0
    for _ in range(plan["repeats"]):
        for clients, per_client in levels.items():
            for batch, handle in handles.items():
                runs[batch][clients].append(
                    await closed_loop(call(handle), clients, per_client, first_seed=seed)
                )
                seed += clients * per_client
    return {
        str(b): {str(n): medians(repeats) for n, repeats in by_level.items()}
        for b, by_level in runs.items()
    }


def main(plan_path: Path, out_path: Path) -> None:
    plan = json.loads(plan_path.read_text())
    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        configure_logging=False,
    )
    try:
        serve.start(proxy_location="Disabled")
        handles = {
            b: serve.run(peer(plan, b).bind(), name=f"peer-b{b}", route_prefix=None)
            for b in plan["max_batches"]
        }
        threads = {b: handle.threads.remote().result() for b, handle in handles.items()}
        start_s = time.perf_counter() - started
        results = asyncio.run(measure(plan, handles))
    finally:
        serve.shutdown()
        ray.shutdown()
    out_path.write_text(
        json.dumps(
            {
                "version": ray.__version__,
                "start_s": start_s,
                "replica_threads": sorted(set(threads.values())),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
