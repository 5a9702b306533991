"""Score sets of images: CLIP agreement with a prompt and LPIPS perceptual distances, in batches
that do not change a single bit of any score.

For each image of a set `Scorer.score_sets` gives
- a CLIP score, 100 * max(cos(image embedding, prompt embedding), 0);
- its diversity, the mean LPIPS distance to the other images of the set (None when alone);
- its LPIPS distance to the set's reference image, when there is one;
and picks the primary image: the highest CLIP score, the lowest index among equals.

Many sets (the concurrent calls of one scoring round) are scored together: every network runs
at a fixed batch shape (`BatchShapes`), padded with zero rows, so a row's arithmetic is the
same whatever its position or its batch-mates (CPU and GPU kernels pick their blocking by
shape; a different batch size could change the last bit). Each image is encoded once per round
however many sets hold it; its CLIP embedding is kept by its SHA-256 (an LRU), so an image
screened just before it is scored is not encoded again. LPIPS runs AlexNet once per image and
the calibrated heads once per pair. Not thread-safe: one thread runs a Scorer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from PIL import Image

from services.common.torch_compat import prepare_torch
from services.evaluator.client import ScoringModel
from services.evaluator.images import DecodedImage
from services.evaluator.models import ClipSource, load_clip, load_lpips

prepare_torch()

import lpips  # noqa: E402
import torch  # noqa: E402

# Images are resized to this square before LPIPS, so any two images can be compared.
LPIPS_SIDE = 128

Features = tuple[torch.Tensor, ...]  # one image's unit-normalized AlexNet layers, for LPIPS


@dataclass(frozen=True)
class BatchShapes:
    """Rows per network run: CLIP images, CLIP texts, LPIPS images (and pairs)."""

    clip_images: int = 8
    clip_texts: int = 4
    lpips: int = 8


@dataclass(frozen=True)
class ScoreSet:
    """Images to score against a prompt and, when given, a reference image."""

    images: Sequence[DecodedImage]
    prompt: str
    reference: DecodedImage | None = None


@dataclass(frozen=True)
class Scores:
    """Scores of a set of images, in the order the images were given."""

    clip: list[float]
    diversity: list[float | None]
    to_reference: list[float | None]
    primary_index: int


class Scorer:
    """A CLIP model and an LPIPS network, loaded once, used for many rounds."""

    def __init__(
        self,
        clip: ClipSource | Path,
        lpips_backbone: Path | None = None,
        shapes: BatchShapes | None = None,
        cache_size: int = 256,
    ) -> None:
        self._clip = load_clip(ClipSource(folder=clip) if isinstance(clip, Path) else clip)
        self._lpips = load_lpips(lpips_backbone)
        self.shapes = shapes or BatchShapes()
        self.clip_model: ScoringModel = self._clip.info
        self.lpips_model: ScoringModel = self._lpips.info
        self.scoring_models = [self.clip_model, self.lpips_model]
        self.models = [m.name for m in self.scoring_models]
        self._image_embeddings = _Lru(cache_size)
        self._text_embeddings = _Lru(cache_size)
        self.images_encoded = 0  # CLIP image encodings run (cache misses): for tests

    def score(
        self, images: Sequence[Image.Image], prompt: str, reference: Image.Image | None = None
    ) -> Scores:
        """Score `images` against `prompt` and, if given, `reference` (a round of one set)."""
        if not images:
            raise ValueError("no images to score")
        ref = None if reference is None else DecodedImage.of(reference)
        return self.score_sets([ScoreSet([DecodedImage.of(i) for i in images], prompt, ref)])[0]

    def score_sets(
        self, sets: Sequence[ScoreSet], embeddings: Mapping[str, torch.Tensor] | None = None
    ) -> list[Scores]:
        """Scores of each set, computed together at the fixed batch shapes; `embeddings` are
        the images' CLIP embeddings by digest when the caller has them already."""
        if any(not s.images for s in sets):
            raise ValueError("no images to score")
        with torch.inference_mode():
            image_embeddings = embeddings
            if image_embeddings is None:
                images = [image for s in sets for image in s.images]
                embedded = self.image_embeddings(images)
                image_embeddings = dict(zip(_digests(images), embedded, strict=True))
            prompts = list(dict.fromkeys(s.prompt for s in sets))
            text_embeddings = dict(zip(prompts, self.text_embeddings(prompts), strict=True))
            distances = self._distances(sets)
            return [
                _set_scores(s, image_embeddings, text_embeddings[s.prompt], distances) for s in sets
            ]

    def image_embeddings(self, images: Sequence[DecodedImage]) -> list[torch.Tensor]:
        """Unit CLIP embeddings of `images` (each image encoded once, cached by digest)."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, DecodedImage] = {}
        for image in images:
            cached = self._image_embeddings.get(image.digest)
            if cached is not None:
                found[image.digest] = cached
            elif image.digest not in todo:
                todo[image.digest] = image
        if todo:
            with torch.inference_mode():
                pixels = [self._clip.preprocess(image.image) for image in todo.values()]
                encoded = _fixed_batches(pixels, self.shapes.clip_images, self._encode_images)
            self.images_encoded += len(todo)
            for digest, (row,) in zip(todo, encoded, strict=True):
                embedding = row.clone()  # not a view: the batch's other rows can be freed
                found[digest] = embedding
                self._image_embeddings.put(digest, embedding)
        return [found[image.digest] for image in images]

    def text_embeddings(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Unit CLIP embeddings of `texts` (cached)."""
        todo = [t for t in dict.fromkeys(texts) if self._text_embeddings.get(t) is None]
        found = {t: e for t in texts if (e := self._text_embeddings.get(t)) is not None}
        if todo:
            with torch.inference_mode():
                tokens = list(self._clip.tokenizer(todo))
                encoded = _fixed_batches(tokens, self.shapes.clip_texts, self._encode_texts)
            for text, (row,) in zip(todo, encoded, strict=True):
                embedding = row.clone()
                found[text] = embedding
                self._text_embeddings.put(text, embedding)
        return [found[t] for t in texts]

    def _encode_images(self, pixels: torch.Tensor) -> Features:
        return (self._clip.model.encode_image(pixels, normalize=True),)

    def _encode_texts(self, tokens: torch.Tensor) -> Features:
        return (self._clip.model.encode_text(tokens, normalize=True),)

    def _distances(self, sets: Sequence[ScoreSet]) -> dict[tuple[str, str], float]:
        """LPIPS distance of every pair a set needs, by the pair's digests."""
        pairs: dict[tuple[str, str], None] = {}
        needed: dict[str, DecodedImage] = {}
        for s in sets:
            members = list(s.images)
            wanted = list(combinations(members, 2))
            if s.reference is not None:
                wanted += [(image, s.reference) for image in members]
            for first, second in wanted:
                if first.digest != second.digest:
                    pairs[_pair(first.digest, second.digest)] = None
                    needed[first.digest], needed[second.digest] = first, second
        if not pairs:
            return {}
        pixels = [_lpips_input(image.image) for image in needed.values()]
        encoded = _fixed_batches(pixels, self.shapes.lpips, self._features)
        features = dict(zip(needed, encoded, strict=True))
        rows = [(features[a], features[b]) for a, b in pairs]
        distances = self._pair_distances(rows)
        return dict(zip(pairs, distances, strict=True))

    def _features(self, pixels: torch.Tensor) -> Features:
        model = self._lpips.model
        layers = model.net.forward(model.scaling_layer(pixels))
        return tuple(lpips.normalize_tensor(layer) for layer in layers)

    def _pair_distances(self, rows: list[tuple[Features, Features]]) -> list[float]:
        """LPIPS of each (features, features) pair, at the fixed batch shape."""
        size = self.shapes.lpips
        layer_count = len(rows[0][0])
        distances: list[float] = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            pad = size - len(chunk)
            total = None
            for k in range(layer_count):
                first = _padded([a[k] for a, _ in chunk], pad)
                second = _padded([b[k] for _, b in chunk], pad)
                # lpips.LPIPS.forward, from the features on: heads, spatial mean, sum of layers.
                layer = lpips.spatial_average(self._lpips.model.lins[k]((first - second) ** 2))
                total = layer if total is None else total + layer
            assert total is not None
            distances += [float(total[i]) for i in range(len(chunk))]
        return distances


