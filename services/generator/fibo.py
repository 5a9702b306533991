"""Render images from a FIBO pipeline folder (diffusers `BriaFiboPipeline`), reproducibly.

`FiboRunner` loads the folder with `DiffusionPipeline.from_pretrained` (the path real FIBO
weights take too; `make models` builds a tiny one, services/generator/tiny_models.py) and renders
requests whose prompt is a structured prompt's canonical JSON text (keys sorted, nulls
dropped: `services.common.spec.fibo_prompt_text`, which `Spec.text_prompt` uses), so two
requests that differ only in key order or nulls render the same pixels.

Rows render one at a time, each in a pipeline call of its own with its own CPU
`torch.Generator` seeded with the row's seed: a row's bytes depend on the row alone, never on
its batch-mates, in any call and any process (on the same hardware class).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from services.common.torch_compat import prepare_torch

prepare_torch()

import torch  # noqa: E402

from services.generator.pipeline import (  # noqa: E402
    BatchWatch,
    RenderRequest,
    StepCancelled,
    check_render,
    load_pipeline,
    module_bytes,
)

# FIBO's VAE maps 16x16 pixels to a latent cell; the pipeline refuses other sizes.
SIZE_MULTIPLE = 16


class FiboRunner:
    """One loaded FIBO pipeline on one device; renders one call at a time."""

    def __init__(self, model_path: Path, dtype: str = "float32", device: str = "cpu") -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self._pipe = load_pipeline(model_path, dtype, device)
        # A diffusers pipeline keeps per-call state on itself: one render at a time.
        self._lock = threading.Lock()

    def batch_key(self, request: RenderRequest) -> Hashable | None:
        return None  # one row per pipeline call (see the module docstring)

    def batch_size(self, request: RenderRequest) -> int:
        return 1

    def memory_bytes(self) -> int:
        return module_bytes(self._pipe.components.values())

    def render(
        self, requests: Sequence[RenderRequest], watch: BatchWatch
    ) -> list[Image.Image | None]:
        """The engine's entry (services/generator/pipeline.py `Runner`)."""
        watch.stage("denoising")
        on_step = lambda done, total: watch.step(done, total, None)  # noqa: E731
        try:
            images = self.render_rows(requests, on_step, lambda: watch.dropped(0))
        except StepCancelled:
            return [None] * len(requests)
        return list(images)

    def render_rows(
        self,
        rows: Sequence[RenderRequest],
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> list[Image.Image]:
        """An image per row, in order. Steps are counted over the whole call: after each
        denoising step `on_step(done, total)` gets the steps finished so far and the sum of the
        rows' steps. At the first check (before the first step, then after each step) where
        `should_stop()` is true it raises StepCancelled(done, total). ValueError for a row the
        model cannot take (size not a positive multiple of 16, no steps)."""
        for row in rows:
            check_render(row.steps, row.width, row.height, SIZE_MULTIPLE)
        total = sum(row.steps for row in rows)
        if should_stop():
            raise StepCancelled(0, total)
        done = 0

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            nonlocal done
            done += 1
            on_step(done, total)
            if should_stop():
                raise StepCancelled(done, total)
            return tensors

        images: list[Image.Image] = []
        with self._lock, torch.inference_mode():
            for row in rows:
                output = self._pipe(
                    prompt=row.prompt,
                    negative_prompt=row.negative_prompt or None,
                    width=row.width,
                    height=row.height,
                    num_inference_steps=row.steps,
                    guidance_scale=row.guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(row.seed),
                    output_type="pil",
                    callback_on_step_end=step_end,
                )
                images.append(output.images[0])
        return images
