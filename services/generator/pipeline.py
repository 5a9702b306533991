"""Render images from a diffusers pipeline folder, step by step, reproducibly, in batches that do
not change the bytes.

`SdRunner` loads a Stable-Diffusion-family folder with `DiffusionPipeline.from_pretrained` (the
path real SD 1.5 weights take too) and renders a batch of requests in one pipeline call. The
caller sees every finished denoising step through a `BatchWatch` and can drop any row between
steps (the batch stops when every row is dropped).

Same bytes, alone or batched, by construction:
- the denoiser always runs at the fixed batch shape of the request's size (`max_batch` rows,
  fewer for images past `batch_pixels`; plus the classifier-free-guidance half), padded with
  copies of the first row: a row's arithmetic is
  then the same whatever its position or its batch-mates (CPU and GPU kernels pick their
  blocking by shape, so a different batch size could change the last bit of a value);
- the text encoder and the VAE decoder run at the same fixed batch shape (prompts padded to the
  tokenizer's fixed length), and a row's starting noise is drawn alone from its own CPU
  `torch.Generator` seeded with the row's seed;
- `encode_png` turns identical pixels into identical bytes.
A text's embedding is kept (a small LRU per model): the negative prompt most requests share, or a
prompt asked for again, is encoded once.
Only schedulers whose steps draw no noise are batched (an ancestral sampler draws the noise of
the whole batch from one generator); a model with another scheduler renders one row at a time.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from services.common.models import ModelSpec, batch_shape
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
# Text embeddings kept per model (at SD 1.5's width, about 240 KB each).
EMBEDDING_CACHE_SIZE = 128
# Schedulers whose step() draws no random numbers (DDIM with the pipelines' eta = 0).
_NOISELESS_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
    }
)
# Latent -> RGB for previews without a VAE decode: SD 1.x latent channels projected on RGB.
_SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


@dataclass(frozen=True)
class RenderRequest:
    """What one image needs: variant i of a job carries the job's seed + i. `guidance` is a
    loaded `services.generator.guidance.Guidance` (reference / ControlNet images) or None."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    guidance: Any = None