def pick_primary(clip_scores: list[float]) -> int:
    """Index of the highest score; the lowest such index when several are equal."""
    return max(range(len(clip_scores)), key=lambda i: (clip_scores[i], -i))


def _set_scores(
    s: ScoreSet,
    image_embeddings: Mapping[str, torch.Tensor],
    text_embedding: torch.Tensor,
    distances: dict[tuple[str, str], float],
) -> Scores:
    clip = [
        100.0 * max(float(image_embeddings[image.digest] @ text_embedding), 0.0)
        for image in s.images
    ]

    def distance(first: DecodedImage, second: DecodedImage) -> float:
        if first.digest == second.digest:
            return 0.0
        return distances[_pair(first.digest, second.digest)]

    count = len(s.images)
    diversity: list[float | None] = [None] * count
    if count > 1:
        totals = [0.0] * count
        for i, j in combinations(range(count), 2):
            d = distance(s.images[i], s.images[j])
            totals[i] += d
            totals[j] += d
        diversity = [total / (count - 1) for total in totals]
    to_reference: list[float | None] = [None] * count
    if s.reference is not None:
        to_reference = [distance(image, s.reference) for image in s.images]
    return Scores(clip, diversity, to_reference, pick_primary(clip))


def _fixed_batches(
    rows: Sequence[torch.Tensor], size: int, run: Callable[[torch.Tensor], Features]
) -> list[Features]:
    """`run` over `rows` in batches of exactly `size` rows (the last padded with zeros); each
    row's outputs, in order."""
    outputs: list[Features] = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        batch = run(_padded(chunk, size - len(chunk)))
        outputs += [tuple(out[i] for out in batch) for i in range(len(chunk))]
    return outputs


def _padded(rows: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    return torch.stack([*rows, *[torch.zeros_like(rows[0])] * pad])


def _pair(first: str, second: str) -> tuple[str, str]:
    return (first, second) if first <= second else (second, first)


def _digests(images: Sequence[DecodedImage]) -> list[str]:
    return [image.digest for image in images]


def _lpips_input(image: Image.Image) -> torch.Tensor:
    """(3, side, side) float tensor in [-1, 1], the range LPIPS expects."""
    square = image.convert("RGB").resize((LPIPS_SIDE, LPIPS_SIDE), Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    pixels = data.view(LPIPS_SIDE, LPIPS_SIDE, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class _Lru:
    """At most `size` tensors by key, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self._size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
