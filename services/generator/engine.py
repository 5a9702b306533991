"""The in-process engine that owns the device: queue workers and direct Generate calls feed it.

Every variant to render is a row. Rows wait in one arrival-ordered list; the scheduler takes the
oldest row, gathers the rows that may share its batch (same model and batch key: size, steps,
guidance scale; the variants of one job and those of other jobs alike) up to the batch size of
that image size (the model's `max_batch`, fewer past `batch_pixels`), waiting at most
`batch_window_s` for more when the batch is not full, and runs the batch on the single device
thread. A row never waits behind an incompatible one for longer than
one batch: the next batch always starts from the oldest row left.

A row's bytes do not depend on its batch (see services/generator/pipeline.py). Cancelling a job
drops its rows at the next step; its batch-mates go on. Models stay resident within a memory
budget, the least recently used unloaded first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.v1 import events_pb2

from services.common import metrics
from services.common.models import ModelSpec, Registry
from services.common.objectstore import ObjectStore, content_key
from services.common.spec import Spec
from services.generator.pipeline import (
    RenderRequest,
    Runner,
    StepCancelled,
    encode_png,
    latent_preview,
    open_runner,
)
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
class Stage:
    """The job's rows entered a stage: loading_model, encoding_prompt, denoising, decoding,
    encoding_png."""

    name: str


@dataclass(frozen=True)
class Preview:
    variant_index: int
    step: int
    png: bytes


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
    batch_size: int


Update = Step | Stage | Preview | Rendered


@dataclass(eq=False)
class _Row:
    """One variant waiting for, or in, a batch. `post` hands a message to its job's consumer
    from any thread."""

    model: str
    variant_index: int
    request: RenderRequest
    cancel: threading.Event
    post: Callable[[tuple[Any, ...]], None]
    preview_every: int
    ended: bool = False
    steps_done: int = 0


@dataclass
class _Progress:
    """One job's view of its rows, for percent and ETA."""

    steps: int
    todo: int
    total: int
    skipped: int
    done: dict[int, int] = field(default_factory=dict)
    step_seconds: float = 0.0

    def step(self, variant_index: int, done: int, step_seconds: float) -> None:
        self.done[variant_index] = done
        self.step_seconds = step_seconds

    def snapshot(self, max_batch: int) -> Step:
        done = self.skipped + sum(self.done.values())
        running = {i: d for i, d in self.done.items() if d < self.steps}
        waiting = self.todo - len(self.done)
        left_steps = (self.steps - min(running.values()) if running else 0) + self.steps * (
            math.ceil(waiting / max(1, max_batch))
        )
        # The variant the step is about: the furthest along of those still running (a variant
        # rendered after another is named, not the finished one), else the last to finish.
        named = running or self.done
        latest = max(named, key=lambda i: (named[i], -i))
        return Step(
            variant_index=latest,
            step=self.done[latest],
            total_steps=self.steps,
            percent=100.0 * done / self.total,
            eta_ms=int(1000 * self.step_seconds * left_steps),
        )


