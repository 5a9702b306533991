"""The evaluator over gRPC (a real server on 127.0.0.1:0, the tiny CLIP): inline and stored
images, field-named errors, concurrent calls batched without changing a score, Screen against a
test policy, and the embedding cache between Screen and Evaluate."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from imagegen.v1 import evaluator_service_pb2 as pb
from imagegen.v1 import evaluator_service_pb2_grpc
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.objectstore import open_store
from services.common.server import Service
from services.common.settings import EvaluatorSettings
from services.evaluator.client import Evaluation, EvaluatorClient
from services.evaluator.evaluator import Evaluator, ImageInput
from services.evaluator.safety import ImageScreen, build_screen
from services.evaluator.scoring import Scorer
from services.evaluator.service import start
from services.safety.policy import ImagePolicy
from tests.helpers import violations

PROMPT = "a red circle on a blue background"

# Thresholds every image reaches: only enforcement decides whether anything is flagged.
REPORT_ONLY_POLICY = """
[image]
enabled = true
enforce_uncalibrated = false
[image.concepts.red]
prompts = ["a red square", "a bright red picture"]
threshold = -1.0
[image.concepts.blue]
prompts = ["a blue sky"]
threshold = -1.0
[image.concepts.green]
prompts = ["green grass in a field", "a green leaf"]
threshold = -1.0
"""


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def policy_file(folder: Path, text: str, name: str = "policy.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def settings(tmp_path: Path, clip_dir: Path, **overrides: Any) -> EvaluatorSettings:
    values: dict[str, Any] = {
        "listen_addr": "127.0.0.1:0",
        "data_dir": tmp_path,
        "clip_dir": clip_dir,
        "torch_threads": 1,
        "grace_seconds": 1.0,
    }
    values.update(overrides)
    if "safety_policy" not in values:
        values["safety_policy"] = policy_file(tmp_path, REPORT_ONLY_POLICY)
    return EvaluatorSettings(**values)


@asynccontextmanager
async def evaluator(config: EvaluatorSettings) -> AsyncIterator[tuple[Service, grpc.aio.Channel]]:
    service = await start(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield service, channel
    finally:
        await service.stop(1.0)


@pytest.fixture
async def channel(tmp_path: Path, tiny_clip_dir: Path) -> AsyncIterator[grpc.aio.Channel]:
    async with evaluator(settings(tmp_path, tiny_clip_dir)) as (_, channel):
        yield channel


def flat(evaluation: Evaluation) -> list[tuple[float | None, ...]]:
    return [(s.clip_score, s.lpips_diversity, s.lpips_to_reference) for s in evaluation.scores]


async def test_evaluate_scores_inline_images_and_names_the_models(
    channel: grpc.aio.Channel,
) -> None:
    client = EvaluatorClient(channel)
    result = await client.evaluate([], PROMPT, images=[png(1), png(2)], reference_image=png(1))
    assert len(result.scores) == 2
    first, second = result.scores
    assert first.lpips_to_reference == 0.0
    assert second.lpips_to_reference is not None and second.lpips_to_reference > 0.0
    assert first.lpips_diversity == second.lpips_diversity
    assert first.lpips_diversity is not None and first.lpips_diversity > 0.0
    assert result.models == ["open_clip:tiny-clip", "lpips:alex(random-backbone)"]
    assert [(m.name, m.role, m.calibrated) for m in result.scoring_models] == [
        ("open_clip:tiny-clip", "clip", False),
        ("lpips:alex(random-backbone)", "lpips", False),
    ]
    assert all(
        (s.clip_model, s.clip_calibrated, s.lpips_model, s.lpips_calibrated)
        == ("open_clip:tiny-clip", False, "lpips:alex(random-backbone)", False)
        for s in result.scores
    )
    clips = [s.clip_score for s in result.scores]
    assert result.primary_index == clips.index(max(clips))


async def test_evaluate_by_key_equals_evaluate_inline(tmp_path: Path, tiny_clip_dir: Path) -> None:
    config = settings(tmp_path, tiny_clip_dir)
    objects = open_store(config)
    keys = [f"artifacts/test/{seed}.png" for seed in (1, 2, 3)]
    for seed, key in zip((1, 2, 3), keys, strict=True):
        await objects.put(key, png(seed), "image/png")
    async with evaluator(config) as (_, channel):
        client = EvaluatorClient(channel)
        by_key = await client.evaluate(keys[:2], PROMPT, keys[2])
        inline = await client.evaluate([], PROMPT, images=[png(1), png(2)], reference_image=png(3))
        mixed = await client.evaluate(keys[:1], PROMPT, images=[png(2)], reference_image=png(3))
    assert flat(by_key) == flat(inline) == flat(mixed)


async def test_evaluate_bad_image_bytes_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel,
) -> None:
    stub = evaluator_service_pb2_grpc.EvaluatorServiceStub(channel)
    request = pb.EvaluateRequest(prompt=PROMPT, images=[png(1), png(2), b"not a png"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Evaluate(request)
    assert violations(caught.value) == ["images[2]"]
    truncated = png(3)[:-40]
    request = pb.EvaluateRequest(prompt=PROMPT, images=[png(1)], reference_image=truncated)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Evaluate(request)
    assert violations(caught.value) == ["reference_image"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Screen(pb.ScreenRequest(images=[b"\x89PNG\r\n\x1a\n garbage"]))
    assert violations(caught.value) == ["images[0]"]


async def test_evaluate_refuses_missing_keys_and_too_many_images(
    channel: grpc.aio.Channel,
) -> None:
    stub = evaluator_service_pb2_grpc.EvaluatorServiceStub(channel)
    request = pb.EvaluateRequest(prompt=PROMPT, image_keys=["artifacts/none.png"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Evaluate(request)
    assert violations(caught.value) == ["image_keys[0]"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Evaluate(pb.EvaluateRequest(prompt=PROMPT, images=[png(1)] * 17))
    assert violations(caught.value) == ["images"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Screen(pb.ScreenRequest())
    assert violations(caught.value) == ["images"]


async def test_oversized_images_are_refused_from_their_header(channel: grpc.aio.Channel) -> None:
    client = EvaluatorClient(channel)
    wide = io.BytesIO()
    Image.new("RGB", (4097, 1)).save(wide, "PNG")
    # A decompression bomb: 100M pixels in a few kilobytes, past Pillow's own limit too.
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")
    assert len(bomb.getvalue()) < 100_000
    for data in (wide.getvalue(), bomb.getvalue()):
        with pytest.raises(InvalidArgument) as caught:
            await client.evaluate([], PROMPT, images=[png(1), data])
        assert [v.field for v in caught.value.violations] == ["images[1]"]
        assert "pixels" in caught.value.violations[0].description


async def test_concurrent_calls_score_exactly_as_calls_alone(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    calls = [
        ([png(1), png(2), png(3)], PROMPT, png(9)),
        ([png(2), png(4)], "a green field", b""),
        ([png(5)], PROMPT, png(1)),
        ([png(6), png(1), png(7), png(8)], "a dog", png(2)),
    ]
    # One call per round (max_batch_images=1), each alone ...
    config = settings(tmp_path, tiny_clip_dir, max_batch_images=1, embedding_cache_size=0)
    async with evaluator(config) as (_, channel):
        client = EvaluatorClient(channel)
        alone = [
            await client.evaluate([], prompt, images=images, reference_image=reference)
            for images, prompt, reference in calls
        ]
    # ... equals all of them at once, gathered into shared rounds, to the last bit.
    config = settings(tmp_path, tiny_clip_dir, scoring_window_ms=200, embedding_cache_size=0)
    async with evaluator(config) as (_, channel):
        client = EvaluatorClient(channel)
        together = await asyncio.gather(
            *(
                client.evaluate([], prompt, images=images, reference_image=reference)
                for images, prompt, reference in calls
            )
        )
    assert [flat(e) for e in together] == [flat(e) for e in alone]
    assert [e.primary_index for e in together] == [e.primary_index for e in alone]


async def test_screen_reports_without_flagging_when_the_model_is_uncalibrated(
    channel: grpc.aio.Channel,
) -> None:
    verdicts, enforced = await EvaluatorClient(channel).screen([png(1), png(2)])
    assert enforced is False
    assert [v.flagged for v in verdicts] == [False, False]
    assert [v.category for v in verdicts] == ["", ""]
    assert all(set(v.scores) == {"red", "blue", "green"} for v in verdicts)
    assert all(-1.0 <= s <= 1.0 for v in verdicts for s in v.scores.values())


async def test_screen_flags_by_the_widest_margin_over_measured_thresholds(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    image = png(11)
    async with evaluator(settings(tmp_path, tiny_clip_dir)) as (_, channel):
        (measured,), _ = await EvaluatorClient(channel).screen([image])
    red, blue, green = measured.scores["red"], measured.scores["blue"], measured.scores["green"]
    # red and blue are below their scores (flagged), red by the wider margin; green is above.
    enforcing = f"""
