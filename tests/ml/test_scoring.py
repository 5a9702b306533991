"""Scorer: CLIP scores per image, LPIPS diversity and reference distance, primary choice."""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.evaluator.scoring import Scorer, pick_primary

PROMPT = "a red circle on a blue background"


def _noise(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _gradient(size: tuple[int, int] = (96, 64)) -> Image.Image:
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (size[1], 1))] * 3, axis=-1)
    return Image.fromarray(pixels, "RGB")


def _alexnet_features_file(path: Path, seed: int) -> Path:
    """A torchvision-format AlexNet weights file (features only), randomly initialised."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{name}": value for name, value in features.state_dict().items()}, path)
    return path


def test_scorer_clip_scores_are_per_image_and_in_range(scorer: Scorer) -> None:
    scores = scorer.score([_noise(1), _noise(2), _gradient()], PROMPT)
    assert len(scores.clip) == 3
    assert all(0.0 <= score <= 100.0 for score in scores.clip)
    assert len(set(scores.clip)) > 1


def test_scorer_diversity_is_none_for_a_single_image(scorer: Scorer) -> None:
    assert scorer.score([_noise(1)], PROMPT).diversity == [None]


def test_scorer_diversity_is_positive_for_different_images(scorer: Scorer) -> None:
    diversity = scorer.score([_noise(1), _gradient()], PROMPT).diversity
    assert all(d is not None and d > 0.0 for d in diversity)


def test_scorer_diversity_is_mean_distance_to_the_others(scorer: Scorer) -> None:
    a, b, c = _noise(1), _noise(2), _gradient()
    three = scorer.score([a, b, c], PROMPT).diversity
    ab, ac = (scorer.score([a, other], PROMPT).diversity[0] for other in (b, c))
    assert three[0] == pytest.approx((ab + ac) / 2)  # type: ignore[operator]


def test_scorer_identical_images_have_zero_lpips(scorer: Scorer) -> None:
    image = _noise(3)
    scores = scorer.score([image, image.copy()], PROMPT, reference=image.copy())
    assert scores.diversity == [pytest.approx(0.0, abs=1e-6)] * 2
    assert scores.to_reference == [pytest.approx(0.0, abs=1e-6)] * 2


def test_scorer_reference_distance_only_with_reference(scorer: Scorer) -> None:
    images = [_noise(1), _gradient()]
    assert scorer.score(images, PROMPT).to_reference == [None, None]
    with_reference = scorer.score(images, PROMPT, reference=_noise(1)).to_reference
    assert with_reference[0] == pytest.approx(0.0, abs=1e-6)
    assert with_reference[1] is not None and with_reference[1] > 0.0


def test_scorer_primary_is_argmax_of_clip_scores(scorer: Scorer) -> None:
    scores = scorer.score([_noise(seed) for seed in range(4)], PROMPT)
    best = max(scores.clip)
    assert scores.primary_index == scores.clip.index(best)


def test_pick_primary_prefers_lowest_index_on_ties() -> None:
    assert pick_primary([1.0, 3.0, 2.0, 3.0]) == 1
    assert pick_primary([0.0, 0.0]) == 0
    assert pick_primary([5.0]) == 0


def test_scorer_scores_do_not_depend_on_the_other_images(scorer: Scorer) -> None:
    image, reference = _noise(1), _gradient()
    alone = scorer.score([image], PROMPT, reference=reference)
    in_a_set = scorer.score([image, _noise(2), image], PROMPT, reference=reference)
    assert in_a_set.clip[0] == in_a_set.clip[2] == alone.clip[0]
    assert in_a_set.to_reference[0] == alone.to_reference[0]
    assert in_a_set.primary_index in (0, 1)


def test_scorer_is_reproducible_across_instances(scorer: Scorer, tiny_clip_dir: Path) -> None:
    images = [_noise(1), _gradient()]
    fresh = Scorer(tiny_clip_dir)
    assert fresh.score(images, PROMPT, _noise(5)) == scorer.score(images, PROMPT, _noise(5))


def test_scorer_rejects_an_empty_image_list(scorer: Scorer) -> None:
    with pytest.raises(ValueError):
        scorer.score([], PROMPT)


def test_scorer_loads_lpips_backbone_from_file(
    scorer: Scorer, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    images = [_noise(1), _gradient()]
    # lpips draws its random AlexNet from seed 0, so a file with seed 0 weights matches it ...
    same = Scorer(tiny_clip_dir, _alexnet_features_file(tmp_path / "alexnet.pth", seed=0))
    assert same.models == ["open_clip:tiny-clip", "lpips:alex(alexnet.pth)"]
    assert same.score(images, PROMPT) == scorer.score(images, PROMPT)
    # ... and one with other weights measures other distances.
    other = Scorer(tiny_clip_dir, _alexnet_features_file(tmp_path / "other.pth", seed=1))
    assert other.score(images, PROMPT).diversity != scorer.score(images, PROMPT).diversity


def _noisy(image: Image.Image, sigma: float) -> Image.Image:
    noise = np.random.default_rng(42).normal(0.0, sigma, (image.height, image.width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_lpips_to_itself_is_zero_and_grows_with_noise(scorer: Scorer) -> None:
    from services.evaluator.images import DecodedImage
    from services.evaluator.scoring import ScoreSet

    image = DecodedImage.of(_gradient((128, 128)))
    # The same pixels under another name: measured by the network, not known equal.
    itself = DecodedImage("same pixels, other name", image.image.copy())
    noisy = [DecodedImage.of(_noisy(image.image, sigma)) for sigma in (4.0, 16.0, 48.0, 96.0)]
    (scores,) = scorer.score_sets([ScoreSet([itself, *noisy], PROMPT, image)])
    assert scores.to_reference[0] == 0.0
    assert all(a < b for a, b in pairwise(scores.to_reference)), scores.to_reference  # type: ignore[operator]


@pytest.mark.parametrize("threads", sorted({1, os.cpu_count() or 1}))
def test_scores_alone_equal_scores_in_a_shared_round_exactly(
    tiny_clip_dir: Path, threads: int
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_alone_equals_together(tiny_clip_dir)
    finally:
        torch.set_num_threads(before)


def _check_alone_equals_together(tiny_clip_dir: Path) -> None:
    from services.evaluator.images import DecodedImage
    from services.evaluator.scoring import BatchShapes, ScoreSet

    scorer = Scorer(tiny_clip_dir, shapes=BatchShapes(4, 2, 4), cache_size=0)
    images = [DecodedImage.of(_noise(seed)) for seed in range(9)]
    reference = DecodedImage.of(_gradient())
    sets = [
        ScoreSet(images[0:3], PROMPT, reference),
        ScoreSet(images[3:4], "a dog on a sofa"),
        ScoreSet(images[4:9], "a red circle", images[0]),
        ScoreSet([images[6], images[5]], "a red circle"),
    ]
    alone = [scorer.score_sets([s])[0] for s in sets]
    # Together the images fill several fixed batches, each set's rows at other positions.
    assert scorer.score_sets(sets) == alone
    assert scorer.score_sets(list(reversed(sets))) == list(reversed(alone))
    # An image's CLIP score is the same in any set it is in.
    assert alone[3].clip == [alone[2].clip[2], alone[2].clip[1]]


def test_another_batch_shape_changes_last_bits(tiny_clip_dir: Path) -> None:
    """The control for the test above: the same set at other batch shapes scores differently in
    the last bits (on this CPU's kernels), so equality there comes from the fixed shape."""
    from services.evaluator.images import DecodedImage
    from services.evaluator.scoring import BatchShapes, ScoreSet

    images = [DecodedImage.of(_noise(seed)) for seed in range(9)]
    work = [ScoreSet(images, PROMPT, images[0])]
    fixed = Scorer(tiny_clip_dir, shapes=BatchShapes(4, 2, 4), cache_size=0).score_sets(work)[0]
    other = Scorer(tiny_clip_dir, shapes=BatchShapes(1, 1, 1), cache_size=0).score_sets(work)[0]
    assert other.clip != fixed.clip
    assert other.clip == pytest.approx(fixed.clip, abs=1e-4)
