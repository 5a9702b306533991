"""The comparison server for the throughput benchmark, built here for that comparison only.

It does what the diffusers documentation's server example does: one ASGI app holding a shared
pipeline; per request a fresh scheduler and `from_pipe` pipeline, the call run in the default
thread pool, the image saved to disk and its URL returned. No queue, no events, no cache.
Run: `python -m bench.baseline_server MODEL_DIR PORT OUT_DIR`.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from services.common.torch_compat import prepare_torch

prepare_torch()

import torch  # noqa: E402
import uvicorn  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

model_dir, port, out_dir = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
shared = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
shared.set_progress_bar_config(disable=True)


async def generate(request: Request) -> JSONResponse:
    body = await request.json()
    scheduler = shared.scheduler.from_config(shared.scheduler.config)
    pipeline = type(shared).from_pipe(shared, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(int(body["seed"]))
    output = await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: pipeline(
            body["prompt"],
            width=body["width"],
            height=body["height"],
            num_inference_steps=body["steps"],
            generator=generator,
        ),
    )
    path = out_dir / f"{uuid.uuid4().hex}.png"
    output.images[0].save(path)
    return JSONResponse({"data": [{"url": f"file://{path}"}]})


app = Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
