"""Guidance that changes the pixels: image-to-image from a reference image, ControlNet canny/depth.

`load_guidance` reads a resolved spec's guidance images from the object store and decodes them;
`render_guided` renders one image with them. A reference image alone runs diffusers'
img2img pipeline at the request's `strength`; a ControlNet runs the ControlNet pipeline (its
img2img form when there is a reference too) with the control image made by `control_image`:
Canny edges, or the upload taken as a depth map. The ControlNet's control image is taken from the
reference image, the only image a request carries for it (`controlnet.mask` is refused).

The guided pipelines are made from the loaded pipeline's components, once per pipeline and kind,
and share its modules: no second copy of any weights. Each gets its own scheduler (a few
numbers, no weights), so that a guided render never touches the state of the plain pipeline's.

Determinism is the plain renderer's: each render draws its noise from its own CPU
`torch.Generator` seeded with the request's seed; the control images are computed in numpy.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import math
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from services.common.objectstore import ObjectStore
from services.common.spec import DEFAULT_STRENGTH, Spec
from services.common.torch_compat import prepare_torch
from services.generator.pipeline import DTYPES, StepCancelled

prepare_torch()

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

CONTROL_KINDS = ("canny", "depth")
# Canny on gradients of 0..255 pixels (3x3 Sobel, L2 magnitude): the thresholds the SD 1.5
# canny ControlNet's annotator uses.
CANNY_LOW = 100.0
CANNY_HIGH = 200.0
CANNY_SIGMA = 1.0
# Images are scaled to cover the render size and cut to it, centred, with this filter.
_RESAMPLE = Image.Resampling.LANCZOS
_SIZE_MULTIPLE = 8

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Control:
    """ControlNet conditioning: the kind, the image its control image is made from, the scale."""

    kind: str
    source: Image.Image
    weight: float


@dataclass(frozen=True)
class Guidance:
    """What guides one render: an img2img reference (at `strength`) and/or a ControlNet."""

    reference: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
    control: Control | None = None


# Control images


def control_image(kind: str, image: Image.Image, width: int, height: int) -> Image.Image:
    """The RGB control image a `kind` ControlNet expects, at the render size: `canny` white
    edges on black, `depth` the image taken as a depth map (grayscale stretched to 0..255)."""
    if kind == "canny":
        gray = np.asarray(_fit(_rgb(image).convert("L"), width, height), dtype=np.float64)
        edges = canny(gray)
        return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")
    if kind == "depth":
        depth = _stretch(_grayscale(image))
        return _fit(Image.fromarray(depth), width, height).convert("RGB")
    raise ValueError(f"kind must be one of {CONTROL_KINDS}, not {kind!r}")


def canny(
    gray: FloatArray, low: float = CANNY_LOW, high: float = CANNY_HIGH, sigma: float = CANNY_SIGMA
) -> BoolArray:
    """Canny edges of a 2-D array of 0..255 values: Gaussian blur, Sobel gradients, thinning to
    the ridge (non-maximum suppression), then pixels at or over `high`, and those at or over
    `low` connected to them (hysteresis)."""
    blurred = _gaussian_blur(gray, sigma)
    # Sobel: a derivative across, [1, 2, 1] smoothing along; rows grow downwards.
    gx = _convolve_rows(_convolve_cols(blurred, [1.0, 2.0, 1.0]), [-1.0, 0.0, 1.0])
    gy = _convolve_cols(_convolve_rows(blurred, [1.0, 2.0, 1.0]), [-1.0, 0.0, 1.0])
    magnitude = np.hypot(gx, gy)
    ridge = _thin(magnitude, np.rad2deg(np.arctan2(gy, gx)) % 180.0)
    strong = ridge & (magnitude >= high)
    weak = ridge & (magnitude >= low)
    return _hysteresis(strong, weak)


def _gaussian_blur(values: FloatArray, sigma: float) -> FloatArray:
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    weights = [float(k) for k in kernel]
    return _convolve_cols(_convolve_rows(values, weights), weights)


def _convolve_rows(values: FloatArray, kernel: list[float]) -> FloatArray:
    """Each row convolved with `kernel` (odd length, applied left to right), edges repeated."""
    radius = len(kernel) // 2
    padded = np.pad(values, ((0, 0), (radius, radius)), mode="edge")
    width = values.shape[1]
    out = np.zeros_like(values)
    for i, weight in enumerate(kernel):
        if weight:
            out += weight * padded[:, i : i + width]
    return out


def _convolve_cols(values: FloatArray, kernel: list[float]) -> FloatArray:
    return _convolve_rows(values.T, kernel).T


# Neighbours (row, column offsets) along the gradient, by its direction rounded to 45 degrees.
_ALONG_GRADIENT = {0: (0, 1), 45: (1, 1), 90: (1, 0), 135: (1, -1)}


def _thin(magnitude: FloatArray, degrees: FloatArray) -> BoolArray:
    """Pixels whose gradient magnitude is a maximum along the gradient's direction."""
    height, width = magnitude.shape
    padded = np.pad(magnitude, 1)
    sector = (np.round(degrees / 45.0).astype(np.int64) % 4) * 45
    ridge = np.zeros(magnitude.shape, dtype=np.bool_)
    for angle, (dr, dc) in _ALONG_GRADIENT.items():
        ahead = padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]
        behind = padded[1 - dr : 1 - dr + height, 1 - dc : 1 - dc + width]
        # >= on one side, > on the other: a ridge two pixels wide keeps one of them.
        ridge |= (sector == angle) & (magnitude >= ahead) & (magnitude > behind)
    return ridge & (magnitude > 0)


