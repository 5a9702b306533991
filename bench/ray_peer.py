"""The Ray Serve peer of the engine benchmark (bench/engine.py): the same diffusers pipeline behind
`@serve.batch`, one replica per batch size, called through its DeploymentHandle (no HTTP), under
the same closed-loop load (bench/closed_loop.py).

It runs in .venv-bench (`make bench-deps`) as a subprocess of the benchmark, which drives it so
that its runs interleave with the engine's: `.venv-bench/bin/python -m bench.ray_peer PLAN.json`
starts Ray and the replicas and answers one JSON line (Ray's version, its start time), warms each
replica up and answers `{"ready": true}`; then each JSON line read on stdin, `{"batch",
"clients", "per_client", "first_seed"}`, is one closed-loop run answered by one line of results
(bench/closed_loop.py). End of input shuts Ray down. Everything Ray prints goes to stderr.

The deployment is what Ray Serve's batching guide shows: an async batch method that calls the
pipeline once with the batch's prompts and one `torch.Generator` per request, and returns each
request its image (as PNG bytes, as the engine does). Tuned as a user would for throughput:
request access logs off, `max_ongoing_requests` above the requests in flight, and Ray's workers
at the engine's priority (Ray starts them at nice 15; RAY_worker_niceness=0, set by the
benchmark).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from bench.closed_loop import answer, closed_loop, reply_channel, send


def peer(plan: dict[str, Any], max_batch: int) -> Any:
    """A deployment class for one batch size (serve.batch takes it at definition time)."""
    from ray import serve

    params = plan["params"]

    @serve.deployment(
        name=f"peer-b{max_batch}",
        max_ongoing_requests=4 * plan["max_clients"],
        # Logical CPUs only, so every replica fits at once; torch's threads are set below.
        ray_actor_options={"num_cpus": 0.5},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
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

        def threads(self) -> tuple[int, int]:
            import torch

            return int(torch.get_num_threads()), os.nice(0)

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


async def serve_runs(plan: dict[str, Any], handles: dict[int, Any], reply: TextIO) -> None:
    prompt = plan["params"]["prompt"]

    def call(handle: Any) -> Any:
        async def one(seed: int) -> int:
            _, rows = await handle.remote((prompt, seed))
            return int(rows)

        return one

    async def load(command: dict[str, Any]) -> dict[str, Any]:
        return await closed_loop(
            call(handles[command["batch"]]),
            command["clients"],
            command["per_client"],
            command["first_seed"],
        )

    for handle in handles.values():  # warm-up: every batch shape, first allocations
        await closed_loop(call(handle), plan["max_clients"], 1, first_seed=10**6)
    send(reply, {"ready": True})
    await answer(load, reply)


def main(plan_path: Path) -> None:
    reply = reply_channel()
    import ray
    from ray import serve

    plan = json.loads(plan_path.read_text())
    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
    )
    try:
        serve.start(proxy_location="Disabled")
        handles = {
            b: serve.run(peer(plan, b).bind(), name=f"peer-b{b}", route_prefix=None)
            for b in plan["max_batches"]
        }
        threads, nice = zip(*(h.threads.remote().result() for h in handles.values()), strict=True)
        send(
            reply,
            {
                "version": ray.__version__,
                "start_s": time.perf_counter() - started,
                "replica_threads": sorted(set(threads)),
                "replica_nice": sorted(set(nice)),
            },
        )
        asyncio.run(serve_runs(plan, handles, reply))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
