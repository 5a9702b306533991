"""The evaluator as other services see it: images (keys or bytes) and a prompt in, scores out;
images in, safety verdicts out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from imagegen.v1 import evaluator_service_pb2 as pb
from imagegen.v1 import evaluator_service_pb2_grpc

from services.common.errors import from_rpc_error

# Images per Evaluate or Screen call (stored and inline together).
MAX_IMAGES_PER_CALL = 16


@dataclass(frozen=True)
class ImageScores:
    clip_score: float | None
    lpips_diversity: float | None
    lpips_to_reference: float | None
    nsfw: bool
    clip_model: str
    clip_calibrated: bool
    lpips_model: str
    lpips_calibrated: bool


@dataclass(frozen=True)
class ScoringModel:
    """A network scores came from: its name (model and weights), role ("clip" or "lpips") and
    whether its weights are real (calibrated) or a tiny seeded-random build."""

    name: str
    role: str
    calibrated: bool


@dataclass(frozen=True)
class Evaluation:
    scores: list[ImageScores]
    primary_index: int
    models: list[str]
    scoring_models: list[ScoringModel]


@dataclass(frozen=True)
class Verdict:
    """One image's safety verdict: withhold it when `flagged`, as `category`."""

    flagged: bool
    category: str
    scores: dict[str, float]


class EvaluatorClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = evaluator_service_pb2_grpc.EvaluatorServiceStub(channel)

    async def evaluate(
        self,
        image_keys: Sequence[str],
        prompt: str,
        reference_key: str = "",
        *,
        images: Sequence[bytes] = (),
        reference_image: bytes = b"",
    ) -> Evaluation:
        """Scores stored images (`image_keys`) then inline ones (`images`) against `prompt`,
        and against a reference given by key or inline."""
        request = pb.EvaluateRequest(
            image_keys=image_keys,
            prompt=prompt,
            reference_key=reference_key,
            images=images,
            reference_image=reference_image,
        )
        try:
            response = await self._stub.Evaluate(request)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        scores = [
            ImageScores(
                clip_score=e.clip_score if e.HasField("clip_score") else None,
                lpips_diversity=e.lpips_diversity if e.HasField("lpips_diversity") else None,
                lpips_to_reference=(
                    e.lpips_to_reference if e.HasField("lpips_to_reference") else None
                ),
                nsfw=e.nsfw,
                clip_model=e.clip_model,
                clip_calibrated=e.clip_calibrated,
                lpips_model=e.lpips_model,
                lpips_calibrated=e.lpips_calibrated,
            )
            for e in response.evaluations
        ]
        return Evaluation(
            scores,
            response.primary_index,
            list(response.models),
            [ScoringModel(m.name, m.role, m.calibrated) for m in response.scoring_models],
        )

    async def screen(self, images: Sequence[bytes]) -> tuple[list[Verdict], bool]:
        """A safety verdict per image (in order) and whether the policy is enforced."""
        try:
            response = await self._stub.Screen(pb.ScreenRequest(images=images))
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        verdicts = [Verdict(v.flagged, v.category, dict(v.scores)) for v in response.verdicts]
        return verdicts, response.enforced

    async def withheld_category(self, image: bytes) -> str:
        """The category the image safety policy withholds `image` under, or "" to keep it.
        Nothing is kept unscreened: an evaluator that cannot answer raises."""
        verdicts, _ = await self.screen([image])
        return verdicts[0].category if verdicts[0].flagged else ""
