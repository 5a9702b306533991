"""The FIBO family: the tiny FIBO pipeline `make models` builds loads through from_pretrained and
renders reproducibly through FiboRunner; FIBO prompts are checked against FIBO's schema, with
errors naming the JSON path over gRPC and HTTP; a text prompt sent to a FIBO model becomes a
structured prompt and the job says so."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc, types_pb2
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.fibo import fibo_schema_violations
from services.common.models import Registry, load_registry
from services.common.settings import ROOT
from services.common.spec import MAX_REPORTED, Spec, cache_keys, fibo_prompt_text, resolve
from services.generator.fibo import FiboRunner
from services.generator.pipeline import RenderRequest, StepCancelled, encode_png
from services.generator.tiny_models import TINY_FIBO_NAME, build_tiny_fibo
from services.jobs.records import decode_spec, encode_spec
from services.mesh import free_port
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import violations

WAIT = 30.0
PROMPT: dict[str, Any] = {
    "short_description": "a red fox in the snow",
    "objects": [{"description": "a fox", "location": "center", "relative_size": "medium"}],
    "lighting": {"conditions": "overcast", "direction": "from the left", "shadows": "soft"},
    "style_medium": "photograph",
}
ROW = RenderRequest(
    prompt=fibo_prompt_text(PROMPT),
    negative_prompt="",
    width=128,
    height=64,
    steps=3,
    guidance_scale=5.0,
    seed=7,
)
# Two wrong types, the second in the third object: the paths the errors must name.
MISFIT = {
    "short_description": "a fox",
    "lighting": {"conditions": "dusk", "direction": 3},
    "objects": [{"description": "a"}, {"description": "b"}, {"description": ["c"]}],
}
MISFIT_PATHS = ["fibo_json.lighting.direction", "fibo_json.objects[2].description"]


def _no_progress(done: int, total: int) -> None:
    pass


def _never() -> bool:
    return False


def _png(runner: FiboRunner, *rows: RenderRequest) -> list[bytes]:
    return [encode_png(image) for image in runner.render_rows(rows, _no_progress, _never)]


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def fibo_dir(model_dir: Path) -> Path:
    return model_dir / TINY_FIBO_NAME


@pytest.fixture(scope="module")
def runner(fibo_dir: Path) -> FiboRunner:
    import torch

    torch.set_num_threads(1)  # as the services run it (torch_threads=1 in the test mesh)
    return FiboRunner(fibo_dir)


@pytest.fixture(scope="module")
def registry(model_dir: Path) -> Registry:
    return load_registry(ROOT / "deploy" / "models" / "tiny.json", model_dir)


# The tiny pipeline and FiboRunner


def test_tiny_fibo_is_a_bria_fibo_pipeline_folder_of_a_few_megabytes(fibo_dir: Path) -> None:
    index = json.loads((fibo_dir / "model_index.json").read_text())
    assert index["_class_name"] == "BriaFiboPipeline"
    assert index["text_encoder"] == ["transformers", "SmolLM3ForCausalLM"]
    assert index["transformer"] == ["diffusers", "BriaFiboTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert sum(len(data) for data in _file_bytes(fibo_dir).values()) < 10_000_000


def test_tiny_fibo_build_gives_the_same_files_byte_for_byte(fibo_dir: Path, tmp_path: Path) -> None:
    # `make models` built fibo_dir in another process, with the default seed 0.
    assert _file_bytes(build_tiny_fibo(tmp_path)) == _file_bytes(fibo_dir)


def test_tiny_fibo_renders_the_same_png_bytes_twice_at_the_requested_size(
    runner: FiboRunner,
) -> None:
    first, second = _png(runner, ROW), _png(runner, ROW)
    assert first == second
    assert Image.open(io.BytesIO(first[0])).size == (128, 64)


def test_tiny_fibo_renders_different_seeds_differently(runner: FiboRunner) -> None:
    assert _png(runner, ROW) != _png(runner, dataclasses.replace(ROW, seed=ROW.seed + 1))


def test_tiny_fibo_renders_the_prompt_and_the_negative_prompt(runner: FiboRunner) -> None:
    other_prompt = dataclasses.replace(
        ROW, prompt=fibo_prompt_text({**PROMPT, "style_medium": "oil painting"})
    )
    negative = dataclasses.replace(ROW, negative_prompt="blurry")
    assert len({*_png(runner, ROW), *_png(runner, other_prompt), *_png(runner, negative)}) == 3


def test_key_order_and_nulls_do_not_change_the_pixels(runner: FiboRunner) -> None:
    reordered = {key: PROMPT[key] for key in reversed(PROMPT)} | {"context": None}
    assert _png(runner, ROW) == _png(
        runner, dataclasses.replace(ROW, prompt=fibo_prompt_text(reordered))
    )


def test_a_row_renders_the_same_bytes_alone_as_after_another_row(runner: FiboRunner) -> None:
    other = dataclasses.replace(ROW, seed=99, width=64)
    assert _png(runner, other, ROW)[1] == _png(runner, ROW)[0]


def test_a_render_in_another_process_gives_the_same_bytes(
    runner: FiboRunner, fibo_dir: Path
) -> None:
    import torch

    script = (
        "import hashlib, sys, torch\n"
        "from pathlib import Path\n"
        "from tests.test_fibo import ROW, FiboRunner, _png\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "print(hashlib.sha256(_png(FiboRunner(Path(sys.argv[1])), ROW)[0]).hexdigest())\n"
    )
    threads = str(torch.get_num_threads())  # kernels may split work by thread count
    done = subprocess.run(
        [sys.executable, "-c", script, str(fibo_dir), threads],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split()[-1] == hashlib.sha256(_png(runner, ROW)[0]).hexdigest()


def test_steps_are_reported_over_the_whole_call_and_should_stop_cancels_at_a_step(
    runner: FiboRunner,
) -> None:
    rows = [dataclasses.replace(ROW, steps=2), dataclasses.replace(ROW, steps=2, seed=8)]
    seen: list[tuple[int, int]] = []
    runner.render_rows(rows, lambda done, total: seen.append((done, total)), _never)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    seen.clear()
    with pytest.raises(StepCancelled) as caught:
        runner.render_rows(
            rows, lambda done, total: seen.append((done, total)), lambda: len(seen) == 3
        )
    assert (caught.value.steps_done, caught.value.total_steps) == (3, 4)
    assert seen == [(1, 4), (2, 4), (3, 4)]

    with pytest.raises(StepCancelled) as caught:
        runner.render_rows(rows, _no_progress, lambda: True)
    assert (caught.value.steps_done, caught.value.total_steps) == (0, 4)


@pytest.mark.parametrize(
    "change", [{"width": 72}, {"height": 0}, {"steps": 0}], ids=["width", "height", "steps"]
)
def test_a_row_the_pipeline_cannot_take_is_refused(
    runner: FiboRunner, change: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        runner.render_rows([dataclasses.replace(ROW, **change)], _no_progress, _never)


# The schema


@pytest.mark.parametrize(
    ("fibo", "paths"),
    [
        (MISFIT, MISFIT_PATHS),
        ({"lighting": "soft"}, ["fibo_json.lighting"]),
        ({"objects": {"description": "a"}}, ["fibo_json.objects"]),
        ({"objects": ["a fox"]}, ["fibo_json.objects[0]"]),
        ({"objects": [{"number_of_objects": 2.5}]}, ["fibo_json.objects[0].number_of_objects"]),
        ({"objects": [{"number_of_objects": True}]}, ["fibo_json.objects[0].number_of_objects"]),
        ({"text_render": [{"text": 1}]}, ["fibo_json.text_render[0].text"]),
        (
            {"photographic_characteristics": {"focus": {"a": "b"}}},
            ["fibo_json.photographic_characteristics.focus"],
        ),
        (
            {"style_medium": False, "short_description": 1},
            ["fibo_json.style_medium", "fibo_json.short_description"],
        ),
    ],
    ids=[
        "nested",
        "object-as-text",
        "array-as-object",
        "item-as-text",
        "fraction",
        "bool",
        "text-render",
        "object-as-string",
        "document-order",
    ],
)
def test_a_known_field_of_the_wrong_type_is_named_by_its_path(
    fibo: dict[str, Any], paths: list[str]
) -> None:
    found = fibo_schema_violations(fibo)
    assert [v.field for v in found] == paths
    assert all(v.description.startswith("must be ") for v in found)


def test_unknown_keys_nulls_and_whole_numbers_as_doubles_fit_the_schema() -> None:
    fibo = {
        "short_description": "a fox",
        "camera": {"body": 3},
        "objects": [None, {"description": "a", "pose": None, "mood": 3, "number_of_objects": 2.0}],
        "aesthetics": {"preference_score": "very high", "mood_atmosphere": "calm"},
        "text_render": [],
    }
    assert fibo_schema_violations(fibo) == []


def test_schema_violations_stop_at_the_reporting_limit() -> None:
    found = fibo_schema_violations({"objects": [{"description": i} for i in range(20)]})
    assert [v.field for v in found] == [
        f"fibo_json.objects[{i}].description" for i in range(MAX_REPORTED)
    ]


def test_resolve_checks_the_schema_only_once_the_prompt_is_safe(registry: Registry) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(fibo_json=MISFIT, model="tiny-fibo"), registry)
    assert [v.field for v in caught.value.violations] == MISFIT_PATHS
    unsafe = {**MISFIT, "context": "bad\x00"}
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(fibo_json=unsafe, model="tiny-fibo"), registry)
    assert [v.field for v in caught.value.violations] == ["fibo_json.context"]


def test_a_text_prompt_to_a_fibo_model_resolves_to_a_structured_prompt_with_a_notice(
    registry: Registry,
) -> None:
    spec = resolve(Spec(prompt="  a red fox\n", model="tiny-fibo", seed=1), registry)
    assert (spec.prompt, spec.fibo_json) == ("", {"short_description": "a red fox"})
    assert len(spec.notices) == 1 and "short_description" in spec.notices[0]
    assert resolve(spec, registry) == spec
    # Exactly what sending the structured prompt itself would render and cache.
    direct = resolve(
        Spec(fibo_json={"short_description": "a red fox"}, model="tiny-fibo", seed=1), registry
    )
    model = registry.get("tiny-fibo")
    assert (direct.notices, cache_keys(direct, model)) == ((), cache_keys(spec, model))
    # Stored and read back with its notice.
    assert decode_spec(json.loads(json.dumps(encode_spec(spec)))) == spec


def test_a_text_prompt_to_an_sd_model_stays_text_without_notices(registry: Registry) -> None:
    spec = resolve(Spec(prompt="a red fox", model="tiny-sd", seed=1), registry)
    assert (spec.prompt, spec.fibo_json, spec.notices) == ("a red fox", None, ())
    assert "notices" not in encode_spec(spec)  # encoded as before notices existed


# Over gRPC and HTTP (the gateway with a cache, no generator: jobs stay queued)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as client:
        yield client


def fibo_spec(fibo: dict[str, Any], **fields: Any) -> types_pb2.GenerationSpec:
    """A small tiny-fibo request."""
    defaults: dict[str, Any] = {"width_px": 64, "height_px": 64, "steps": 2, "seed": 3}
    message = types_pb2.GenerationSpec(model="tiny-fibo", **(defaults | fields))
    struct = struct_pb2.Struct()
    struct.update(fibo)
    message.fibo_json.CopyFrom(struct)
    return message


async def test_a_fibo_schema_error_names_the_json_paths_over_grpc(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateJob(image_service_pb2.CreateJobRequest(spec=fibo_spec(MISFIT)))
    # A Struct is a map: its keys come in no set order.
    assert sorted(violations(caught.value)) == [f"spec.{path}" for path in MISFIT_PATHS]


async def test_a_fibo_schema_error_names_the_json_paths_over_http(
    http: httpx.AsyncClient,
) -> None:
    body = {"fibo_json": MISFIT, "model": "tiny-fibo", "width": 64, "height": 64, "steps": 2}
    response = await http.post("/api/generate/text-to-image", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == MISFIT_PATHS


async def test_a_text_prompt_to_tiny_fibo_becomes_a_structured_prompt_the_job_notes_over_http(
    http: httpx.AsyncClient,
) -> None:
    text = f"a lighthouse at dusk {uuid.uuid4().hex}"
    body = {"prompt": text, "model": "tiny-fibo", "width": 64, "height": 64, "steps": 2}
    created = await http.post("/api/generate/text-to-image", json=body)
    assert created.status_code == 201, created.text
    status = await http.get(f"/api/status/{created.json()['run_id']}")
    for job in (created.json(), status.json()):
        assert job["request"]["fibo_json"] == {"short_description": text}
        assert job["request"]["prompt"] == ""
        assert len(job["notices"]) == 1


async def test_a_text_prompt_to_tiny_fibo_is_noted_on_the_job_over_grpc(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    text = f"a windmill {uuid.uuid4().hex}"
    spec = types_pb2.GenerationSpec(text=text, model="tiny-fibo", width_px=64, height_px=64)
    created = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec))
    fetched = await images.GetJob(image_service_pb2.GetJobRequest(job_id=created.job.id))
    for job in (created.job, fetched.job):
        assert job.spec.WhichOneof("prompt") == "fibo_json"
        assert json_format.MessageToDict(job.spec.fibo_json) == {"short_description": text}
        assert len(job.notices) == 1
    plain = await images.CreateJob(
        image_service_pb2.CreateJobRequest(
            spec=types_pb2.GenerationSpec(text=text, model="tiny-sd")
        )
    )
    assert plain.job.spec.text == text and list(plain.job.notices) == []


# Through the whole mesh


@pytest_asyncio.fixture(loop_scope="session")
async def whole_mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    # Its own HTTP port: the module's other gateway may be running beside it.
    started = await start_in_process(
        dataclasses.replace(env, http_port=free_port()),
        ("cache", "evaluator", "generator", "gateway"),
    )
    yield started
    await started.stop()


async def test_a_fibo_job_renders_through_the_mesh(whole_mesh: Mesh) -> None:
    request = fibo_spec(
        {**PROMPT, "short_description": f"a fox {uuid.uuid4().hex}"},
        width_px=128,
        height_px=64,
        num_variants=2,
    )
    async with grpc.aio.insecure_channel(
        whole_mesh.addr("gateway"), interceptors=whole_mesh.auth_interceptors
    ) as channel:
        images = image_service_pb2_grpc.ImageServiceStub(channel)
        created = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=request))
        job = await final_job(images, created.job.id)
    assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error
    assert sorted(a.variant_index for a in job.artifacts) == [0, 1]
    async with httpx.AsyncClient(timeout=WAIT) as http:
        for artifact in job.artifacts:
            assert (artifact.width_px, artifact.height_px) == (128, 64)
            downloaded = await http.get(artifact.url)
            assert hashlib.sha256(downloaded.content).hexdigest() == artifact.sha256
            assert Image.open(io.BytesIO(downloaded.content)).size == (128, 64)


async def final_job(images: image_service_pb2_grpc.ImageServiceStub, job_id: str) -> types_pb2.Job:
    """The job of the final event of a WatchJob stream, read into a queue, then cancelled."""
    call = images.WatchJob(image_service_pb2.WatchJobRequest(job_id=job_id))
    queue: asyncio.Queue[image_service_pb2.WatchJobResponse] = asyncio.Queue()

    async def pump() -> None:
        async for response in call:
            await queue.put(response)

    task = asyncio.create_task(pump())
    try:
        while True:
            response = await asyncio.wait_for(queue.get(), WAIT)
            if response.event.HasField("final"):
                return response.event.final.job
    finally:
        call.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