class Engine:
    def __init__(
        self,
        registry: Registry,
        device: str = "cpu",
        *,
        batch_window_s: float = 0.005,
        memory_budget_bytes: int = 0,
    ) -> None:
        self._registry = registry
        self._device = device
        self._window = batch_window_s
        self._budget = memory_budget_bytes
        self._runners: OrderedDict[str, Runner] = OrderedDict()  # least recently used first
        self._pending: list[_Row] = []
        self._arrived = asyncio.Event()
        # One device thread: batches and model loads run there, one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._load_lock = asyncio.Lock()
        self._scheduler: asyncio.Task[None] | None = None
        self.ready = False
        self.batches = 0  # batches started: for tests

    @property
    def resident(self) -> list[str]:
        """Loaded models, least recently used first."""
        return list(self._runners)

    async def start(self, warm_up: bool = True) -> None:
        """Starts the scheduler and loads the default model (with one small render, so the first
        request pays no first-call costs); `ready` after that."""
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._schedule())
        if warm_up:
            model = self._registry.get("")
            runner = await self.load(model.id)
            size = max(model.min_size, 8 * math.ceil(64 / 8))
            request = RenderRequest("warm-up", "", size, size, 1, model.default_guidance, 0)
            await self._on_device(_warm_up, runner, request)
        self.ready = True

    async def load(self, model_id: str = "") -> Runner:
        """The model's runner, loaded (from_pretrained) on first use; loading one that would
        exceed the memory budget unloads the least recently used first."""
        model = self._registry.get(model_id)
        async with self._load_lock:
            runner = self._runners.get(model.id)
            if runner is not None:
                self._runners.move_to_end(model.id)
                return runner
            self._make_room(model)
            loaded: Runner = await self._on_device(self._load, model)
            self._runners[model.id] = loaded
            return loaded

    def _make_room(self, model: ModelSpec) -> None:
        if not self._budget:
            return
        needed = _folder_bytes(Path(model.path))
        while self._runners and self._resident_bytes() + needed > self._budget:
            evicted, _ = self._runners.popitem(last=False)
            log.info("unloaded %s to make room for %s", evicted, model.id)

    def _resident_bytes(self) -> int:
        return sum(runner.memory_bytes() for runner in self._runners.values())

    def _load(self, model: ModelSpec) -> Runner:
        started = time.perf_counter()
        runner = open_runner(model, self._device)
        seconds = time.perf_counter() - started
        metrics.JOB_STAGE_SECONDS.labels("model_load").observe(seconds)
        log.info("loaded %s in %.2fs", model.id, seconds)
        return runner

    async def _on_device(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def render(
        self,
        spec: Spec,
        cancel: threading.Event,
        variants: Sequence[int] | None = None,
        guidance: Any = None,
        preview_every: int = 0,
    ) -> AsyncIterator[Update]:
        """Renders a resolved spec (only `variants`, when given: a resumed job renders what it
        lacks): Stage changes, a Step after denoising steps, a Preview every `preview_every`
        steps, a Rendered per variant, in the order they finish. Setting `cancel` (or closing
        the iterator) drops the job's rows at the next step, with StepCancelled."""
        assert spec.seed is not None
        if self._scheduler is None:
            await self.start(warm_up=False)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def post(message: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, message)

        todo = list(range(spec.num_variants) if variants is None else variants)
        if not todo:
            return
        model = self._registry.get(spec.model).id
        rows = [
            _Row(
                model=model,
                variant_index=index,
                request=RenderRequest(
                    prompt=spec.text_prompt(),
                    negative_prompt=spec.negative_prompt,
                    width=spec.width,
                    height=spec.height,
                    steps=spec.steps,
                    guidance_scale=spec.guidance_scale or 0.0,
                    seed=spec.seed + index,
                    guidance=guidance,
                ),
                cancel=cancel,
                post=post,
                preview_every=preview_every,
            )
            for index in todo
        ]
        steps = spec.denoising_steps()  # the progress counts the steps that run
        progress = _Progress(
            steps=steps,
            todo=len(todo),
            total=steps * spec.num_variants,
            skipped=steps * (spec.num_variants - len(todo)),
        )
        runner = self._runners.get(rows[0].model)
        max_batch = runner.batch_size(rows[0].request) if runner is not None else 1
        self._pending += rows
        self._arrived.set()
        stage = ""
        left = len(rows)
        try:
            while left:
                message = await updates.get()
                stepped, latest = False, 0
                while True:  # everything already posted: a step of several rows is one Step
                    kind = message[0]
                    if kind == "step":
                        _, index, done, seconds = message
                        if stepped and done > latest:
                            yield progress.snapshot(max_batch)  # every step is reported
                        progress.step(index, done, seconds)
                        stepped, latest = True, done
                    else:
                        if stepped:  # the steps so far come first
                            yield progress.snapshot(max_batch)
                            stepped = False
                        if kind == "stage" and message[1] != stage:
                            stage = message[1]
                            yield Stage(stage)
                        elif kind == "preview":
                            yield Preview(*message[1:])
                        elif kind == "error":
                            raise message[1]
                        elif kind == "done":
                            left -= 1
                            yield message[1]
                    if updates.empty():
                        break
                    message = updates.get_nowait()
                if stepped:
                    yield progress.snapshot(max_batch)
        finally:
            cancel.set()  # a consumer that stops early drops its rows too
            self._pending = [row for row in self._pending if row not in rows]

    async def _schedule(self) -> None:
        """Forms and runs batches, oldest row first, for as long as the engine lives."""
        while True:
            await self._arrived.wait()
            self._drop_cancelled()
            if not self._pending:
                self._arrived.clear()
                continue
            try:
                await self._next_batch(self._pending[0])
            except Exception:  # a bug; the rows in hand were told, the next batch goes on
                log.exception("batch scheduling failed")

    async def _next_batch(self, head: _Row) -> None:
        if head.model not in self._runners:
            for row in self._pending:
                if row.model == head.model:
                    row.post(("stage", "loading_model"))
        try:
            runner = await self.load(head.model)
        except Exception as error:  # noqa: BLE001 - handed to the rows' consumers
            for row in [r for r in self._pending if r.model == head.model]:
                self._end(row, ("error", error))
            return
        batch = self._compatible(head, runner)
        size = runner.batch_size(head.request)
        if len(batch) < size and self._window:
            await asyncio.sleep(self._window)  # a short wait for batch-mates
            self._drop_cancelled()
            if head not in self._pending:
                return
            batch = self._compatible(head, runner)
        self._pending = [row for row in self._pending if row not in batch]
        self.batches += 1
        try:
            await self._on_device(_run_batch, runner, batch)
        except Exception as error:  # the device thread is gone (the engine is closing)
            for row in batch:
                _finish(row, ("error", error))
            raise

    def _compatible(self, head: _Row, runner: Runner) -> list[_Row]:
        key = runner.batch_key(head.request)
        if key is None:
            return [head]
        return [
            row
            for row in self._pending
            if row.model == head.model and runner.batch_key(row.request) == key
        ][: runner.batch_size(head.request)]

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._pending if r.cancel.is_set()]:
            self._end(row, ("error", StepCancelled(0, row.request.steps)))

    def _end(self, row: _Row, message: tuple[Any, ...]) -> None:
        if row in self._pending:
            self._pending.remove(row)
        if not row.ended:
            row.ended = True
            row.post(message)

    def close(self) -> None:
        """Stops scheduling; rows still waiting end with an error (a batch on the device
        thread finishes and reports)."""
        for row in list(self._pending):
            self._end(row, ("error", RuntimeError("the engine stopped")))
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# The pipeline's stages that the metrics time, under their metric names.
_TIMED_STAGES = {"denoising": "denoise", "decoding": "decode"}


