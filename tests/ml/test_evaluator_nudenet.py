"""The optional NudeNet layer (AGPL-3.0, requirements/nudenet.txt): skipped where it is not
installed. Its detector scores an image by the configured labels; a score at the layer's
threshold flags the image as the layer's category, even with an uncalibrated CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nudenet")

from services.evaluator.images import DecodedImage
from services.evaluator.safety import (
    NUDENET_SCORE,
    NudeNetDetector,
    build_screen,
    check_nudenet_installed,
)
from services.evaluator.scoring import Scorer
from services.safety.policy import ImagePolicy, NudeNetLayer

LABELS = ("FACE_FEMALE", "FACE_MALE", "FEET_EXPOSED", "BELLY_EXPOSED")


def _noise(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_nudenet_detector_scores_an_image_in_zero_to_one() -> None:
    layer = NudeNetLayer(enabled=True, labels=LABELS)
    check_nudenet_installed(ImagePolicy(enabled=True, nudenet=layer), "policy.toml")
    score = NudeNetDetector(layer).score(_noise(1))
    assert 0.0 <= score <= 1.0


def test_a_nudenet_score_at_its_threshold_flags_even_with_an_uncalibrated_clip(
    tiny_clip_dir: Path,
) -> None:
    scorer = Scorer(tiny_clip_dir)
    image = DecodedImage.of(_noise(2))
    (embedding,) = scorer.image_embeddings([image])
    layer = NudeNetLayer(enabled=True, threshold=0.0, labels=LABELS, category="sexual")
    screen = build_screen(ImagePolicy(enabled=True, nudenet=layer), scorer)
    assert screen.enforced is True
    verdict = screen.verdict(embedding, image.image)
    assert (verdict.flagged, verdict.category) == (True, "sexual")
    assert NUDENET_SCORE in verdict.scores
    strict = NudeNetLayer(enabled=True, threshold=1.0, labels=LABELS, category="sexual")
    screen = build_screen(ImagePolicy(enabled=True, nudenet=strict), scorer)
    assert screen.verdict(embedding, image.image).flagged is (verdict.scores[NUDENET_SCORE] >= 1.0)