[image]
enabled = true
enforce_uncalibrated = true
[image.concepts.red]
prompts = ["a red square", "a bright red picture"]
threshold = {red - 0.05!r}
[image.concepts.blue]
prompts = ["a blue sky"]
threshold = {blue - 0.01!r}
[image.concepts.green]
prompts = ["green grass in a field", "a green leaf"]
threshold = {green + 0.01!r}
"""
    config = settings(tmp_path, tiny_clip_dir, safety_policy=policy_file(tmp_path, enforcing))
    async with evaluator(config) as (_, channel):
        (verdict,), enforced = await EvaluatorClient(channel).screen([image])
    assert enforced is True
    assert verdict.flagged is True
    assert verdict.category == "red"
    assert verdict.scores == measured.scores
    none_reached = enforcing.replace(f"{red - 0.05!r}", "1.0").replace(f"{blue - 0.01!r}", "1.0")
    config = settings(tmp_path, tiny_clip_dir, safety_policy=policy_file(tmp_path, none_reached))
    async with evaluator(config) as (_, channel):
        (verdict,), enforced = await EvaluatorClient(channel).screen([image])
    assert enforced is True and verdict.flagged is False and verdict.category == ""


async def test_screen_with_the_image_policy_disabled_flags_nothing(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    disabled = REPORT_ONLY_POLICY.replace("enabled = true", "enabled = false").replace(
        "enforce_uncalibrated = false", "enforce_uncalibrated = true"
    )

    config = settings(tmp_path, tiny_clip_dir, safety_policy=policy_file(tmp_path, disabled))
    async with evaluator(config) as (_, channel):
        verdicts, enforced = await EvaluatorClient(channel).screen([png(1)])
    assert enforced is False
    assert [(v.flagged, v.category) for v in verdicts] == [(False, "")]


# The domain evaluator, for what gRPC does not show: rounds and encodings.


@pytest.fixture
async def domain(
    tiny_clip_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[Evaluator, Scorer, ImageScreen]]:
    scorer = Scorer(tiny_clip_dir)
    screen = build_screen(ImagePolicy(enabled=True), scorer)
    executor = ThreadPoolExecutor(max_workers=1)
    objects = open_store(settings(tmp_path, tiny_clip_dir))
    evaluator = Evaluator(scorer, screen, objects, executor, 0.2, 64)
    evaluator.start()
    yield evaluator, scorer, screen
    await evaluator.close()
    executor.shutdown()


async def test_concurrent_calls_share_one_round(
    domain: tuple[Evaluator, Scorer, ImageScreen],
) -> None:
    evaluator, _, _ = domain
    calls = [[ImageInput(f"images[{i}]", data=png(seed + i)) for i in range(3)] for seed in (0, 10)]
    rounds = evaluator.batcher.rounds
    await asyncio.gather(
        *(evaluator.evaluate(images, PROMPT, None) for images in calls),
        evaluator.screen([ImageInput("images[0]", data=png(50))]),
    )
    assert evaluator.batcher.rounds == rounds + 1


async def test_evaluate_after_screen_does_not_encode_the_images_again(
    domain: tuple[Evaluator, Scorer, ImageScreen],
) -> None:
    evaluator, scorer, _ = domain
    images = [ImageInput(f"images[{i}]", data=png(100 + i)) for i in range(3)]
    await evaluator.screen(images)
    encoded = scorer.images_encoded
    result = await evaluator.evaluate(images, PROMPT, None)
    assert scorer.images_encoded == encoded
    assert len(result.scores.clip) == 3
    await evaluator.evaluate([ImageInput("images[0]", data=png(200))], PROMPT, None)
    assert scorer.images_encoded == encoded + 1
