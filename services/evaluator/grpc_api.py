"""EvaluatorService over gRPC: fetch the images, score them on the scoring thread."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from imagegen.v1 import evaluator_service_pb2 as pb
from imagegen.v1 import evaluator_service_pb2_grpc, types_pb2
from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.objectstore import ObjectStore, check_key
from services.evaluator.scoring import Scorer

Context = grpc.aio.ServicerContext[Any, Any]
MAX_IMAGES = 16


class EvaluatorServicer(evaluator_service_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, objects: ObjectStore) -> None:
        self.scorer: Scorer | None = None  # set once the models are loaded
        self._objects = objects
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")

    async def _image(self, key: str, field: str) -> Image.Image:
        check_key(key, field)
        try:
            data = await self._objects.get(key)
            image = Image.open(io.BytesIO(data))
            return image.convert("RGB")
        except NotFound:
            raise InvalidArgument.one(field, f"no object {key}") from None
        except UnidentifiedImageError:
            raise InvalidArgument.one(field, "not an image") from None

    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        scorer = self.scorer
        if scorer is None:
            raise Unavailable("the scoring models are still loading")
        if not 1 <= len(request.image_keys) <= MAX_IMAGES:
            raise InvalidArgument.one("image_keys", f"give 1..{MAX_IMAGES} keys")
        images = await asyncio.gather(
            *(self._image(k, f"image_keys[{i}]") for i, k in enumerate(request.image_keys))
        )
        reference = None
        if request.reference_key:
            reference = await self._image(request.reference_key, "reference_key")
        scores = await asyncio.get_running_loop().run_in_executor(
            self._executor, scorer.score, list(images), request.prompt, reference
        )
        evaluations = []
        for i in range(len(images)):
            evaluation = types_pb2.Evaluation(clip_score=scores.clip[i])
            if (diversity := scores.diversity[i]) is not None:
                evaluation.lpips_diversity = diversity
            if (to_reference := scores.to_reference[i]) is not None:
                evaluation.lpips_to_reference = to_reference
            evaluations.append(evaluation)
        return pb.EvaluateResponse(
            evaluations=evaluations, primary_index=scores.primary_index, models=scorer.models
        )
