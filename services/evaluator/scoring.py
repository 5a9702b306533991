"""Score a job's variants: CLIP agreement with the prompt and LPIPS perceptual distances.

For each image `Scorer.score` gives
- a CLIP score, 100 * max(cos(image embedding, prompt embedding), 0), from an open_clip model
  loaded from a local folder (see services/evaluator/tiny_models.py for the layout);
- its diversity, the mean LPIPS distance to the other images of the set (None when alone);
- its LPIPS distance to a reference image, when one is given;
and picks the primary image: the highest CLIP score, the lowest index among equals.

LPIPS uses AlexNet features. The lpips package ships only its calibrated linear heads; the
AlexNet backbone comes from a local weights file (torchvision's `alexnet` state dict) or, without
one, is randomly initialised from a fixed seed, which keeps distances reproducible but makes them
only a rough proxy for perceptual distance. Scoring is synchronous and deterministic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from services.common.torch_compat import prepare_torch

prepare_torch()

import lpips  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# Images are resized to this square before LPIPS, so any two images can be compared.
LPIPS_SIDE = 128
# Seed for the AlexNet backbone when no weights file is given.
_RANDOM_BACKBONE_SEED = 0


@dataclass(frozen=True)
class Scores:
    """Scores of a set of images, in the order the images were given."""

    clip: list[float]
    diversity: list[float | None]
    to_reference: list[float | None]
    primary_index: int


class Scorer:
    """An open_clip model and an LPIPS network, loaded once, used for many score() calls."""

    def __init__(self, clip_dir: Path, lpips_backbone: Path | None = None) -> None:
        self._clip, _, self._preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{clip_dir}"
        )
        self._clip.eval()
        self._tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
        self._lpips = _load_lpips(lpips_backbone)
        backbone = "random-backbone" if lpips_backbone is None else lpips_backbone.name
        self.models: list[str] = [f"open_clip:{clip_dir.name}", f"lpips:alex({backbone})"]

    def score(
        self, images: list[Image.Image], prompt: str, reference: Image.Image | None = None
    ) -> Scores:
        """Score `images` against `prompt` and, if given, `reference`."""
        if not images:
            raise ValueError("no images to score")
        with torch.inference_mode():
            clip = self._clip_scores(images, prompt)
            diversity = self._diversity(images)
            if reference is None:
                to_reference: list[float | None] = [None] * len(images)
            else:
                to_reference = list(self._lpips_to(images, reference))
        return Scores(clip, diversity, to_reference, pick_primary(clip))

    # Every network call below sees one image (or one pair): batched matrix products round
    # differently from solo ones, and an image's scores must not depend on the set around it.

    def _clip_scores(self, images: list[Image.Image], prompt: str) -> list[float]:
        text_emb = self._clip.encode_text(self._tokenizer([prompt]), normalize=True)[0]
        scores = []
        for image in images:
            pixels = self._preprocess(image.convert("RGB")).unsqueeze(0)
            image_emb = self._clip.encode_image(pixels, normalize=True)[0]
            scores.append(100.0 * max(float(image_emb @ text_emb), 0.0))
        return scores

    def _diversity(self, images: list[Image.Image]) -> list[float | None]:
        count = len(images)
        if count == 1:
            return [None]
        pixels = [_lpips_input(image) for image in images]
        totals = [0.0] * count
        for i in range(count):
            for j in range(i + 1, count):
                distance = self._distance(pixels[i], pixels[j])
                totals[i] += distance
                totals[j] += distance
        return [total / (count - 1) for total in totals]

    def _lpips_to(self, images: list[Image.Image], reference: Image.Image) -> list[float]:
        target = _lpips_input(reference)
        return [self._distance(_lpips_input(image), target) for image in images]

    def _distance(self, first: torch.Tensor, second: torch.Tensor) -> float:
        return float(self._lpips(first.unsqueeze(0), second.unsqueeze(0)))


def pick_primary(clip_scores: list[float]) -> int:
    """Index of the highest score; the lowest such index when several are equal."""
    return max(range(len(clip_scores)), key=lambda i: (clip_scores[i], -i))


def _lpips_input(image: Image.Image) -> torch.Tensor:
    """(3, side, side) float tensor in [-1, 1], the range LPIPS expects."""
    square = image.convert("RGB").resize((LPIPS_SIDE, LPIPS_SIDE), Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    pixels = data.view(LPIPS_SIDE, LPIPS_SIDE, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def _load_lpips(backbone_file: Path | None) -> lpips.LPIPS:
    with warnings.catch_warnings():
        # lpips builds AlexNet with torchvision's `pretrained=` argument, deprecated since 0.13.
        warnings.filterwarnings(
            "ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="Arguments other than a weight enum", category=UserWarning
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_BACKBONE_SEED)
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone_file is not None:
        _load_alexnet_features(model.net, backbone_file)
    return model.eval()


def _load_alexnet_features(net: torch.nn.Module, weights_file: Path) -> None:
    """Copy torchvision AlexNet weights (`features.<i>.*` keys) into lpips' sliced AlexNet.

    lpips keeps torchvision's layer numbering inside its slices (`slice2.3.weight` is
    `features.3.weight`), so the name after the slice is the torchvision index.
    """
    if weights_file.suffix == ".safetensors":
        state = load_file(str(weights_file))
    else:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    features = {
        name.removeprefix("features."): tensor
        for name, tensor in state.items()
        if name.startswith("features.")
    }
    own = {name.split(".", 1)[1]: name for name, _ in net.named_parameters()}
    missing = sorted(set(own) - set(features))
    if missing:
        raise ValueError(f"{weights_file}: no AlexNet weights for features.{missing[0]}")
    net.load_state_dict({own[key]: features[key] for key in own})
