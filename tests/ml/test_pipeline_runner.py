"""SdRunner: reproducible pixels, requested sizes, per-step progress and cancellation."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from services.generator.pipeline import (
    RenderRequest,
    SdRunner,
    StepCancelled,
    encode_png,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUEST = RenderRequest(
    prompt="a photo of a cat",
    negative_prompt="",
    width=64,
    height=64,
    steps=4,
    guidance_scale=7.5,
    seed=1234,
)


def _no_progress(done: int, total: int) -> None:
    pass


def _never() -> bool:
    return False


def _png(runner: SdRunner, req: RenderRequest) -> bytes:
    return encode_png(runner.render_one(req, _no_progress, _never))


def test_render_same_seed_gives_identical_png_bytes(runner: SdRunner) -> None:
    assert _png(runner, REQUEST) == _png(runner, REQUEST)


def test_render_different_seeds_differ(runner: SdRunner) -> None:
    other = dataclasses.replace(REQUEST, seed=REQUEST.seed + 1)
    assert _png(runner, REQUEST) != _png(runner, other)


def test_render_negative_prompt_changes_pixels(runner: SdRunner) -> None:
    other = dataclasses.replace(REQUEST, negative_prompt="blurry")
    assert _png(runner, REQUEST) != _png(runner, other)


def test_render_respects_requested_size(runner: SdRunner) -> None:
    image = runner.render_one(
        dataclasses.replace(REQUEST, width=64, height=96), _no_progress, _never
    )
    assert image.size == (64, 96)
    assert image.mode == "RGB"


def test_render_rejects_size_not_multiple_of_8(runner: SdRunner) -> None:
    with pytest.raises(ValueError, match="width"):
        runner.render_one(dataclasses.replace(REQUEST, width=100), _no_progress, _never)


def test_on_step_called_for_every_step(runner: SdRunner) -> None:
    calls: list[tuple[int, int]] = []
    runner.render_one(
        dataclasses.replace(REQUEST, steps=5), lambda d, t: calls.append((d, t)), _never
    )
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_should_stop_cancels_at_next_step(runner: SdRunner) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(StepCancelled) as cancelled:
        runner.render_one(REQUEST, lambda d, t: calls.append((d, t)), lambda: len(calls) >= 2)
    assert calls == [(1, 4), (2, 4)]
    assert (cancelled.value.steps_done, cancelled.value.total_steps) == (2, 4)


def test_should_stop_before_start_runs_no_step(runner: SdRunner) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(StepCancelled) as cancelled:
        runner.render_one(REQUEST, lambda d, t: calls.append((d, t)), lambda: True)
    assert calls == []
    assert cancelled.value.steps_done == 0


def test_render_after_cancel_matches_uncancelled(runner: SdRunner) -> None:
    before = _png(runner, REQUEST)
    with pytest.raises(StepCancelled):
        runner.render_one(REQUEST, _no_progress, lambda: True)
    assert _png(runner, REQUEST) == before


def test_render_in_fresh_process_matches(runner: SdRunner, tiny_sd_dir: Path) -> None:
    script = (
        "import hashlib, json, sys\n"
        "from pathlib import Path\n"
        "from services.generator.pipeline import SdRunner, RenderRequest, encode_png\n"
        "runner = SdRunner(Path(sys.argv[1]))\n"
        "req = RenderRequest(**json.loads(sys.argv[2]))\n"
        "image = runner.render_one(req, lambda done, total: None, lambda: False)\n"
        "print(hashlib.sha256(encode_png(image)).hexdigest())\n"
    )
    request_json = json.dumps(dataclasses.asdict(REQUEST))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(tiny_sd_dir), request_json],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(_png(runner, REQUEST)).hexdigest()


def test_encode_png_ignores_image_metadata() -> None:
    pixels = Image.new("RGB", (8, 8), (10, 200, 30))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made at 12:00")
    annotated = io.BytesIO()
    pixels.save(annotated, format="PNG", pnginfo=info, dpi=(300, 300))
    reloaded = Image.open(io.BytesIO(annotated.getvalue()))
    assert reloaded.info  # the metadata is there to be ignored
    assert encode_png(reloaded) == encode_png(pixels)


def test_runner_rejects_unknown_dtype(tiny_sd_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        SdRunner(tiny_sd_dir, dtype="float8")
