"""Starts the evaluator: health says NOT_SERVING until the scoring models are loaded."""

from __future__ import annotations

import asyncio

from imagegen.v1 import evaluator_service_pb2, evaluator_service_pb2_grpc

from services.common.objectstore import open_store
from services.common.server import Service, Servicer, check_free, start_server
from services.common.settings import EvaluatorSettings
from services.common.torch_compat import prepare_torch, set_torch_threads

SERVICE_NAME = evaluator_service_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name


async def start(settings: EvaluatorSettings) -> Service:
    check_free(settings.listen_addr)
    prepare_torch()
    set_torch_threads(settings.torch_threads, settings.model_processes)
    from services.evaluator.grpc_api import EvaluatorServicer
    from services.evaluator.scoring import Scorer

    servicer = EvaluatorServicer(open_store(settings))
    running = await start_server(
        settings.listen_addr,
        [
            Servicer(
                SERVICE_NAME,
                lambda s: evaluator_service_pb2_grpc.add_EvaluatorServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        settings.max_message_bytes,
        serving=False,
    )
    servicer.scorer = await asyncio.to_thread(Scorer, settings.clip_path(), settings.lpips_backbone)
    await running.set_serving(True)
    return Service(running)
