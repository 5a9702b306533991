"""Image safety: a verdict per image from the policy's [image] section (services/safety/policy.py).

Each concept (a category, CLIP prompts and a threshold) scores an image by the highest cosine
similarity between the image's CLIP embedding and the concept's prompt embeddings (encoded once,
at start). A concept flags the image when its score reaches its threshold; the verdict's category
is the flagged concept with the widest margin over its threshold. The optional NudeNet layer
scores an image by its most confident detection of one of the configured labels and flags it as
its category the same way.

Concept thresholds are similarities of a trained CLIP: with an uncalibrated CLIP the concepts only
report (scores logged at DEBUG, nothing flagged) unless the policy sets enforce_uncalibrated.
NudeNet is a trained detector and always counts. A disabled policy flags nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from services.common.server import StartupRefused
from services.common.torch_compat import prepare_torch
from services.safety.policy import ImagePolicy, NudeNetLayer

if TYPE_CHECKING:
    from services.evaluator.scoring import Scorer

prepare_torch()

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("imagegen.evaluator.safety")

NUDENET_SCORE = "nudenet"  # the NudeNet layer's key in a verdict's scores
NUDENET_PACKAGES = ("nudenet", "onnxruntime", "cv2")


@dataclass(frozen=True)
class Verdict:
    """The safety check's answer for one image: withhold it (`flagged`) as `category`; `scores`
    has every concept's score (for operators, never for clients)."""

    flagged: bool
    category: str
    scores: dict[str, float]


class NudeNetDetector:
    """NudeNet's ONNX detector (the optional `nudenet` package, AGPL-3.0): the most confident
    detection of one of the layer's labels."""

    def __init__(self, layer: NudeNetLayer) -> None:
        nudenet = importlib.import_module("nudenet")  # optional: imported only when enabled
        self._labels = set(layer.labels)
        self._detector: Any = nudenet.NudeDetector()

    def score(self, image: Image.Image) -> float:
        # NudeDetector.detect(path) reads the file with cv2.imread: give it the same BGR array.
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        detections = self._detector.detect(bgr)
        return max(
            (float(d["score"]) for d in detections if d["class"] in self._labels), default=0.0
        )


def check_nudenet_installed(policy: ImagePolicy, policy_file: str) -> None:
    """StartupRefused when the policy uses NudeNet and its packages are not installed."""
    if not (policy.enabled and policy.nudenet.enabled):
        return
    missing = [name for name in NUDENET_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise StartupRefused(
            f"{policy_file}: image.nudenet is enabled but not installed (missing "
            f"{', '.join(missing)}: pip install -r requirements/nudenet.txt, AGPL-3.0)"
        )


class ImageScreen:
    """The policy's image checks, with the concepts' prompt embeddings in hand."""

    def __init__(
        self,
        policy: ImagePolicy,
        clip_calibrated: bool,
        concept_embeddings: dict[str, torch.Tensor],
        nudenet: NudeNetDetector | None = None,
    ) -> None:
        self._policy = policy
        self._concepts = [(c, concept_embeddings[c.category]) for c in policy.concepts]
        self._nudenet = nudenet
        self.enabled = policy.enabled
        self._concepts_flag = policy.enabled and (clip_calibrated or policy.enforce_uncalibrated)
        self.enforced = self._concepts_flag or (policy.enabled and nudenet is not None)

    def verdict(self, embedding: torch.Tensor, image: Image.Image) -> Verdict:
        """The verdict for one image from its unit CLIP embedding (and pixels, for NudeNet)."""
        if not self.enabled:
            return Verdict(False, "", {})
        scores: dict[str, float] = {}
        margins: list[tuple[float, str]] = []
        for concept, prompts in self._concepts:
            score = float((prompts @ embedding).max())
            scores[concept.category] = score
            if self._concepts_flag and score >= concept.threshold:
                margins.append((score - concept.threshold, concept.category))
        if self._nudenet is not None:
            layer = self._policy.nudenet
            score = self._nudenet.score(image)
            scores[NUDENET_SCORE] = score
            if score >= layer.threshold:
                margins.append((score - layer.threshold, layer.category))
        if not self._concepts_flag:
            log.debug("image concept scores (reported, not enforced): %s", scores)
        if not margins:
            return Verdict(False, "", scores)
        # The widest margin; the first in policy order among equals.
        category = max(enumerate(margins), key=lambda m: (m[1][0], -m[0]))[1][1]
        log.info("image flagged as %s (scores %s)", category, scores)
        return Verdict(True, category, scores)


def build_screen(policy: ImagePolicy, scorer: Scorer) -> ImageScreen:
    """The screen of `policy`: each concept's prompts encoded by `scorer`'s CLIP, NudeNet loaded
    when enabled. Run it on the scoring thread."""
    prompts = [p for concept in policy.concepts for p in concept.prompts]
    by_prompt = dict(zip(prompts, scorer.text_embeddings(prompts), strict=True))
    concepts = {c.category: torch.stack([by_prompt[p] for p in c.prompts]) for c in policy.concepts}
    nudenet = NudeNetDetector(policy.nudenet) if policy.enabled and policy.nudenet.enabled else None
    return ImageScreen(policy, scorer.clip_model.calibrated, concepts, nudenet)
