"""ImageService and CostService over gRPC: convert, call JobService, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from imagegen.v1 import (
    cost_service_pb2,
    cost_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)

from services.common.convert import (
    STATUS_FROM_PB,
    evaluation_to_pb,
    scoring_model_to_pb,
    signed_job,
    spec_from_pb,
    with_pb_fields,
    with_urls,
)
from services.common.errors import InvalidArgument
from services.gateway.auth import current_caller
from services.gateway.cost import Cost
from services.gateway.jobs import JobService, Options
from services.jobs.records import CacheMode, JobRecord, Priority

Context = grpc.aio.ServicerContext[Any, Any]

CACHE_MODES: dict[image_service_pb2.CacheMode.ValueType, CacheMode | None] = {
    image_service_pb2.CACHE_MODE_UNSPECIFIED: None,
    image_service_pb2.CACHE_MODE_USE: CacheMode.USE,
    image_service_pb2.CACHE_MODE_REFRESH: CacheMode.REFRESH,
    image_service_pb2.CACHE_MODE_OFF: CacheMode.OFF,
}


PRIORITIES: dict[image_service_pb2.Priority.ValueType, Priority] = {
    image_service_pb2.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    image_service_pb2.PRIORITY_HIGH: Priority.HIGH,
    image_service_pb2.PRIORITY_NORMAL: Priority.NORMAL,
    image_service_pb2.PRIORITY_LOW: Priority.LOW,
}


def priority_from_pb(value: image_service_pb2.Priority.ValueType) -> Priority:
    if value not in PRIORITIES:
        names = [image_service_pb2.Priority.Name(v) for v in PRIORITIES if v]
        raise InvalidArgument.one("priority", f"one of {', '.join(names)}")
    return PRIORITIES[value]


def cache_mode_from_pb(value: image_service_pb2.CacheMode.ValueType) -> CacheMode | None:
    """The requested mode; None when unspecified (proto3 enums are open: refuse unknown ones)."""
    if value not in CACHE_MODES:
        names = [image_service_pb2.CacheMode.Name(v) for v in CACHE_MODES if v]
        raise InvalidArgument.one("cache", f"one of {', '.join(names)}")
    return CACHE_MODES[value]


def cost_pb(cost: Cost) -> types_pb2.CostBreakdown:
    return types_pb2.CostBreakdown(
        base_cents=cost.base_cents,
        steps_factor=cost.steps_factor,
        controlnet_cents=cost.controlnet_cents,
        guidance_cents=cost.guidance_cents,
        model_multiplier=cost.model_multiplier,
        total_cents=cost.total_cents,
    )


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    def _signed(self, job: JobRecord | types_pb2.Job) -> types_pb2.Job:
        return signed_job(job, self._jobs.objects.download_url)

    async def CreateJob(
        self, request: image_service_pb2.CreateJobRequest, context: Context
    ) -> image_service_pb2.CreateJobResponse:
        caller = current_caller()
        try:
            webhook = None
            if request.HasField("webhook"):
                webhook = self._jobs.check_webhook(
                    request.webhook.url,
                    list(request.webhook.events),
                    "webhook.url",
                    "webhook.events",
                )
            options = Options(
                idempotency_key=request.idempotency_key,
                seed_agnostic_cache=request.seed_agnostic_cache,
                skip_cache=request.skip_cache,
                cache=cache_mode_from_pb(request.cache),
                priority=priority_from_pb(request.priority),
                max_cost_cents=(
                    request.max_cost_cents if request.HasField("max_cost_cents") else None
                ),
                webhook=webhook,
            )
            admission = await self._jobs.create(caller, spec_from_pb(request.spec), options)
        except InvalidArgument as error:
            raise with_pb_fields(error) from None
        return image_service_pb2.CreateJobResponse(
            job=self._signed(admission.job),
            estimate=cost_pb(admission.estimate),
            idempotent_replay=not admission.created,
        )

    async def GetJob(
        self, request: image_service_pb2.GetJobRequest, context: Context
    ) -> image_service_pb2.GetJobResponse:
        job = await self._jobs.get(current_caller(), request.job_id)
        return image_service_pb2.GetJobResponse(job=self._signed(job))

    async def WatchJob(
        self, request: image_service_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[image_service_pb2.WatchJobResponse]:
        watched = self._jobs.watch(current_caller(), request.job_id, request.after_event_id)
        async for event in watched:
            if event is None:  # quiet: HTTP/2 keepalive pings keep a gRPC stream open
                continue
            with_urls(event, self._jobs.objects.download_url)
            yield image_service_pb2.WatchJobResponse(event=event)

    async def CancelJob(
        self, request: image_service_pb2.CancelJobRequest, context: Context
    ) -> image_service_pb2.CancelJobResponse:
        job = await self._jobs.cancel(current_caller(), request.job_id)
        return image_service_pb2.CancelJobResponse(job=self._signed(job))

    async def ListJobs(
        self, request: image_service_pb2.ListJobsRequest, context: Context
    ) -> image_service_pb2.ListJobsResponse:
        status = STATUS_FROM_PB.get(request.status, "")
        jobs, token = await self._jobs.list(
            current_caller(), request.page_size, request.page_token, status
        )
        return image_service_pb2.ListJobsResponse(
            jobs=[self._signed(j) for j in jobs], next_page_token=token
        )

    async def EvaluateImages(
        self, request: image_service_pb2.EvaluateImagesRequest, context: Context
    ) -> image_service_pb2.EvaluateImagesResponse:
        result = await self._jobs.evaluate_images(
            current_caller(),
            request.prompt,
            list(request.image_keys),
            list(request.images),
            request.reference_key,
        )
        return image_service_pb2.EvaluateImagesResponse(
            evaluations=[evaluation_to_pb(s) for s in result.scores],
            primary_index=result.primary_index,
            scoring_models=[scoring_model_to_pb(m) for m in result.scoring_models],
        )


class CostServicer(cost_service_pb2_grpc.CostServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def EstimateCost(
        self, request: cost_service_pb2.EstimateCostRequest, context: Context
    ) -> cost_service_pb2.EstimateCostResponse:
        try:
            cost = self._jobs.estimate(spec_from_pb(request.spec))
        except InvalidArgument as error:
            raise with_pb_fields(error) from None
        return cost_service_pb2.EstimateCostResponse(breakdown=cost_pb(cost))
