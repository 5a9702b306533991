"""Starts the evaluator: the policy and the model files are checked before the port is served;
health says NOT_SERVING until the models are loaded."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from imagegen.v1 import evaluator_service_pb2, evaluator_service_pb2_grpc

from services.common.objectstore import open_store
from services.common.server import (
    Service,
    Servicer,
    StartupRefused,
    check_free,
    check_secrets,
    prepare_observability,
    start_server,
)
from services.common.settings import EvaluatorSettings
from services.common.torch_compat import prepare_torch, set_torch_threads
from services.safety.policy import PolicyError, SafetyPolicy, load_policy

if TYPE_CHECKING:
    from services.evaluator.models import ModelPlan
    from services.evaluator.safety import ImageScreen
    from services.evaluator.scoring import Scorer

SERVICE_NAME = evaluator_service_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name

log = logging.getLogger("imagegen.evaluator")


async def start(settings: EvaluatorSettings) -> Service:
    """The running evaluator; StartupRefused (one line naming the file or setting) when the
    port is taken, the policy is wrong, or a model file is missing."""
    check_free(settings.listen_addr)
    prepare_observability("evaluator", settings.metrics_host, settings.metrics_port)
    check_secrets(settings)
    try:
        policy = load_policy(settings.safety_policy)
    except PolicyError as error:
        raise StartupRefused(str(error)) from None
    prepare_torch()
    set_torch_threads(settings.torch_threads, settings.model_processes)
    from services.evaluator.evaluator import Evaluator
    from services.evaluator.grpc_api import EvaluatorServicer
    from services.evaluator.models import one_line, plan_models
    from services.evaluator.safety import check_nudenet_installed

    plan = plan_models(settings)
    check_nudenet_installed(policy.image, str(settings.safety_policy))

    servicer = EvaluatorServicer()
    running = await start_server(
        "evaluator",
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
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
        serving=False,
    )
    # The one thread torch runs on: model loading, then every scoring round.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
    try:
        scorer, screen = await asyncio.get_running_loop().run_in_executor(
            executor, _load, settings, plan, policy
        )
    except Exception as error:
        await running.stop(0)
        executor.shutdown(wait=False)
        if isinstance(error, StartupRefused):
            raise
        raise StartupRefused(f"cannot load the scoring models: {one_line(error)}") from error
    evaluator = Evaluator(
        scorer,
        screen,
        open_store(settings),
        executor,
        settings.scoring_window_ms / 1e3,
        settings.max_batch_images,
    )
    evaluator.start()
    servicer.evaluator = evaluator
    await running.set_serving(True)
    log.info(
        "scoring with %s; image safety %s",
        ", ".join(
            f"{m.name} ({'calibrated' if m.calibrated else 'uncalibrated'})"
            for m in scorer.scoring_models
        ),
        "enforced" if screen.enforced else "not enforced" if screen.enabled else "off",
    )

    async def close() -> None:
        await evaluator.close()
        executor.shutdown(wait=False)

    return Service(running, [close])


def _load(
    settings: EvaluatorSettings, plan: ModelPlan, policy: SafetyPolicy
) -> tuple[Scorer, ImageScreen]:
    """The scorer and the image screen (the policy's concept prompts encoded once)."""
    from services.evaluator.safety import build_screen
    from services.evaluator.scoring import BatchShapes, Scorer

    shapes = BatchShapes(settings.clip_image_batch, settings.clip_text_batch, settings.lpips_batch)
    scorer = Scorer(plan.clip, plan.lpips_backbone, shapes, settings.embedding_cache_size)
    return scorer, build_screen(policy.image, scorer)
