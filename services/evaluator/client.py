"""The evaluator as other services see it: keys and a prompt in, scores out."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from imagegen.v1 import evaluator_service_pb2 as pb
from imagegen.v1 import evaluator_service_pb2_grpc

from services.common.errors import from_rpc_error


@dataclass(frozen=True)
class ImageScores:
    clip_score: float | None
    lpips_diversity: float | None
    lpips_to_reference: float | None
    nsfw: bool


@dataclass(frozen=True)
class Evaluation:
    scores: list[ImageScores]
    primary_index: int
    models: list[str]


class EvaluatorClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = evaluator_service_pb2_grpc.EvaluatorServiceStub(channel)

    async def evaluate(self, image_keys: list[str], prompt: str, reference_key: str) -> Evaluation:
        request = pb.EvaluateRequest(
            image_keys=image_keys, prompt=prompt, reference_key=reference_key
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
            )
            for e in response.evaluations
        ]
        return Evaluation(scores, response.primary_index, list(response.models))
