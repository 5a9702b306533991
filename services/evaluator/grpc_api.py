"""EvaluatorService over gRPC: check the request, call the domain evaluator, convert back."""

from __future__ import annotations

from typing import Any

import grpc
from imagegen.v1 import evaluator_service_pb2 as pb
from imagegen.v1 import evaluator_service_pb2_grpc, types_pb2

from services.common.convert import scoring_model_to_pb
from services.common.errors import FieldViolation, InvalidArgument, Unavailable
from services.evaluator.client import MAX_IMAGES_PER_CALL
from services.evaluator.evaluator import EvaluateResult, Evaluator, ImageInput

Context = grpc.aio.ServicerContext[Any, Any]


class EvaluatorServicer(evaluator_service_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self) -> None:
        self.evaluator: Evaluator | None = None  # set once the models are loaded

    def _ready(self) -> Evaluator:
        if self.evaluator is None:
            raise Unavailable("the scoring models are still loading")
        return self.evaluator

    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        evaluator = self._ready()
        bad = []
        if not 1 <= len(request.image_keys) + len(request.images) <= MAX_IMAGES_PER_CALL:
            field = "images" if request.images else "image_keys"
            bad.append(FieldViolation(field, f"give 1..{MAX_IMAGES_PER_CALL} images in all"))
        if request.reference_key and request.reference_image:
            bad.append(FieldViolation("reference_image", "give it or reference_key, not both"))
        if bad:
            raise InvalidArgument(bad)
        images = [ImageInput(f"image_keys[{i}]", key=k) for i, k in enumerate(request.image_keys)]
        images += [ImageInput(f"images[{i}]", data=d) for i, d in enumerate(request.images)]
        reference = None
        if request.reference_key:
            reference = ImageInput("reference_key", key=request.reference_key)
        elif request.reference_image:
            reference = ImageInput("reference_image", data=request.reference_image)
        result = await evaluator.evaluate(images, request.prompt, reference)
        return evaluate_response(result)

    async def Screen(self, request: pb.ScreenRequest, context: Context) -> pb.ScreenResponse:
        evaluator = self._ready()
        if not 1 <= len(request.images) <= MAX_IMAGES_PER_CALL:
            raise InvalidArgument.one("images", f"give 1..{MAX_IMAGES_PER_CALL} images")
        images = [ImageInput(f"images[{i}]", data=d) for i, d in enumerate(request.images)]
        result = await evaluator.screen(images)
        return pb.ScreenResponse(
            verdicts=[
                pb.ScreenVerdict(flagged=v.flagged, category=v.category, scores=v.scores)
                for v in result.verdicts
            ],
            enforced=result.enforced,
        )


def evaluate_response(result: EvaluateResult) -> pb.EvaluateResponse:
    scores, clip, lpips = result.scores, result.clip_model, result.lpips_model
    evaluations = []
    for i, clip_score in enumerate(scores.clip):
        evaluation = types_pb2.Evaluation(
            clip_score=clip_score,
            clip_model=clip.name,
            clip_calibrated=clip.calibrated,
            lpips_model=lpips.name,
            lpips_calibrated=lpips.calibrated,
        )
        if (diversity := scores.diversity[i]) is not None:
            evaluation.lpips_diversity = diversity
        if (to_reference := scores.to_reference[i]) is not None:
            evaluation.lpips_to_reference = to_reference
        evaluations.append(evaluation)
    return pb.EvaluateResponse(
        evaluations=evaluations,
        primary_index=scores.primary_index,
        models=result.models,
        scoring_models=[scoring_model_to_pb(m) for m in result.scoring_models],
    )
