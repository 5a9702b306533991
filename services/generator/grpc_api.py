"""GeneratorService over gRPC: the engine without the queue, as a server stream."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from imagegen.v1 import events_pb2, generator_service_pb2_grpc, types_pb2
from imagegen.v1 import generator_service_pb2 as pb

from services.common.convert import artifact_to_pb, roles_to_pb, spec_from_pb, with_pb_fields
from services.common.errors import InvalidArgument, Unavailable
from services.common.models import Registry
from services.common.objectstore import ObjectStore
from services.common.spec import resolve
from services.evaluator.client import EvaluatorClient
from services.generator.engine import Engine, Rendered, Step, progress_event, save_image
from services.generator.guidance import load_guidance

Context = grpc.aio.ServicerContext[Any, Any]


class GeneratorServicer(generator_service_pb2_grpc.GeneratorServiceServicer):
    def __init__(
        self, engine: Engine, registry: Registry, objects: ObjectStore, evaluator: EvaluatorClient
    ) -> None:
        self._engine = engine
        self._evaluator = evaluator
        self._registry = registry
        self._objects = objects
        self.ready = False

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.ready:
            raise Unavailable("the default model is still loading")
        try:
            spec = resolve(spec_from_pb(request.spec), self._registry, require_seed=True)
        except InvalidArgument as error:
            raise with_pb_fields(error) from None
        cancel = threading.Event()  # set by the engine when this stream is closed early
        guidance = await load_guidance(spec, self._objects)
        async for item in self._engine.render(spec, cancel, guidance=guidance):
            if isinstance(item, Step):
                yield pb.GenerateResponse(progress=progress_event(item))
                continue
            if not isinstance(item, Rendered):  # stages and previews: jobs' events only
                continue
            if category := await self._evaluator.withheld_category(item.png):
                withheld = types_pb2.WithheldVariant(
                    variant_index=item.variant_index, category=category
                )
                yield pb.GenerateResponse(withheld=withheld)
                continue
            artifact = await save_image(self._objects, item, job_id="")
            yield pb.GenerateResponse(
                artifact=events_pb2.ArtifactEvent(
                    artifact=artifact_to_pb(artifact, self._objects.download_url)
                )
            )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    id=m.id,
                    family=m.family,
                    default_steps=m.default_steps,
                    default_width_px=m.default_width,
                    default_height_px=m.default_height,
                    price_multiplier=m.price_multiplier,
                    is_default=m.id == self._registry.default,
                    min_size_px=m.min_size,
                    max_size_px=m.max_size,
                    size_multiple_px=m.size_multiple,
                    max_steps=m.max_steps,
                    guidance_roles=roles_to_pb(m.guidance_roles),
                    controlnets=sorted(m.controlnets),
                )
                for m in self._registry.models.values()
            ]
        )
