"""Render images from a FIBO pipeline folder (diffusers `BriaFiboPipeline`), reproducibly.

`FiboRunner` loads the folder with `DiffusionPipeline.from_pretrained` (the path real FIBO
weights take too; `make models` builds a tiny one, services/generator/tiny_models.py) and renders
rows of structured prompts. The pipeline reads a prompt as the canonical JSON text of the
structured prompt (keys sorted, nulls dropped: `services.common.spec.fibo_prompt_text`), so two
requests that differ only in key order or nulls render the same pixels.

Rows render one at a time, each in a pipeline call of its own with its own CPU
`torch.Generator` seeded with the row's seed: a row's bytes depend on the row alone, never on
its batch-mates, in any call and any process (on the same hardware class).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from services.common.spec import fibo_prompt_text
from services.common.torch_compat import prepare_torch

prepare_torch()

import diffusers  # noqa: E402
import torch  # noqa: E402

from services.generator.pipeline import (  # noqa: E402
    DTYPES,
    BatchWatch,
    RenderRequest,
    StepCancelled,
    module_bytes,
)

# FIBO's VAE maps 16x16 pixels to a latent cell; the pipeline refuses other sizes.
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class FiboRow:
    """One image: a structured prompt (plain JSON values), its negative prompt, size, steps,
    guidance and seed (variant i of a job carries the job's seed + i)."""

    fibo_json: dict[str, Any]
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


class FiboRunner:
    """One loaded FIBO pipeline on one device; renders one call at a time."""

    def __init__(self, model_path: Path, dtype: str = "float32", device: str = "cpu") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        diffusers.utils.logging.disable_progress_bar()
        pipe = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
            str(model_path), local_files_only=True, dtype=DTYPES[dtype]
        )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
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
        """The engine's entry (services/generator/pipeline.py `Runner`): the request's prompt
        is the structured prompt's canonical JSON text."""
        rows = [
            FiboRow(
                fibo_json=json.loads(r.prompt),
                negative_prompt=r.negative_prompt,
                width=r.width,
                height=r.height,
                steps=r.steps,
                guidance_scale=r.guidance_scale,
                seed=r.seed,
            )
            for r in requests
        ]
        watch.stage("denoising")
        on_step = lambda done, total: watch.step(done, total, None)  # noqa: E731
        try:
            images = self.render_rows(rows, on_step, lambda: watch.dropped(0))
        except StepCancelled:
            return [None] * len(rows)
        return list(images)

    def render_rows(
        self,
        rows: Sequence[FiboRow],
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> list[Image.Image]:
        """An image per row, in order. Steps are counted over the whole call: after each
        denoising step `on_step(done, total)` gets the steps finished so far and the sum of the
        rows' steps. At the first check (before the first step, then after each step) where
        `should_stop()` is true it raises StepCancelled(done, total). ValueError for a row the
        model cannot take (size not a positive multiple of 16, no steps)."""
        for row in rows:
            _check_row(row)
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
                    prompt=fibo_prompt_text(row.fibo_json),
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


def _check_row(row: FiboRow) -> None:
    if row.steps < 1:
        raise ValueError(f"steps must be at least 1, not {row.steps}")
    for name, value in (("width", row.width), ("height", row.height)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, not {value}")
