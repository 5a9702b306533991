"""The engine: batches that do not change the bytes, per-job cancel inside a batch, ordered
progress, previews, and models resident within a memory budget."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from services.common.models import ModelSpec, Registry, load_registry
from services.common.settings import ROOT
from services.common.spec import GuidanceImage, Spec, resolve
from services.generator.engine import Engine, Preview, Rendered, Stage, Step, Update
from services.generator.guidance import Guidance
from services.generator.pipeline import StepCancelled


@pytest.fixture(scope="module")
def registry(model_dir: Path) -> Registry:
    return load_registry(ROOT / "deploy" / "models" / "tiny.json", model_dir)


@pytest.fixture
async def engine(registry: Registry) -> AsyncIterator[Engine]:
    # A long window: rows submitted together surely share a batch.
    engine = Engine(registry, batch_window_s=0.05)
    await engine.start(warm_up=False)
    yield engine
    engine.close()


def job(registry: Registry, **changes: object) -> Spec:
    base = Spec(prompt="a red fox in snow", seed=21, num_variants=1, width=64, height=64, steps=4)
    return resolve(dataclasses.replace(base, **changes), registry)  # type: ignore[arg-type]


async def updates(
    engine: Engine, spec: Spec, cancel: threading.Event | None = None, preview_every: int = 0
) -> list[Update]:
    cancel = cancel or threading.Event()
    return [u async for u in engine.render(spec, cancel, preview_every=preview_every)]


def images(items: list[Update]) -> list[Rendered]:
    return sorted((u for u in items if isinstance(u, Rendered)), key=lambda r: r.variant_index)


async def test_two_jobs_batched_together_each_give_their_solo_bytes(
    engine: Engine, registry: Registry
) -> None:
    first, second = job(registry), job(registry, prompt="a blue whale", seed=5)
    together = await asyncio.gather(updates(engine, first), updates(engine, second))
    (a,), (b,) = images(together[0]), images(together[1])
    assert a.batch_size == b.batch_size == 2
    (solo_a,) = images(await updates(engine, first))
    (solo_b,) = images(await updates(engine, second))
    assert solo_a.batch_size == solo_b.batch_size == 1
    assert (a.sha256, b.sha256) == (solo_a.sha256, solo_b.sha256)
    assert a.sha256 != b.sha256


async def test_variants_of_one_job_share_a_batch_and_equal_solo_jobs_with_seed_plus_i(
    engine: Engine, registry: Registry
) -> None:
    variants = images(await updates(engine, job(registry, num_variants=3)))
    assert [v.batch_size for v in variants] == [3, 3, 3]
    for i, variant in enumerate(variants):
        (solo,) = images(await updates(engine, job(registry, seed=21 + i)))
        assert (variant.seed, variant.sha256) == (21 + i, solo.sha256)


async def test_cancelling_one_job_in_a_batch_stops_it_within_a_step_and_its_mate_completes(
    engine: Engine, registry: Registry
) -> None:
    steps = 30
    doomed, mate = job(registry, steps=steps), job(registry, steps=steps, seed=99)
    cancel = threading.Event()
    seen: list[int] = []

    async def run_doomed() -> int:
        try:
            async for item in engine.render(doomed, cancel):
                if isinstance(item, Step):
                    seen.append(item.step)
                    if item.step >= 3:
                        cancel.set()
        except StepCancelled as stopped:
            return stopped.steps_done
        raise AssertionError("the cancelled job finished")

    stopped_at, mate_items = await asyncio.gather(run_doomed(), updates(engine, mate))
    # The flag is read after every step: at most one more step runs once it is set.
    assert 3 <= stopped_at <= seen[-1] + 1 <= 5
    (finished,) = images(mate_items)
    assert finished.batch_size == 2
    (solo,) = images(await updates(engine, mate))
    assert finished.sha256 == solo.sha256


async def test_steps_arrive_in_order_with_stages_and_a_falling_eta(
    engine: Engine, registry: Registry
) -> None:
    items = await updates(engine, job(registry, steps=6, num_variants=2))
    steps = [u for u in items if isinstance(u, Step)]
    assert [s.step for s in steps] == sorted(s.step for s in steps)
    assert steps[-1].step == 6 and steps[-1].percent == pytest.approx(100.0)
    assert steps[-1].eta_ms == 0 and steps[0].eta_ms > 0
    stages = [u.name for u in items if isinstance(u, Stage)]
    # A fresh engine (no warm-up) loads the model first.
    expected = ["loading_model", "encoding_prompt", "denoising", "decoding", "encoding_png"]
    assert stages == expected
    last_step = max(i for i, u in enumerate(items) if isinstance(u, Step))
    first_image = min(i for i, u in enumerate(items) if isinstance(u, Rendered))
    assert last_step < first_image


async def test_previews_come_every_k_steps_as_small_pngs(
    engine: Engine, registry: Registry
) -> None:
    items = await updates(engine, job(registry, steps=6, width=128, height=64), preview_every=2)
    previews = [u for u in items if isinstance(u, Preview)]
    assert [p.step for p in previews] == [2, 4]  # none at the last step: the image comes
    import io

    with Image.open(io.BytesIO(previews[0].png)) as preview:
        assert preview.size == (128 // 8, 64 // 8)
    assert len(previews[0].png) < 2048


async def test_img2img_progress_counts_the_steps_it_runs_and_previews_them(
    engine: Engine, registry: Registry
) -> None:
    """At strength 0.5 an 8-step img2img render runs the last 4 steps: progress goes 1..4 of 4
    to 100%, and previews come from the guided pipeline as from the plain one."""
    reference = GuidanceImage(key="uploads/ab/reference.png", role="reference")
    spec = job(registry, steps=8, guidance_images=(reference,), strength=0.5)
    assert spec.denoising_steps() == 4
    guided = Guidance(reference=Image.new("RGB", (64, 64), (200, 40, 40)), strength=0.5)
    cancel = threading.Event()
    items = [u async for u in engine.render(spec, cancel, guidance=guided, preview_every=2)]
    steps = [u for u in items if isinstance(u, Step)]
    assert [(s.step, s.total_steps) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [s.percent for s in steps] == pytest.approx([25.0, 50.0, 75.0, 100.0])
    assert [p.step for p in items if isinstance(p, Preview)] == [2]
    assert len(images(items)) == 1


async def test_a_request_waits_at_most_one_batch_behind_an_incompatible_one(
    engine: Engine, registry: Registry
) -> None:
    first, later = job(registry, seed=1), job(registry, seed=2)
    other = job(registry, width=128, height=128)  # another shape: never in their batch
    finished: list[str] = []

    async def run(name: str, spec: Spec) -> list[Update]:
        items = await updates(engine, spec)
        finished.append(name)
        return items

    before = engine.batches
    results = await asyncio.gather(run("first", first), run("other", other), run("later", later))
    # The oldest row leads each batch: `later` joins `first`'s batch, `other` runs right after.
    assert [images(r)[0].batch_size for r in results] == [2, 1, 2]
    assert finished == ["first", "later", "other"]
    assert engine.batches - before == 2


async def test_a_cancelled_queued_row_never_renders(engine: Engine, registry: Registry) -> None:
    cancel = threading.Event()
    cancel.set()
    before = engine.batches
    with pytest.raises(StepCancelled) as stopped:
        await updates(engine, job(registry), cancel)
    assert stopped.value.steps_done == 0
    await asyncio.sleep(0.1)
    assert engine.batches == before


async def test_three_models_in_a_two_model_budget_unload_the_least_recently_used(
    registry: Registry, model_dir: Path
) -> None:
    tiny = registry.get("tiny-sd")
    models = {
        name: dataclasses.replace(tiny, id=name, version=name) for name in ("one", "two", "three")
    }
    three = Registry(models=models, default="one")
    probe = Engine(three)
    size = (await probe.load("one")).memory_bytes()
    probe.close()
    engine = Engine(three, memory_budget_bytes=int(2.5 * size))
    try:
        await engine.load("one")
        await engine.load("two")
        await engine.load("one")  # now "two" is the least recently used
        await engine.load("three")
        assert engine.resident == ["one", "three"]
        (image,) = images(await updates(engine, job(three, model="two")))
        assert engine.resident == ["three", "two"]
        assert image.width == 64
    finally:
        engine.close()


def test_a_model_entry_defaults_to_no_batching() -> None:
    spec = ModelSpec(id="m", family="sd", path="/models/m", version="1")
    assert spec.max_batch == 1


def test_large_images_render_in_smaller_fixed_batches_under_the_pixel_budget() -> None:
    spec = ModelSpec(
        id="m", family="sd", path="/m", version="1", max_batch=4, batch_pixels=128 * 128 * 4
    )
    assert spec.batch_shape(64, 64) == 4  # capped by max_batch
    assert spec.batch_shape(128, 128) == 4
    assert spec.batch_shape(256, 128) == 2
    assert spec.batch_shape(256, 256) == 1
    assert spec.batch_shape(1024, 1024) == 1
    assert dataclasses.replace(spec, batch_pixels=0).batch_shape(1024, 1024) == 4
