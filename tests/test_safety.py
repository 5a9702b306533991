"""Safety end to end, with the real services in process and the tiny models: prompts the content
policy refuses never reach the queue, the cache or the ledger; images the image policy flags are
never stored, and the job says why; scores say which models made them.

The image checks run on the tiny seeded-random CLIP, whose concept similarities mean nothing, so
the test measures them first (the evaluator's Screen reports scores even when it does not
enforce) and then starts an enforcing evaluator with a threshold between two variants' scores.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.protobuf import json_format, struct_pb2
from grpc_status import rpc_status
from imagegen.v1 import (
    evaluator_service_pb2,
    evaluator_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image

from services.common.objectstore import LocalStore, open_store
from services.common.queue import JobQueue
from services.common.settings import ROOT, GatewaySettings
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import run_to_end

WAIT = 60.0
SHIPPED_POLICY = ROOT / "deploy" / "safety" / "policy.toml"
CONCEPT = "test-concept"


def policy_file(folder: Path, name: str, threshold: float, enforce: bool) -> Path:
    """The shipped prompt policy with a test image section: one concept at `threshold`."""
    shipped = SHIPPED_POLICY.read_text(encoding="utf-8")
    prompt_part = shipped[: shipped.index("\n[image]")]
    path = folder / name
    path.write_text(
        prompt_part
        + f"""
[image]
enabled = true
enforce_uncalibrated = {str(enforce).lower()}

[image.concepts.{CONCEPT}]
prompts = ["a red kite in a blue sky", "a lighthouse"]
threshold = {threshold!r}
""",
        encoding="utf-8",
    )
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(env: ServiceEnv, tmp_path_factory: pytest.TempPathFactory) -> ServiceEnv:
    """The module's services report concept scores without enforcing them."""
    folder = tmp_path_factory.mktemp("policy")
    policy = policy_file(folder, "report-only.toml", 0.0, enforce=False)
    return dataclasses.replace(env, overrides={"safety_policy": policy})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as client:
        yield client


def spec(prompt: str = "", **fields: Any) -> types_pb2.GenerationSpec:
    values: dict[str, Any] = {"width_px": 64, "height_px": 64, "steps": 4, "seed": 11}
    values.update(fields)
    return types_pb2.GenerationSpec(text=prompt or f"a kite {uuid.uuid4().hex}", **values)


async def submit(
    images: image_service_pb2_grpc.ImageServiceStub, request_spec: types_pb2.GenerationSpec
) -> types_pb2.Job:
    created = await images.CreateJob(
        image_service_pb2.CreateJobRequest(
            spec=request_spec, cache=image_service_pb2.CACHE_MODE_OFF
        )
    )
    return await run_to_end(images, created.job.id)


async def job_rows(env: ServiceEnv, prompt: str) -> int:
    conn = await asyncpg.connect(env.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE spec->>'prompt' = $1", prompt
        )
        return count
    finally:
        await conn.close()


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


# Prompts