class _Watch:
    """The BatchWatch of one batch: fans the batch's steps, stages and previews out to its
    rows' consumers (on the device thread), and times its steps and stages."""

    def __init__(self, rows: Sequence[_Row]) -> None:
        self._rows = rows
        self._last = time.perf_counter()
        self._stage, self._stage_started = "", self._last
        self._step_seconds = metrics.ENGINE_STEP_SECONDS.labels(rows[0].model)

    def stage(self, name: str) -> None:
        self.end_stage()
        self._stage, self._stage_started = name, time.perf_counter()
        for row in self._rows:
            if not row.ended:
                row.post(("stage", name))

    def end_stage(self) -> None:
        """Observes the stage in progress, if the metrics time it."""
        timed = _TIMED_STAGES.get(self._stage)
        if timed is not None:
            metrics.JOB_STAGE_SECONDS.labels(timed).observe(
                time.perf_counter() - self._stage_started
            )
        self._stage = ""

    def step(self, done: int, total: int, latents: Any) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self._step_seconds.observe(seconds)
        for i, row in enumerate(self._rows):
            if row.ended:
                continue
            row.steps_done = done
            row.post(("step", row.variant_index, done, seconds))
            every = row.preview_every
            if every and latents is not None and done % every == 0 and done < total:
                row.post(("preview", row.variant_index, done, latent_preview(latents[i])))

    def dropped(self, row: int) -> bool:
        r = self._rows[row]
        if not r.ended and r.cancel.is_set():
            r.ended = True
            r.post(("error", StepCancelled(r.steps_done, r.request.steps)))
        return r.ended


def _run_batch(runner: Runner, rows: Sequence[_Row]) -> None:
    """Runs on the device thread: render the batch, encode each image, report to each row."""
    watch = _Watch(rows)
    metrics.ENGINE_BATCH_ROWS.observe(len(rows))
    started = time.perf_counter()
    try:
        images = runner.render([row.request for row in rows], watch)
    except StepCancelled as stopped:
        for row in rows:
            _finish(row, ("error", StepCancelled(stopped.steps_done, stopped.total_steps)))
        return
    except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutines
        for row in rows:
            _finish(row, ("error", error))
        return
    render_ms = (time.perf_counter() - started) * 1e3
    watch.end_stage()
    watch.stage("encoding_png")
    for row, image in zip(rows, images, strict=True):
        if image is None or row.ended:
            _finish(row, ("error", StepCancelled(row.steps_done, row.request.steps)))
            continue
        encoding = time.perf_counter()
        png = encode_png(image)
        _finish(
            row,
            (
                "done",
                Rendered(
                    variant_index=row.variant_index,
                    seed=row.request.seed,
                    png=png,
                    sha256=hashlib.sha256(png).hexdigest(),
                    width=image.width,
                    height=image.height,
                    render_ms=render_ms,
                    encode_ms=(time.perf_counter() - encoding) * 1e3,
                    batch_size=len(rows),
                ),
            ),
        )


def _finish(row: _Row, message: tuple[Any, ...]) -> None:
    if not row.ended:
        row.ended = True
        row.post(message)


class _Quiet:
    """The BatchWatch of a render nobody watches (the warm-up)."""

    def stage(self, name: str) -> None:
        pass

    def step(self, done: int, total: int, latents: Any) -> None:
        pass

    def dropped(self, row: int) -> bool:
        return False


def _warm_up(runner: Runner, request: RenderRequest) -> None:
    runner.render([request], _Quiet())


def _folder_bytes(path: Path) -> int:
    """Weights on disk: what a model will take once loaded, near enough to plan by."""
    suffixes = {".safetensors", ".bin", ".pt", ".pth"}
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in suffixes)


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
