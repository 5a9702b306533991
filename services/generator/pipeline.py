"""Render one image from a diffusers pipeline folder, step by step, reproducibly.

`PipelineRunner` loads a pipeline folder with `DiffusionPipeline.from_pretrained` (the path real
SD 1.5 weights take too) and renders one variant per call. The caller sees every finished
denoising step through `on_step` and can stop a render between steps through `should_stop`.
Rendering is synchronous; callers run it in a worker thread.

Same model files, request and hardware class give the same pixels, in any call and any process:
each render draws its noise from its own CPU `torch.Generator` seeded with the request's seed,
and `encode_png` turns identical pixels into identical bytes.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from services.common.torch_compat import prepare_torch

prepare_torch()

import diffusers  # noqa: E402
import torch  # noqa: E402

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# zlib level for PNG output. Fixed, because the level changes the bytes of the file.
PNG_COMPRESS_LEVEL = 6
# Stable Diffusion's VAE works on 8x8 pixel blocks.
_SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class RenderRequest:
    """What one variant needs: variant i of a job carries the job's seed + i."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


class StepCancelled(Exception):
    """A render stopped because `should_stop()` returned True; `steps_done` steps had run."""

    def __init__(self, steps_done: int, total_steps: int) -> None:
        super().__init__(f"render cancelled after {steps_done} of {total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps


class PipelineRunner:
    """One loaded pipeline on one device; renders one request at a time."""

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

    def render(
        self,
        req: RenderRequest,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> Image.Image:
        """Render `req`; call `on_step(done, total)` after each step.

        Raises StepCancelled at the first check (before the first step, then after each step)
        where `should_stop()` is True, and ValueError for a size or step count the model cannot
        take.
        """
        _check_request(req)
        if should_stop():
            raise StepCancelled(0, req.steps)

        def step_end(
            pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            # Some schedulers run more than one model evaluation per requested step; the
            # pipeline knows the real count once its timesteps are set.
            total = int(getattr(pipe, "num_timesteps", req.steps))
            done = step_index + 1
            on_step(done, total)
            if should_stop():
                raise StepCancelled(done, total)
            return tensors

        generator = torch.Generator(device="cpu").manual_seed(req.seed)
        with self._lock, torch.inference_mode():
            output = self._pipe(
                prompt=req.prompt,
                negative_prompt=req.negative_prompt or None,
                width=req.width,
                height=req.height,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                generator=generator,
                output_type="pil",
                callback_on_step_end=step_end,
            )
        image: Image.Image = output.images[0]
        return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels: no metadata, a fixed compression level."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    # A fresh image from the raw pixels carries none of the source's info (text, ICC, dpi).
    bare = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def _check_request(req: RenderRequest) -> None:
    if req.steps < 1:
        raise ValueError(f"steps must be at least 1, not {req.steps}")
    for name, value in (("width", req.width), ("height", req.height)):
        if value < _SIZE_MULTIPLE or value % _SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {_SIZE_MULTIPLE}, not {value}")