def _hysteresis(strong: BoolArray, weak: BoolArray) -> BoolArray:
    """`strong` grown through 8-connected `weak` pixels until it stops growing."""
    edges = strong.copy()
    while True:
        padded = np.pad(edges, 1)
        height, width = edges.shape
        near = np.zeros_like(edges)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                near |= padded[dr : dr + height, dc : dc + width]
        grown = weak & near
        if np.array_equal(grown | edges, edges):
            return edges
        edges |= grown


def _grayscale(image: Image.Image) -> FloatArray:
    """One channel of values; 16-bit and float images (common for depth maps) keep their range."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(image, dtype=np.float64)
    return np.asarray(_rgb(image).convert("L"), dtype=np.float64)


def _rgb(image: Image.Image) -> Image.Image:
    """The image's colours, any transparency dropped (a palette's by way of RGBA, as Pillow
    asks)."""
    if image.mode in ("P", "PA", "LA", "RGBA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def _stretch(values: FloatArray) -> npt.NDArray[np.uint8]:
    """Values mapped linearly onto 0..255 (lowest to 0, highest to 255); a flat map is all 0."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.round((values - low) * (255.0 / (high - low)))
    return scaled.astype(np.uint8)


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover `width` x `height` and cut to it, centred (the aspect ratio is kept)."""
    return ImageOps.fit(image, (width, height), method=_RESAMPLE)


# Loading


async def load_guidance(spec: Spec, objects: ObjectStore) -> Guidance | None:
    """The guidance of a resolved spec, its images read from the object store and decoded; None
    when it has none. Raises ValueError for guidance this module cannot honour (a role other
    than reference, a ControlNet mask or one without a reference image): `resolve` refuses
    those, so a stored spec only has them if it was admitted before that."""
    others = sorted({g.role for g in spec.guidance_images if g.role != "reference"})
    if others:
        raise ValueError(f"guidance roles {others} are not supported")
    key = spec.reference_key()
    controlnet = spec.controlnet
    if not key:
        if controlnet is not None:
            raise ValueError("a ControlNet needs a reference image to make its control image")
        return None
    if controlnet is not None and controlnet.mask_key:
        raise ValueError("ControlNet masks are not supported")
    reference = await _decode(await objects.get(key))
    control = None
    if controlnet is not None:
        control = Control(kind=controlnet.name, source=reference, weight=controlnet.weight)
    strength = DEFAULT_STRENGTH if spec.strength is None else spec.strength
    return Guidance(reference=reference, strength=strength, control=control)


async def _decode(data: bytes) -> Image.Image:
    return await asyncio.to_thread(decode_image, data)


def decode_image(data: bytes) -> Image.Image:
    """An uploaded image, decoded, turned upright by its EXIF orientation (phone photos)."""
    with Image.open(io.BytesIO(data)) as opened:
        return ImageOps.exif_transpose(opened)  # a copy, loaded: the file can close


def load_controlnets(
    folders: Mapping[str, str | Path], dtype: torch.dtype | str, device: str
) -> dict[str, ControlNetModel]:
    """ControlNets (name -> ControlNetModel) from local folders, in `dtype` (a torch dtype or
    its registry name, "float16"), on `device`."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    loaded: dict[str, ControlNetModel] = {}
    for name, folder in folders.items():
        controlnet = ControlNetModel.from_pretrained(  # type: ignore[no-untyped-call]
            str(folder), local_files_only=True, dtype=torch_dtype
        )
        loaded[name] = controlnet.to(device)
    return loaded


# Rendering


class _Derived:
    """The guided pipelines made from one loaded pipeline (by class and ControlNet), and the lock
    every render through them takes: a diffusers pipeline keeps per-call state on itself."""

    def __init__(self) -> None:
        self.pipelines: dict[tuple[type, Any], Any] = {}
        self.lock = threading.Lock()


# Kept as long as their pipeline is: a model unloaded from the engine takes its derived ones along.
_derived: weakref.WeakKeyDictionary[Any, _Derived] = weakref.WeakKeyDictionary()
_derived_lock = threading.Lock()