async def test_a_refused_prompt_is_named_by_category_and_field_and_never_queued_or_charged(
    env: ServiceEnv, http: httpx.AsyncClient
) -> None:
    redis = aioredis.from_url(env.redis_url)
    try:
        queued_before = await JobQueue(redis).backlog()
        prompt = f"a n.u.d.e figure by a lake {uuid.uuid4().hex[:6]}"
        response = await http.post(
            "/api/generate/text-to-image",
            json={"prompt": prompt, "width": 64, "height": 64, "steps": 4},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT"
        assert error["policy_violation"] == {"category": "sexual", "field": "prompt"}
        assert error["field_violations"][0]["field"] == "prompt"
        assert "nude" not in response.text and "n.u.d.e" not in response.text
        assert await JobQueue(redis).backlog() == queued_before  # never queued
    finally:
        await redis.aclose()
    assert await job_rows(env, prompt) == 0  # no record, so nothing charged
    counts = (await http.get("/api/admin/safety")).json()["counts"]
    assert any(c["kind"] == "prompt" and c["category"] == "sexual" for c in counts), counts


async def test_a_refused_prompt_is_not_looked_up_in_the_cache(http: httpx.AsyncClient) -> None:
    fullwidth = "\uff4e\uff55\uff44\uff45 portrait"
    response = await http.post(
        "/api/cache/lookup", json={"prompt": fullwidth, "width": 64, "height": 64}
    )
    assert response.status_code == 422
    assert response.json()["error"]["policy_violation"]["category"] == "sexual"


async def test_the_negative_prompt_is_moderated_too(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/api/generate/text-to-image",
        json={"prompt": "a quiet harbour", "negative_prompt": "no g0re please", "width": 64},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["policy_violation"] == {
        "category": "violence",
        "field": "negative_prompt",
    }


async def test_grpc_names_the_fibo_field_in_a_policy_violation_detail(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    fibo = struct_pb2.Struct()
    json_format.ParseDict(
        {
            "short_description": "a garden",
            "objects": [{"description": "a statue"}, {"description": "a n a k e d statue"}],
        },
        fibo,
    )
    request = types_pb2.GenerationSpec(fibo_json=fibo, model="tiny-fibo", width_px=64, height_px=64)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await images.CreateJob(image_service_pb2.CreateJobRequest(spec=request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None
    found = []
    for detail in status.details:
        violation = types_pb2.PolicyViolation()
        if detail.Unpack(violation):
            found.append((violation.category, violation.field))
    assert found == [("sexual", "spec.fibo_json.objects[1].description")]
    assert "naked" not in (raised.value.details() or "")


async def test_an_innocent_prompt_with_look_alike_words_is_rendered(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    job = await submit(images, spec(f"Scunthorpe, Essex: a denuded hillside {uuid.uuid4().hex}"))
    assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error


# Scores


async def test_scores_say_which_models_made_them_and_that_the_tiny_ones_are_uncalibrated(
    images: image_service_pb2_grpc.ImageServiceStub, http: httpx.AsyncClient
) -> None:
    job = await submit(images, spec(num_variants=2))
    assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error
    for artifact in job.artifacts:
        evaluation = artifact.evaluation
        assert evaluation.HasField("clip_score") and evaluation.HasField("lpips_diversity")
        assert "tiny-clip" in evaluation.clip_model and not evaluation.clip_calibrated
        assert evaluation.lpips_model and not evaluation.lpips_calibrated
    assert job.artifacts[0].is_primary  # the best by CLIP score comes first
    status = (await http.get(f"/api/status/{job.id}")).json()
    assert status["artifacts"][0]["clip_calibrated"] is False
    assert status["artifacts"][0]["semantic_score"] == pytest.approx(
        job.artifacts[0].evaluation.clip_score
    )


async def test_any_images_can_be_scored_over_http(http: httpx.AsyncClient) -> None:
    inline = [base64.b64encode(png(c)).decode() for c in ((200, 30, 30), (30, 30, 200))]
    response = await http.post("/api/evaluate", json={"prompt": "a red square", "images": inline})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["evaluations"]) == 2
    assert body["primary_index"] in (0, 1)
    for evaluation in body["evaluations"]:
        assert 0.0 <= evaluation["semantic_score"] <= 100.0
        assert evaluation["perceptual_score"] > 0  # two different images
    assert {m["role"] for m in body["scoring_models"]} == {"clip", "lpips"}
    assert not any(m["calibrated"] for m in body["scoring_models"])


async def test_evaluating_bad_images_names_the_field(http: httpx.AsyncClient) -> None:
    not_png = base64.b64encode(b"not an image").decode()
    response = await http.post("/api/evaluate", json={"prompt": "x", "images": ["a", not_png]})
    assert response.status_code == 422
    assert response.json()["error"]["field_violations"][0]["field"] == "images[0]"
    response = await http.post("/api/evaluate", json={"prompt": "x", "images": [not_png]})
    assert response.status_code == 422
    assert response.json()["error"]["field_violations"][0]["field"] == "images[0]"
    response = await http.post("/api/evaluate", json={"prompt": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["field_violations"][0]["field"] == "images"


# Images


async def concept_scores(mesh: Mesh, data: list[bytes]) -> list[float]:
    async with grpc.aio.insecure_channel(mesh.addr("evaluator")) as channel:
        stub = evaluator_service_pb2_grpc.EvaluatorServiceStub(channel)
        response = await stub.Screen(evaluator_service_pb2.ScreenRequest(images=data))
    assert not response.enforced  # the module's evaluator only reports
    assert not any(v.flagged for v in response.verdicts)
    return [v.scores[CONCEPT] for v in response.verdicts]


async def test_a_flagged_image_is_never_stored_and_the_job_says_why(
    env: ServiceEnv,
    mesh: Mesh,
    images: image_service_pb2_grpc.ImageServiceStub,
    tmp_path: Path,
) -> None:
    request = spec(num_variants=2, seed=41)
    # 1. Rendered under the report-only policy: both variants stored; measure their scores.
    first = await submit(images, request)
    assert first.status == types_pb2.JOB_STATUS_COMPLETED, first.error
    objects = open_store(env.settings(GatewaySettings))
    by_variant = sorted(first.artifacts, key=lambda a: a.variant_index)
    data = [await objects.get(a.key) for a in by_variant]
    scores = await concept_scores(mesh, data)
    assert scores[0] != scores[1]
    flagged = max((0, 1), key=lambda i: scores[i])
    kept = 1 - flagged
    # 2. An enforcing evaluator with the threshold between the two, and a generator that uses
    # it, writing to a fresh object store, so what it stores can be checked there.
    for name in ("generator", "evaluator"):
        await mesh.services.pop(name).stop(1.0)
    threshold = (scores[0] + scores[1]) / 2
    enforcing = dataclasses.replace(
        env,
        overrides={
            "safety_policy": policy_file(tmp_path, "enforce.toml", threshold, enforce=True),
            "objects_dir": tmp_path / "objects",
        },
    )
    second = await start_in_process(enforcing, ("evaluator", "generator"))
    mesh.services.update(second.services)  # stopped with the module's mesh
    job = await submit(images, request)
    assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error
    assert [a.variant_index for a in job.artifacts] == [kept]
    assert [(w.variant_index, w.category) for w in job.withheld] == [(flagged, CONCEPT)]
    assert job.artifacts[0].sha256 == by_variant[kept].sha256  # the same pixels as before
    store = open_store(enforcing.settings(GatewaySettings))
    assert isinstance(store, LocalStore)
    assert await store.exists(by_variant[kept].key)
    assert not await store.exists(by_variant[flagged].key)  # checked in the store itself
    # 3. A job whose only image is flagged fails, saying why without scores or thresholds.
    alone = await submit(images, spec(request.text, num_variants=1, seed=41 + flagged))
    assert alone.status == types_pb2.JOB_STATUS_FAILED
    assert alone.error == "every image was withheld by the image safety policy"
    assert not alone.retryable and alone.cost_cents == 0
    assert [(w.variant_index, w.category) for w in alone.withheld] == [(0, CONCEPT)]
    assert not await store.exists(by_variant[flagged].key)
    stored = sorted(p.name for p in (tmp_path / "objects").rglob("*.png"))
    assert stored == [Path(by_variant[kept].key).name]
    # Counted per concept.
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth) as http:
        counts = (await http.get("/api/admin/safety")).json()["counts"]
    assert {"kind": "image", "category": CONCEPT} | {"count": 2} in [
        {k: c[k] for k in ("kind", "category", "count")} for c in counts
    ]
