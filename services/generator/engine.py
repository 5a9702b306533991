"""The in-process engine that owns the device: queue workers and direct Generate calls share it.

Renders run one at a time on a single device thread, one variant per pipeline call: variant i
always runs alone with its own CPU generator seeded `seed + i`, so its bytes never depend on what
else was running (diffusers' batched and solo outputs differ slightly; see DESIGN.md). Progress
comes back from the device thread through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.v1 import events_pb2

from services.common.models import ModelSpec, Registry
from services.common.objectstore import ObjectStore, content_key
from services.common.spec import Spec
from services.generator.pipeline import PipelineRunner, RenderRequest, encode_png
from services.jobs.records import ArtifactRecord

log = logging.getLogger("imagegen.engine")


@dataclass(frozen=True)
class Step:
    variant_index: int
    step: int
    total_steps: int
    percent: float
    eta_ms: int


@dataclass(frozen=True)
class Rendered:
    variant_index: int
    seed: int
    png: bytes
    sha256: str
    width: int
    height: int
    render_ms: float
    encode_ms: float


class Engine:
    def __init__(self, registry: Registry, device: str = "cpu") -> None:
        self._registry = registry
        self._device = device
        self._runners: dict[str, PipelineRunner] = {}
        # One device thread: renders queue here in arrival order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._load_lock = asyncio.Lock()

    async def load(self, model_id: str = "") -> PipelineRunner:
        """The model's pipeline, loaded (from_pretrained) on first use."""
        model = self._registry.get(model_id)
        async with self._load_lock:
            if model.id not in self._runners:
                self._runners[model.id] = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._load, model
                )
        return self._runners[model.id]

    def _load(self, model: ModelSpec) -> PipelineRunner:
        started = time.perf_counter()
        runner = PipelineRunner(Path(model.path), dtype=model.dtype, device=self._device)
        log.info("loaded %s in %.2fs", model.id, time.perf_counter() - started)
        return runner

    async def render(
        self, spec: Spec, cancel: threading.Event, variants: Sequence[int] | None = None
    ) -> AsyncIterator[Step | Rendered]:
        """Renders a resolved spec (only `variants`, when given: a resumed job renders what it
        lacks): a Step after every denoising step, a Rendered per variant. Setting `cancel`
        (or closing the iterator) stops at the next step with StepCancelled."""
        assert spec.seed is not None
        runner = await self.load(spec.model)
        loop = asyncio.get_running_loop()
        todo = list(range(spec.num_variants) if variants is None else variants)
        total = spec.steps * spec.num_variants
        skipped = spec.steps * (spec.num_variants - len(todo))
        started = time.perf_counter()
        try:
            for position, index in enumerate(todo):
                request = RenderRequest(
                    prompt=spec.text_prompt(),
                    negative_prompt=spec.negative_prompt,
                    width=spec.width,
                    height=spec.height,
                    steps=spec.steps,
                    guidance_scale=spec.guidance_scale or 0.0,
                    seed=spec.seed + index,
                )
                updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

                def put(kind: str, value: Any, updates: asyncio.Queue[Any] = updates) -> None:
                    loop.call_soon_threadsafe(updates.put_nowait, (kind, value))

                loop.run_in_executor(self._executor, _run_one, runner, request, cancel, put)
                while True:
                    kind, value = await updates.get()
                    if kind == "step":
                        ran = position * spec.steps + value
                        done = skipped + ran
                        elapsed = time.perf_counter() - started
                        yield Step(
                            variant_index=index,
                            step=value,
                            total_steps=spec.steps,
                            percent=100.0 * done / total,
                            eta_ms=int(1000 * elapsed / ran * (total - done)) if ran else 0,
                        )
                    elif kind == "error":
                        raise value
                    else:
                        png, render_ms, encode_ms = value
                        yield Rendered(
                            variant_index=index,
                            seed=request.seed,
                            png=png,
                            sha256=hashlib.sha256(png).hexdigest(),
                            width=spec.width,
                            height=spec.height,
                            render_ms=render_ms,
                            encode_ms=encode_ms,
                        )
                        break
        finally:
            cancel.set()  # a consumer that stops early stops the device thread too

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _run_one(
    runner: PipelineRunner, request: RenderRequest, cancel: threading.Event, put: Any
) -> None:
    """Runs on the device thread: render, encode, report."""
    started = time.perf_counter()
    try:
        image = runner.render(request, lambda step, total: put("step", step), cancel.is_set)
        rendered = time.perf_counter()
        png = encode_png(image)
        encoded = time.perf_counter()
        put("done", (png, (rendered - started) * 1e3, (encoded - rendered) * 1e3))
    except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
        put("error", error)


def progress_event(step: Step) -> events_pb2.ProgressEvent:
    return events_pb2.ProgressEvent(
        variant_index=step.variant_index,
        step=step.step,
        total_steps=step.total_steps,
        percent=step.percent,
        eta_ms=step.eta_ms,
    )


async def save_image(objects: ObjectStore, image: Rendered, job_id: str) -> ArtifactRecord:
    """Stores a rendered PNG under its content address (once) and describes it."""
    key = content_key(image.png, "images", "png")
    if not await objects.exists(key):
        await objects.put(key, image.png, "image/png")
    return ArtifactRecord(
        id=str(uuid.uuid4()),
        job_id=job_id,
        variant_index=image.variant_index,
        key=key,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        seed=image.seed,
    )
