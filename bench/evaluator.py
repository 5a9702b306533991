"""The evaluator alone (services/evaluator/), no mesh: what batching concurrent Evaluate calls buys.

CALLS concurrent Evaluate calls of IMAGES_PER_CALL inline PNGs each (a job's variants, with a
reference image) against a real evaluator started in this process on 127.0.0.1:0 with the tiny
CLIP (`make models`), twice over:
- batched: the service's defaults (a scoring round gathers the calls of a 5 ms window, up to
  64 images);
- one by one: max_batch_images=1, so each round scores one call.
Both run at the same fixed batch shapes, so their scores are identical; only the rounds differ.
Runs alternate between the two (so load from elsewhere falls on both alike), every run with
images never seen before (no embedding-cache hits). Figures are images per second, medians of
the runs. torch's threads are set as the services set them (set_torch_threads).

    python -m bench.evaluator [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench.stats import median
from services.common.settings import EvaluatorSettings
from services.common.torch_compat import set_torch_threads

CALLS = 16
IMAGES_PER_CALL = 4
SIDE = 256
PROMPT = "a red bicycle leaning on a wall"
RUNS = 3


def _png(seed: int) -> bytes:
    """A smooth random image (low-frequency noise), as a generator's output roughly is."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _workload(run: int, calls: int) -> list[tuple[list[bytes], bytes]]:
    base = 1_000_000 * (run + 1)
    return [
        (
            [_png(base + call * 100 + i) for i in range(IMAGES_PER_CALL)],
            _png(base + call * 100 + 99),
        )
        for call in range(calls)
    ]


async def _measure(client: Any, workload: list[tuple[list[bytes], bytes]]) -> float:
    """Images per second for the calls of `workload`, all at once."""
    started = time.perf_counter()
    await asyncio.gather(
        *(
            client.evaluate([], PROMPT, images=images, reference_image=reference)
            for images, reference in workload
        )
    )
    elapsed = time.perf_counter() - started
    return sum(len(images) for images, _ in workload) / elapsed


async def run(quick: bool = False) -> dict[str, Any]:
    from services.evaluator.client import EvaluatorClient
    from services.evaluator.service import start

    calls = 4 if quick else CALLS
    defaults = EvaluatorSettings()
    threads = set_torch_threads(defaults.torch_threads, defaults.model_processes)
    modes: dict[str, dict[str, Any]] = {"batched": {}, "one_by_one": {"max_batch_images": 1}}
    per_s: dict[str, list[float]] = {mode: [] for mode in modes}
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-evaluator-")))
        clients = {}
        for mode, overrides in modes.items():
            settings = EvaluatorSettings(
                listen_addr="127.0.0.1:0",
                data_dir=folder / mode,
                torch_threads=threads,
                **overrides,
            )
            service = await start(settings)
            stack.push_async_callback(service.stop, 1.0)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
            stack.push_async_callback(channel.close)
            clients[mode] = EvaluatorClient(channel)
            await _measure(clients[mode], _workload(-1, 2))  # warm-up
        for index in range(RUNS):
            for mode, client in clients.items():
                workload = _workload(index * len(modes) + list(modes).index(mode), calls)
                per_s[mode].append(await _measure(client, workload))
    batched, one_by_one = median(per_s["batched"]), median(per_s["one_by_one"])
    return {
        "calls": calls,
        "images_per_call": IMAGES_PER_CALL,
        "image_side_px": SIDE,
        "torch_threads": threads,
        "runs": RUNS,
        "batched_images_per_s": round(batched, 1),
        "one_by_one_images_per_s": round(one_by_one, 1),
        "ratio": round(batched / one_by_one, 2),
        "per_run_images_per_s": {
            mode: [round(v, 1) for v in values] for mode, values in per_s.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 calls instead of 16")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.quick)), indent=2))


if __name__ == "__main__":
    main()