class StepCancelled(Exception):
    """A render stopped because it was told to; `steps_done` steps had run."""

    def __init__(self, steps_done: int, total_steps: int) -> None:
        super().__init__(f"render cancelled after {steps_done} of {total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps


class BatchWatch(Protocol):
    """How a batch reports to the engine (called on the device thread)."""

    def stage(self, name: str) -> None: ...

    def step(self, done: int, total: int, latents: torch.Tensor | None) -> None: ...

    def dropped(self, row: int) -> bool:
        """True once row `row` is no longer wanted (its job was cancelled)."""
        ...


class Runner(Protocol):
    """One loaded model on one device. `batch_key` says which requests may share a batch
    (None: this one renders alone) and `batch_size` how many rows that batch holds; `render`
    renders them, an image per row (None for a row dropped meanwhile)."""

    def batch_key(self, request: RenderRequest) -> Hashable | None: ...

    def batch_size(self, request: RenderRequest) -> int: ...

    def render(
        self, requests: Sequence[RenderRequest], watch: BatchWatch
    ) -> list[Image.Image | None]: ...

    def memory_bytes(self) -> int: ...


class SdRunner:
    """A Stable-Diffusion-family pipeline: text-to-image in batches of a fixed shape per size
    (`max_batch`, `batch_pixels`); image-to-image and ControlNet one row at a time (guidance.py)."""

    def __init__(
        self,
        model_path: Path,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch: int = 1,
        batch_pixels: int = 0,
        controlnets: Mapping[str, Path] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self._pipe = pipe = load_pipeline(model_path, dtype, device)
        noiseless = type(pipe.scheduler).__name__ in _NOISELESS_SCHEDULERS
        self.max_batch = max_batch if noiseless else 1
        self.batch_pixels = batch_pixels
        self._controlnet_paths = dict(controlnets or {})
        self._guided: Any = None  # loaded on the first guided request
        self._embeddings: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        # A diffusers pipeline keeps per-call state on itself: one render at a time.
        self._lock = threading.Lock()

    def batch_key(self, request: RenderRequest) -> Hashable | None:
        if request.guidance is not None:
            return None
        return (request.width, request.height, request.steps, request.guidance_scale)

    def batch_size(self, request: RenderRequest) -> int:
        if request.guidance is not None:
            return 1
        return batch_shape(self.max_batch, self.batch_pixels, request.width, request.height)

    def memory_bytes(self) -> int:
        return module_bytes(self._pipe.components.values())

    def render_one(
        self,
        request: RenderRequest,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> Image.Image:
        """One request alone (at the fixed batch shape); StepCancelled when `should_stop()`."""
        watch = _OneRow(on_step, should_stop)
        image = self.render([request], watch)[0]
        if image is None:
            raise StepCancelled(watch.done, request.steps)
        return image

    def render(
        self, requests: Sequence[RenderRequest], watch: BatchWatch
    ) -> list[Image.Image | None]:
        for request in requests:
            check_render(request.steps, request.width, request.height)
        with self._lock, torch.inference_mode():
            if requests[0].guidance is not None:
                return [self._render_guided(requests[0], watch)]
            return self._render_text(requests, watch)

    def _render_text(
        self, requests: Sequence[RenderRequest], watch: BatchWatch
    ) -> list[Image.Image | None]:
        pipe, first = self._pipe, requests[0]
        shape = self.batch_size(first)
        if len(requests) > shape:
            raise ValueError(f"{len(requests)} rows in a batch of {shape}")
        if all(watch.dropped(i) for i in range(len(requests))):
            raise StepCancelled(0, first.steps)
        watch.stage("encoding_prompt")
        embeds = self._embed([r.prompt for r in requests], shape)
        negatives = self._embed([r.negative_prompt or "" for r in requests], shape)
        latents = [self._noise(r) for r in requests]
        pad = shape - len(requests)

        def padded(rows: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.cat([*rows, *[rows[0]] * pad])

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            total = int(getattr(pipe, "num_timesteps", first.steps))
            watch.step(index + 1, total, tensors["latents"][: len(requests)])
            if all(watch.dropped(i) for i in range(len(requests))):
                raise StepCancelled(index + 1, total)
            return tensors

        watch.stage("denoising")
        output = pipe(
            prompt_embeds=padded(embeds),
            negative_prompt_embeds=padded(negatives),
            latents=padded(latents),
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            output_type="latent",
            callback_on_step_end=step_end,
        )
        watch.stage("decoding")
        decoded = self._decode(output.images[: len(requests)], shape)
        return [None if watch.dropped(i) else image for i, image in enumerate(decoded)]

    def _embed(self, texts: Sequence[str], shape: int) -> list[torch.Tensor]:
        """Each text's embedding row, encoded at the batch shape (kept for next time)."""
        cache = self._embeddings
        missing = [text for text in dict.fromkeys(texts) if (shape, text) not in cache]
        for start in range(0, len(missing), shape):
            chunk = missing[start : start + shape]
            padded = chunk + [chunk[0]] * (shape - len(chunk))
            encoded, _ = self._pipe.encode_prompt(padded, self.device, 1, False)
            for i, text in enumerate(chunk):
                cache[shape, text] = encoded[i : i + 1]
        rows = []
        for text in texts:
            cache.move_to_end((shape, text))
            rows.append(cache[shape, text])
        while len(cache) > EMBEDDING_CACHE_SIZE:
            cache.popitem(last=False)
        return rows

    def _noise(self, request: RenderRequest) -> torch.Tensor:
        pipe = self._pipe
        shape = (
            1,
            pipe.unet.config.in_channels,
            request.height // pipe.vae_scale_factor,
            request.width // pipe.vae_scale_factor,
        )
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        noise = torch.randn(shape, generator=generator, dtype=DTYPES[self.dtype])
        return noise.to(self.device)

    def _decode(self, latents: torch.Tensor, shape: int) -> list[Image.Image]:
        """The rows' images, decoded at the batch shape."""
        vae, rows = self._pipe.vae, len(latents)
        padded = torch.cat([latents, *[latents[:1]] * (shape - rows)])
        decoded = vae.decode(padded / vae.config.scaling_factor, return_dict=False)[0]
        images: list[Image.Image] = self._pipe.image_processor.postprocess(
            decoded[:rows], output_type="pil"
        )
        return images

    def _render_guided(self, request: RenderRequest, watch: BatchWatch) -> Image.Image | None:
        from services.generator import guidance

        if self._guided is None:
            self._guided = guidance.load_controlnets(
                self._controlnet_paths, self.dtype, self.device
            )
        watch.stage("denoising")
        try:
            image: Image.Image = guidance.render_guided(
                self._pipe,
                self._guided,
                request.guidance,
                request.prompt,
                request.negative_prompt,
                request.width,
                request.height,
                request.steps,
                request.guidance_scale,
                request.seed,
                on_step=watch.step,
                should_stop=lambda: watch.dropped(0),
            )
        except StepCancelled:
            return None
        return image


class _OneRow:
    """A BatchWatch for one request rendered on its own."""

    def __init__(self, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]):
        self._on_step = on_step
        self._should_stop = should_stop
        self.done = 0

    def stage(self, name: str) -> None:
        pass

    def step(self, done: int, total: int, latents: torch.Tensor | None) -> None:
        self.done = done
        self._on_step(done, total)

    def dropped(self, row: int) -> bool:
        return self._should_stop()


def load_pipeline(model_path: Path, dtype: str, device: str) -> Any:
    """A diffusers pipeline folder through `from_pretrained` (local files only), on `device`,
    with no progress bars."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(model_path), local_files_only=True, dtype=DTYPES[dtype]
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def open_runner(model: ModelSpec, device: str) -> Runner:
    """The runner of the model's family, loaded from its folder."""
    if model.family == "sd":
        return SdRunner(
            Path(model.path),
            dtype=model.dtype,
            device=device,
            max_batch=model.max_batch,
            batch_pixels=model.batch_pixels,
            controlnets={name: Path(path) for name, path in model.controlnets.items()},
        )
    if model.family == "fibo":
        from services.generator.fibo import FiboRunner

        return FiboRunner(Path(model.path), dtype=model.dtype, device=device)
    raise ValueError(f"model {model.id}: unknown family {model.family!r}")


def latent_preview(latents: torch.Tensor) -> bytes:
    """A small PNG of one row's latents, projected to RGB without the VAE (one pixel per latent
    cell): cheap enough to send every few steps."""
    values = latents.detach().float().cpu()
    if values.shape[0] == len(_SD_LATENT_RGB):
        rgb = torch.einsum("chw,cr->rhw", values, torch.tensor(_SD_LATENT_RGB))
    else:  # another latent space: its first three channels, scaled
        rgb = values[:3] / (values[:3].abs().amax() + 1e-6)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return encode_png(image)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels: no metadata, a fixed compression level."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    # A fresh image from the raw pixels carries none of the source's info (text, ICC, dpi).
    bare = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def module_bytes(components: Any) -> int:
    total = 0
    for component in components:
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


def check_render(steps: int, width: int, height: int, multiple: int = _SIZE_MULTIPLE) -> None:
    """ValueError for a step count or size a pipeline cannot take."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, not {value}")