def _derive(pipe: Any, cls: type, controlnet: Any) -> tuple[Any, threading.Lock]:
    """`cls` made from `pipe` (plus `controlnet`) the first time it is asked for, then reused;
    and the lock to render with."""
    with _derived_lock:
        derived = _derived.get(pipe)
        if derived is None:
            derived = _derived[pipe] = _Derived()
        made = derived.pipelines.get((cls, controlnet))
        if made is None:
            made = _assemble(cls, pipe, controlnet)
            derived.pipelines[(cls, controlnet)] = made
        return made, derived.lock


def _assemble(cls: type, pipe: Any, controlnet: Any) -> Any:
    """A `cls` pipeline of `pipe`'s modules (not copies), plus `controlnet`, with a scheduler of
    its own. Built directly rather than with `from_pipe`, which casts every module it shares to
    one dtype (and logs a warning per module as it does)."""
    takes = inspect.signature(cls).parameters
    parts = {name: part for name, part in pipe.components.items() if name in takes}
    parts["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if controlnet is not None:
        parts["controlnet"] = controlnet
    if "requires_safety_checker" in takes:
        parts["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    made = cls(**parts)
    made.set_progress_bar_config(disable=True)
    return made


def render_guided(
    pipe: Any,
    controlnets: Mapping[str, Any],
    guidance: Guidance,
    prompt: str,
    negative_prompt: str,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    on_step: Callable[[int, int, Any], None],
    should_stop: Callable[[], bool],
) -> Image.Image:
    """Render one image from `pipe` (a loaded Stable Diffusion pipeline) with `guidance`.

    A reference alone runs img2img at `guidance.strength`; a ControlNet (from `controlnets`, by
    its kind) runs the ControlNet pipeline, its img2img form when there is a reference too;
    neither runs a plain text-to-image pipeline made from `pipe`. Renders through the pipelines
    made from one `pipe` run one at a time.

    `on_step(done, total, latents)` follows each denoising step (img2img runs
    `int(steps x strength)` of them). Raises StepCancelled at the first check (before the first
    step, then after each) where `should_stop()` is True, and ValueError for a size, step count,
    strength or ControlNet the render cannot take. Synchronous: callers run it in a worker
    thread.
    """
    _check(guidance, controlnets, width, height, steps)
    if should_stop():
        raise StepCancelled(0, steps)

    def step_end(
        running: Any, step_index: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        total = int(getattr(running, "num_timesteps", steps))
        done = step_index + 1
        on_step(done, total, tensors.get("latents"))
        if should_stop():
            raise StepCancelled(done, total)
        return tensors

    call: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or None,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "output_type": "pil",
        "callback_on_step_end": step_end,
    }
    cls, controlnet = _pipeline_for(guidance, controlnets)
    if guidance.reference is not None:  # img2img takes its size from the image
        call["image"] = _fit(_rgb(guidance.reference), width, height)
        call["strength"] = guidance.strength
    if cls is not StableDiffusionImg2ImgPipeline:
        call.update(width=width, height=height)
    if guidance.control is not None:
        made = control_image(guidance.control.kind, guidance.control.source, width, height)
        call["image" if guidance.reference is None else "control_image"] = made
        call["controlnet_conditioning_scale"] = guidance.control.weight
    runner, lock = _derive(pipe, cls, controlnet)
    with lock, torch.inference_mode():
        output = runner(**call)
    image: Image.Image = output.images[0]
    return image


def _pipeline_for(guidance: Guidance, controlnets: Mapping[str, Any]) -> tuple[type, Any]:
    """(pipeline class, ControlNet or None) that renders `guidance`."""
    if guidance.control is None:
        if guidance.reference is None:
            return StableDiffusionPipeline, None
        return StableDiffusionImg2ImgPipeline, None
    controlnet = controlnets[guidance.control.kind]
    if guidance.reference is None:
        return StableDiffusionControlNetPipeline, controlnet
    return StableDiffusionControlNetImg2ImgPipeline, controlnet


def _check(
    guidance: Guidance, controlnets: Mapping[str, Any], width: int, height: int, steps: int
) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    for name, value in (("width", width), ("height", height)):
        if value < _SIZE_MULTIPLE or value % _SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {_SIZE_MULTIPLE}, not {value}")
    if guidance.reference is not None and not (
        math.isfinite(guidance.strength) and 0.0 < guidance.strength <= 1.0
    ):
        raise ValueError(f"strength must be in (0, 1], not {guidance.strength}")
    if guidance.reference is not None and int(steps * guidance.strength) < 1:
        raise ValueError(f"strength {guidance.strength} leaves no step of {steps}")
    control = guidance.control
    if control is not None and control.kind not in controlnets:
        raise ValueError(f"no {control.kind!r} ControlNet is loaded; have {sorted(controlnets)}")
