"""The evaluator's domain: score images (Evaluate) and screen them (Screen), knowing nothing of
gRPC.

A call reads its images (from the object store by key, or inline), decodes each once (in a
worker thread, no torch), then hands the decoded images to the batcher: concurrent calls share
scoring rounds on the one scoring thread, where every image of the round is CLIP-encoded
together (Screen's and Evaluate's alike) before the sets are scored and the verdicts given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from services.common import metrics
from services.common.errors import InvalidArgument, NotFound
from services.common.objectstore import ObjectStore, check_key
from services.evaluator.batcher import Batcher
from services.evaluator.client import ScoringModel
from services.evaluator.images import DecodedImage, decode
from services.evaluator.safety import ImageScreen, Verdict
from services.evaluator.scoring import Scorer, Scores, ScoreSet


@dataclass(frozen=True)
class ImageInput:
    """An image of a request: an object-store key or the file's bytes; `field` names it in
    errors."""

    field: str
    key: str = ""
    data: bytes = b""


@dataclass(frozen=True)
class EvaluateResult:
    scores: Scores
    clip_model: ScoringModel
    lpips_model: ScoringModel

    @property
    def scoring_models(self) -> list[ScoringModel]:
        return [self.clip_model, self.lpips_model]

    @property
    def models(self) -> list[str]:
        return [m.name for m in self.scoring_models]


@dataclass(frozen=True)
class ScreenResult:
    verdicts: list[Verdict]
    enforced: bool


@dataclass(frozen=True)
class _ScreenWork:
    images: Sequence[DecodedImage]


_Work = ScoreSet | _ScreenWork
_Result = Scores | list[Verdict]


class Evaluator:
    def __init__(
        self,
        scorer: Scorer,
        screen: ImageScreen,
        objects: ObjectStore,
        executor: ThreadPoolExecutor,
        window_s: float,
        max_batch_images: int,
    ) -> None:
        self.scorer = scorer
        self._screen = screen
        self._objects = objects
        self.batcher: Batcher[_Work, _Result] = Batcher(
            self._round, _image_count, window_s, max_batch_images, executor
        )

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    async def evaluate(
        self, images: Sequence[ImageInput], prompt: str, reference: ImageInput | None
    ) -> EvaluateResult:
        """Scores `images` against `prompt` and each other, and against `reference` if given."""
        inputs = [*images, *([] if reference is None else [reference])]
        decoded = await self._decode(inputs)
        work = ScoreSet(decoded[: len(images)], prompt, None if reference is None else decoded[-1])
        scores = await self.batcher.submit(work)
        assert isinstance(scores, Scores)
        return EvaluateResult(scores, self.scorer.clip_model, self.scorer.lpips_model)

    async def screen(self, images: Sequence[ImageInput]) -> ScreenResult:
        """A verdict per image, in order; whether the policy is enforced."""
        decoded = await self._decode(images)
        if not self._screen.enabled:
            return ScreenResult([Verdict(False, "", {}) for _ in decoded], False)
        verdicts = await self.batcher.submit(_ScreenWork(decoded))
        assert isinstance(verdicts, list)
        return ScreenResult(verdicts, self._screen.enforced)

    async def _decode(self, inputs: Sequence[ImageInput]) -> list[DecodedImage]:
        """Every input read and decoded; one InvalidArgument listing each bad one."""
        results = await asyncio.gather(
            *(self._decode_one(i) for i in inputs), return_exceptions=True
        )
        violations = [v for r in results if isinstance(r, InvalidArgument) for v in r.violations]
        if violations:
            raise InvalidArgument(violations)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, DecodedImage)]

    async def _decode_one(self, image: ImageInput) -> DecodedImage:
        data = image.data
        if image.key:
            check_key(image.key, image.field)
            try:
                data = await self._objects.get(image.key)
            except NotFound:
                raise InvalidArgument.one(image.field, f"no object {image.key}") from None
        return await asyncio.to_thread(decode, data, image.field)

    def _round(self, works: Sequence[_Work]) -> list[_Result]:
        """One scoring round, on the scoring thread: every image encoded together, then each
        work's scores or verdicts."""
        every = [image for work in works for image in work.images]  # references: LPIPS only
        metrics.EVALUATOR_BATCH_IMAGES.observe(sum(_image_count(work) for work in works))
        embeddings = self.scorer.image_embeddings(every)
        by_digest = {image.digest: e for image, e in zip(every, embeddings, strict=True)}
        sets = [work for work in works if isinstance(work, ScoreSet)]
        scored = iter(self.scorer.score_sets(sets, by_digest) if sets else [])
        results: list[_Result] = []
        for work in works:
            if isinstance(work, ScoreSet):
                results.append(next(scored))
            else:
                results.append(
                    [self._screen.verdict(by_digest[i.digest], i.image) for i in work.images]
                )
        return results


def _image_count(work: _Work) -> int:
    reference = isinstance(work, ScoreSet) and work.reference is not None
    return len(work.images) + reference
