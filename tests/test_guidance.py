"""Guidance that changes the pixels, and capabilities that refuse what a model cannot honour.

Control images (Canny edges, depth maps) on synthetic images; guided renders of the tiny-sd
pipeline (loaded as pipeline.py loads it) with the tiny ControlNets `make models` builds; the
`strength` field from validation through storage; and, over real gRPC and HTTP servers, the
refusal of a role, a ControlNet or a mask the model cannot honour (named by field, never priced)
and the capabilities ListModels and GET /api/models list.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
from imagegen.v1 import (
    cost_service_pb2,
    cost_service_pb2_grpc,
    generator_service_pb2,
    generator_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image, ImageDraw

from services.common.convert import spec_from_pb, spec_to_pb
from services.common.errors import InvalidArgument
from services.common.models import Registry, load_registry
from services.common.objectstore import LocalStore, content_key
from services.common.settings import ROOT
from services.common.spec import (
    DEFAULT_STRENGTH,
    ControlNet,
    GuidanceImage,
    Spec,
    cache_keys,
    resolve,
)
from services.common.torch_compat import prepare_torch
from services.jobs.records import decode_spec, encode_spec
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import stored_upload, violations

prepare_torch()

import diffusers  # noqa: E402
import torch  # noqa: E402

from services.generator import guidance as guidance_module  # noqa: E402
from services.generator.guidance import (  # noqa: E402
    Control,
    Guidance,
    control_image,
    decode_image,
    load_controlnets,
    load_guidance,
    render_guided,
)
from services.generator.pipeline import StepCancelled, encode_png  # noqa: E402

REGISTRY_FILE = ROOT / "deploy" / "models" / "tiny.json"
WAIT = 10.0
SIZE = 64
REFERENCE_KEY = "uploads/ab/reference.png"


def scene(width: int = 96, height: int = 80) -> Image.Image:
    """A reference image: a yellow square and a red disc on blue (not square, to be fitted)."""
    image = Image.new("RGB", (width, height), (20, 30, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([30, 16, 61, 47], fill=(250, 240, 10))
    draw.ellipse([4, 44, 34, 74], fill=(200, 0, 0))
    return image


def white_square(size: int = SIZE) -> Image.Image:
    """A white square, pixels 16..47 on each axis, on black."""
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill="white")
    return image


def pixels(png: bytes) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def mean_difference(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two PNGs' pixel values (0..255)."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


# Control images


def test_canny_of_a_white_square_has_edges_on_its_border_and_nowhere_else() -> None:
    edges = np.asarray(control_image("canny", white_square(), SIZE, SIZE))
    assert edges.shape == (SIZE, SIZE, 3)
    assert set(np.unique(edges)) == {0, 255}  # white on black
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = edges[..., 0] == 255
    rows, cols = np.indices(on.shape)
    # The square's outline runs between pixels 15|16 and 47|48: edges lie within a pixel of it.
    near_outline = (
        (rows >= 14) & (rows <= 49) & (cols >= 14) & (cols <= 49)
        & ~((rows >= 18) & (rows <= 45) & (cols >= 18) & (cols <= 45))
    )  # fmt: skip
    assert on.any()
    assert not (on & ~near_outline).any(), "edges inside the square or far outside it"
    # Every side is traced along (nearly) its whole length.
    sides = {
        "top": on[15:17, 16:48].any(axis=0),
        "bottom": on[47:49, 16:48].any(axis=0),
        "left": on[16:48, 15:17].any(axis=1),
        "right": on[16:48, 47:49].any(axis=1),
    }
    for side, traced in sides.items():
        assert traced.sum() >= 28, side


def test_canny_is_computed_at_the_render_size() -> None:
    edges = np.asarray(control_image("canny", white_square(), 128, 96))
    assert edges.shape == (96, 128, 3)
    # Fitted (scaled to cover, centred): the square's sides are at x = 32 and 95.
    assert edges[40:60, 30:34, 0].any() and edges[40:60, 93:98, 0].any()
    assert not edges[40:60, 40:88, 0].any()


def test_depth_takes_the_upload_as_a_depth_map_stretched_to_0_255() -> None:
    ramp = np.tile(np.linspace(50, 150, SIZE), (SIZE, 1)).astype(np.uint8)
    depth = np.asarray(control_image("depth", Image.fromarray(ramp).convert("RGB"), SIZE, SIZE))
    assert depth.shape == (SIZE, SIZE, 3)
    assert (depth[..., 0] == depth[..., 1]).all() and (depth[..., 0] == depth[..., 2]).all()
    assert depth.min() == 0 and depth.max() == 255
    assert (np.diff(depth[0, :, 0].astype(int)) >= 0).all()  # still near to far, left to right
    # A 16-bit depth map keeps its range (1000..3000 would clip to 255 as 8-bit gray).
    deep = np.tile(np.linspace(1000, 3000, SIZE), (SIZE, 1)).astype(np.uint16)
    stretched = np.asarray(control_image("depth", Image.fromarray(deep), SIZE, SIZE))
    assert stretched.min() == 0 and stretched.max() == 255
    assert len(np.unique(stretched)) > 32


def test_an_unknown_control_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        control_image("recoloring", white_square(), SIZE, SIZE)


# Guided renders


@pytest.fixture(scope="module")
def registry(model_dir: Path) -> Registry:
    return load_registry(REGISTRY_FILE, model_dir)


def load_pipe(model_dir: Path) -> Any:
    """tiny-sd, loaded the way pipeline.py loads a model folder."""
    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(model_dir / "tiny-sd"), local_files_only=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> Any:
    torch.set_num_threads(1)
    return load_pipe(model_dir)


@pytest.fixture(scope="module")
def controlnets(registry: Registry) -> dict[str, Any]:
    return load_controlnets(registry.get("tiny-sd").controlnets, torch.float32, "cpu")


def render(
    pipe: Any,
    controlnets: dict[str, Any],
    guidance: Guidance,
    seed: int = 7,
    on_step: Any = None,
    should_stop: Any = None,
    steps: int = 4,
) -> bytes:
    image = render_guided(
        pipe,
        controlnets,
        guidance,
        prompt="a lighthouse on a cliff",
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        steps=steps,
        guidance_scale=7.5,
        seed=seed,
        on_step=on_step or (lambda done, total, latents: None),
        should_stop=should_stop or (lambda: False),
    )
    assert image.size == (SIZE, SIZE)
    return encode_png(image)


def test_render_without_guidance_is_the_plain_pipeline(pipe: Any, controlnets: Any) -> None:
    generator = torch.Generator(device="cpu").manual_seed(7)
    plain = pipe(
        prompt="a lighthouse on a cliff",
        width=SIZE,
        height=SIZE,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=generator,
    ).images[0]
    assert render(pipe, controlnets, Guidance()) == encode_png(plain)


def test_img2img_from_a_reference_changes_the_output_and_strength_changes_it_again(
    pipe: Any, controlnets: Any
) -> None:
    plain = render(pipe, controlnets, Guidance())
    guided = render(pipe, controlnets, Guidance(reference=scene()))
    assert mean_difference(plain, guided) > 1.0
    weaker = render(pipe, controlnets, Guidance(reference=scene(), strength=0.5))
    assert mean_difference(guided, weaker) > 1.0
    other = render(pipe, controlnets, Guidance(reference=white_square()))
    assert mean_difference(guided, other) > 1.0


def test_canny_and_depth_controlnets_each_change_the_output_and_differ(
    pipe: Any, controlnets: Any
) -> None:
    plain = render(pipe, controlnets, Guidance())
    canny = render(pipe, controlnets, Guidance(control=Control("canny", scene(), 1.0)))
    depth = render(pipe, controlnets, Guidance(control=Control("depth", scene(), 1.0)))
    assert mean_difference(plain, canny) > 1.0
    assert mean_difference(plain, depth) > 1.0
    assert mean_difference(canny, depth) > 1.0


def test_a_controlnet_follows_its_control_image_and_weight(pipe: Any, controlnets: Any) -> None:
    square = render(pipe, controlnets, Guidance(control=Control("canny", white_square(), 1.0)))
    other = render(pipe, controlnets, Guidance(control=Control("canny", scene(), 1.0)))
    lighter = render(pipe, controlnets, Guidance(control=Control("canny", white_square(), 0.5)))
    assert mean_difference(square, other) > 1.0
    assert mean_difference(square, lighter) > 1.0


def test_a_controlnet_with_a_reference_runs_img2img_too(pipe: Any, controlnets: Any) -> None:
    control = Control("depth", scene(), 1.0)
    controlled = render(pipe, controlnets, Guidance(control=control))
    both = render(pipe, controlnets, Guidance(reference=scene(), control=control))
    reference_only = render(pipe, controlnets, Guidance(reference=scene()))
    assert mean_difference(controlled, both) > 1.0
    assert mean_difference(reference_only, both) > 1.0


@pytest.mark.parametrize(
    "guidance",
    [
        Guidance(reference=scene()),
        Guidance(reference=scene(), strength=0.5),
        Guidance(control=Control("canny", scene(), 0.8)),
        Guidance(reference=scene(), control=Control("depth", scene(), 0.6)),
    ],
    ids=["reference", "strength", "canny", "depth-and-reference"],
)
def test_guided_renders_repeat_byte_for_byte_even_in_a_freshly_loaded_pipeline(
    pipe: Any, controlnets: Any, model_dir: Path, guidance: Guidance
) -> None:
    first = render(pipe, controlnets, guidance)
    assert render(pipe, controlnets, guidance) == first
    assert render(load_pipe(model_dir), controlnets, guidance) == first
    assert render(pipe, controlnets, guidance, seed=8) != first


def test_img2img_reports_steps_times_strength_and_stops_when_asked(
    pipe: Any, controlnets: Any
) -> None:
    steps: list[tuple[int, int]] = []
    render(pipe, controlnets, Guidance(reference=scene(), strength=0.5), on_step=_append(steps))
    assert steps == [(1, 2), (2, 2)]
    seen: list[tuple[int, int]] = []
    with pytest.raises(StepCancelled) as caught:
        render(
            pipe,
            controlnets,
            Guidance(reference=scene(), control=Control("canny", scene(), 1.0)),
            on_step=_append(seen),
            should_stop=lambda: bool(seen),
        )
    assert (caught.value.steps_done, caught.value.total_steps) == (1, 3)
    with pytest.raises(StepCancelled) as before:
        render(pipe, controlnets, Guidance(reference=scene()), should_stop=lambda: True)
    assert before.value.steps_done == 0


def _append(into: list[tuple[int, int]]) -> Any:
    def on_step(done: int, total: int, latents: Any) -> None:
        assert isinstance(latents, torch.Tensor) and latents.ndim == 4  # what previews show
        into.append((done, total))

    return on_step


def test_guided_pipelines_are_made_once_and_share_the_loaded_weights(
    pipe: Any, controlnets: Any
) -> None:
    render(pipe, controlnets, Guidance(reference=scene()))
    render(pipe, controlnets, Guidance(reference=scene(), control=Control("canny", scene(), 1.0)))
    made = dict(guidance_module._derived[pipe].pipelines)
    render(pipe, controlnets, Guidance(reference=white_square()))
    assert guidance_module._derived[pipe].pipelines == made  # reused, not made again
    for derived in made.values():
        assert derived.unet is pipe.unet and derived.vae is pipe.vae
        assert derived.text_encoder is pipe.text_encoder
        assert derived.scheduler is not pipe.scheduler  # its own: no shared per-call state


def test_a_render_refuses_what_it_cannot_take(pipe: Any, controlnets: Any) -> None:
    for guidance in (
        Guidance(reference=scene(), strength=0.0),
        Guidance(reference=scene(), strength=math.nan),
        Guidance(reference=scene(), strength=0.2),  # x 4 steps: no step left
        Guidance(control=Control("recoloring", scene(), 1.0)),
    ):
        with pytest.raises(ValueError):
            render(pipe, controlnets, guidance)


# Loading guidance from the object store


async def test_load_guidance_reads_the_reference_and_makes_the_control_from_it(
    tmp_path: Path, registry: Registry
) -> None:
    store = LocalStore(tmp_path, b"key", "http://127.0.0.1", 60)
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    key = content_key(buffer.getvalue(), "uploads", "png")
    await store.put(key, buffer.getvalue(), "image/png")
    spec = resolve(
        Spec(
            prompt="a fox",
            guidance_images=(GuidanceImage(key, "reference"),),
            controlnet=ControlNet("canny", 0.5),
        ),
        registry,
    )
    loaded = await load_guidance(spec, store)
    assert loaded is not None and loaded.reference is not None and loaded.control is not None
    assert encode_png(loaded.reference) == encode_png(scene())
    assert loaded.strength == DEFAULT_STRENGTH
    assert (loaded.control.kind, loaded.control.weight) == ("canny", 0.5)
    assert loaded.control.source is loaded.reference
    assert await load_guidance(resolve(Spec(prompt="a fox"), registry), store) is None
    style = replace(spec, guidance_images=(GuidanceImage(key, "style"),), controlnet=None)
    with pytest.raises(ValueError):
        await load_guidance(style, store)


def test_an_upload_is_decoded_upright_by_its_exif_orientation() -> None:
    photo = Image.new("RGB", (30, 20), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: rotated 90 degrees clockwise
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 30)


# Capabilities and strength in resolve, the cache key and storage


def resolved(registry: Registry, **fields: Any) -> Spec:
    values: dict[str, Any] = {"prompt": "a fox", "seed": 1, "steps": 4}
    values.update(fields)
    return resolve(Spec(**values), registry)


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


REFERENCE = GuidanceImage(REFERENCE_KEY, "reference")


STYLE = GuidanceImage(REFERENCE_KEY, "style")
TEXTURE = GuidanceImage(REFERENCE_KEY, "texture")


def with_reference(controlnet: ControlNet) -> dict[str, Any]:
    return {"guidance_images": (REFERENCE,), "controlnet": controlnet}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"guidance_images": (REFERENCE, STYLE)}, "guidance_images[1].role"),
        ({"guidance_images": (TEXTURE,)}, "guidance_images[0].role"),
        (with_reference(ControlNet("recoloring", 1)), "controlnet.name"),
        (with_reference(ControlNet("color_grid", 1)), "controlnet.name"),
        (with_reference(ControlNet("canny", 1, REFERENCE_KEY)), "controlnet.mask"),
        ({"controlnet": ControlNet("depth", 0.5)}, "controlnet"),
    ],
    ids=["style", "texture", "recoloring", "color_grid", "mask", "controlnet-without-reference"],
)
def test_resolve_refuses_what_the_model_cannot_honour_naming_the_field(
    registry: Registry, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolved(registry, **fields)
    assert fields_of(caught.value) == [field]


def test_resolve_says_what_the_model_supports(registry: Registry) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolved(
            registry,
            guidance_images=(REFERENCE, GuidanceImage(REFERENCE_KEY, "style")),
            controlnet=ControlNet("recoloring", 0.5),
        )
    described = {v.field: v.description for v in caught.value.violations}
    assert described["guidance_images[1].role"].endswith("it takes reference")
    assert described["controlnet.name"].endswith("it has canny, depth")


def test_strength_defaults_to_0_75_with_a_reference_and_is_absent_without_one(
    registry: Registry,
) -> None:
    assert resolved(registry, guidance_images=(REFERENCE,)).strength == DEFAULT_STRENGTH == 0.75
    assert resolved(registry, guidance_images=(REFERENCE,), strength=0.3).strength == 0.3
    assert resolved(registry).strength is None
    guided = resolved(registry, guidance_images=(REFERENCE,), controlnet=ControlNet("canny", 1))
    assert guided.strength == DEFAULT_STRENGTH


@pytest.mark.parametrize(
    ("strength", "with_reference"),
    [
        (0.0, True),
        (-0.1, True),
        (1.5, True),
        (math.nan, True),
        (math.inf, True),
        (0.2, True),  # x 4 steps: no step to run
        (0.5, False),
    ],
    ids=["zero", "negative", "over-one", "nan", "infinite", "no-step-left", "no-reference"],
)
def test_strength_is_refused_naming_it(
    registry: Registry, strength: float, with_reference: bool
) -> None:
    images = (REFERENCE,) if with_reference else ()
    with pytest.raises(InvalidArgument) as caught:
        resolved(registry, guidance_images=images, strength=strength)
    assert fields_of(caught.value) == ["strength"]


def test_strength_is_in_the_cache_key_and_survives_storage_and_protobuf(
    registry: Registry,
) -> None:
    model = registry.get("tiny-sd")
    default = resolved(registry, guidance_images=(REFERENCE,))
    half = resolved(registry, guidance_images=(REFERENCE,), strength=0.5)
    assert cache_keys(default, model)[0] != cache_keys(half, model)[0]
    assert cache_keys(default, model)[1] != cache_keys(half, model)[1]
    assert decode_spec(encode_spec(half)) == half
    assert spec_from_pb(spec_to_pb(replace(half, strength=0.3))).strength == 0.3
    plain = resolved(registry)
    assert "strength" not in encode_spec(plain)  # stored as it always was
    old_row = {k: v for k, v in encode_spec(default).items() if k != "strength"}
    assert decode_spec(old_row).strength is None
    assert not spec_to_pb(plain).HasField("strength")


# Over gRPC and HTTP


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    # No workers: jobs stay queued; ListModels is the generator's.
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"), workers=0)
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channels(mesh: Mesh) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    async with (
        grpc.aio.insecure_channel(
            mesh.addr("gateway"), interceptors=mesh.auth_interceptors
        ) as gateway,
        grpc.aio.insecure_channel(mesh.addr("generator")) as generator,
    ):
        yield {"gateway": gateway, "generator": generator}


@pytest_asyncio.fixture(loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reference_key(env: ServiceEnv) -> str:
    """A reference image uploaded to the gateway's object store."""
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    return await stored_upload(env, buffer.getvalue())


def grpc_spec(key: str, change: str) -> types_pb2.GenerationSpec:
    """A tiny-sd request with a reference image, changed as `change` names."""
    spec = types_pb2.GenerationSpec(
        text=f"a windmill {uuid.uuid4().hex}", width_px=SIZE, height_px=SIZE, steps=4, seed=3
    )
    reference = types_pb2.GuidanceImage(key=key, role=types_pb2.GUIDANCE_ROLE_REFERENCE)
    if change != "controlnet-without-reference":
        spec.guidance_images.append(reference)
    if change == "style":
        spec.guidance_images.add(key=key, role=types_pb2.GUIDANCE_ROLE_STYLE)
    elif change == "recoloring":
        spec.controlnet.CopyFrom(types_pb2.ControlNet(name="recoloring", weight=0.5))
    elif change == "mask":
        spec.controlnet.CopyFrom(types_pb2.ControlNet(name="canny", weight=0.5, mask_key=key))
    elif change == "controlnet-without-reference":
        spec.controlnet.CopyFrom(types_pb2.ControlNet(name="canny", weight=0.5))
    elif change == "strength":
        spec.strength = 1.5
    return spec


def http_body(key: str, change: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": f"a windmill {uuid.uuid4().hex}",
        "width": SIZE,
        "height": SIZE,
        "steps": 4,
        "seed": 3,
        "guidance_images": [{"key": key, "role": "reference"}],
    }
    if change == "style":
        body["guidance_images"].append({"key": key, "role": "style"})
    elif change == "recoloring":
        body["controlnet"] = {"name": "recoloring", "weight": 0.5}
    elif change == "mask":
        body["controlnet"] = {"name": "canny", "weight": 0.5, "mask": key}
    elif change == "controlnet-without-reference":
        body["controlnet"] = {"name": "canny", "weight": 0.5}
        del body["guidance_images"]
    elif change == "strength":
        body["strength"] = 1.5
    return body


REFUSALS = {
    "style": "guidance_images[1].role",
    "recoloring": "controlnet.name",
    "mask": "controlnet.mask",
    "controlnet-without-reference": "controlnet",
    "strength": "strength",
}
PB_NAMES = {"controlnet.mask": "controlnet.mask_key"}


@pytest.mark.parametrize("change", list(REFUSALS))
async def test_what_the_model_cannot_honour_is_refused_over_grpc_naming_it_and_never_priced(
    channels: dict[str, grpc.aio.Channel], reference_key: str, change: str
) -> None:
    field = "spec." + PB_NAMES.get(REFUSALS[change], REFUSALS[change])
    spec = grpc_spec(reference_key, change)
    images = image_service_pb2_grpc.ImageServiceStub(channels["gateway"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec))
    assert violations(caught.value) == [field]
    costs = cost_service_pb2_grpc.CostServiceStub(channels["gateway"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await costs.EstimateCost(cost_service_pb2.EstimateCostRequest(spec=spec))
    assert violations(caught.value) == [field]
    generator = generator_service_pb2_grpc.GeneratorServiceStub(channels["generator"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in generator.Generate(generator_service_pb2.GenerateRequest(spec=spec)):
            pass
    assert violations(caught.value) == [field]


@pytest.mark.parametrize("change", list(REFUSALS))
async def test_what_the_model_cannot_honour_is_refused_over_http_naming_it_and_never_priced(
    http: httpx.AsyncClient, reference_key: str, change: str
) -> None:
    for route in ("/api/generate/text-to-image", "/api/cost/estimate"):
        response = await http.post(route, json=http_body(reference_key, change))
        assert response.status_code == 422, (route, response.text)
        error = response.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT"
        assert [v["field"] for v in error["field_violations"]] == [REFUSALS[change]], route
        assert "est_cost_cents" not in response.json()


async def test_a_reference_and_a_controlnet_the_model_has_are_admitted_with_their_strength(
    channels: dict[str, grpc.aio.Channel], http: httpx.AsyncClient, reference_key: str
) -> None:
    images = image_service_pb2_grpc.ImageServiceStub(channels["gateway"])
    spec = grpc_spec(reference_key, "")
    spec.controlnet.CopyFrom(types_pb2.ControlNet(name="depth", weight=0.5))
    response = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec))
    assert response.job.status == types_pb2.JOB_STATUS_QUEUED
    assert response.job.spec.strength == pytest.approx(DEFAULT_STRENGTH)
    assert (response.estimate.controlnet_cents, response.estimate.guidance_cents) == (1.0, 0.5)
    spec.strength = 0.3
    response = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec))
    assert response.job.spec.strength == pytest.approx(0.3)
    body = {
        **http_body(reference_key, ""),
        "strength": 0.6,
        "controlnet": {"name": "canny", "weight": 0.7},
        "preview_every": 2,
    }
    created = await http.post("/api/generate/text-to-image", json=body)
    assert created.status_code == 201, created.text
    status = await http.get(f"/api/status/{created.json()['run_id']}")
    # The job says what guides it, over HTTP as over gRPC.
    for job in (created.json(), status.json()):
        assert job["request"]["strength"] == 0.6
        assert job["request"]["guidance_images"] == [{"key": reference_key, "role": "reference"}]
        assert job["request"]["controlnet"] == {"name": "canny", "weight": 0.7, "mask": None}
        assert job["request"]["preview_every"] == 2
    got = await images.GetJob(image_service_pb2.GetJobRequest(job_id=created.json()["run_id"]))
    assert got.job.spec.preview_every_steps == 2 and got.job.spec.controlnet.name == "canny"
    assert status.json()["engine_version"] == got.job.engine_version != ""
    assert status.json()["retryable"] is False and status.json()["evaluator_models"] == []


async def test_list_models_and_the_http_models_list_say_what_each_model_can_honour(
    channels: dict[str, grpc.aio.Channel], http: httpx.AsyncClient, registry: Registry
) -> None:
    generator = generator_service_pb2_grpc.GeneratorServiceStub(channels["generator"])
    listed = await generator.ListModels(generator_service_pb2.ListModelsRequest())
    by_id = {m.id: m for m in listed.models}
    assert list(by_id["tiny-sd"].guidance_roles) == [types_pb2.GUIDANCE_ROLE_REFERENCE]
    assert list(by_id["tiny-sd"].controlnets) == ["canny", "depth"]
    response = await http.get("/api/models")
    served = {m["id"]: m for m in response.json()["models"]}
    assert served["tiny-sd"]["guidance_roles"] == ["reference"]
    assert served["tiny-sd"]["controlnets"] == ["canny", "depth"]
    for model in registry.models.values():  # every model, as its registry entry says
        assert len(by_id[model.id].guidance_roles) == len(model.guidance_roles)
        assert list(by_id[model.id].controlnets) == sorted(model.controlnets)
        assert served[model.id]["guidance_roles"] == list(model.guidance_roles)


async def test_generate_through_the_generator_honours_img2img_and_both_controlnets(
    channels: dict[str, grpc.aio.Channel], reference_key: str
) -> None:
    generator = generator_service_pb2_grpc.GeneratorServiceStub(channels["generator"])

    async def sha(spec: types_pb2.GenerationSpec) -> str:
        request = generator_service_pb2.GenerateRequest(spec=spec)
        async for response in generator.Generate(request, timeout=WAIT):
            if response.HasField("artifact"):
                return str(response.artifact.artifact.sha256)
        raise AssertionError("no image")

    guided = grpc_spec(reference_key, "")
    plain = types_pb2.GenerationSpec()
    plain.CopyFrom(guided)
    del plain.guidance_images[:]
    canny, depth = (types_pb2.GenerationSpec() for _ in range(2))
    for spec, name in ((canny, "canny"), (depth, "depth")):
        spec.CopyFrom(guided)
        spec.controlnet.CopyFrom(types_pb2.ControlNet(name=name, weight=1.0))
    hashes = [await sha(spec) for spec in (plain, guided, canny, depth)]
    assert len(set(hashes)) == 4  # img2img, canny and depth each change the image
    assert await sha(canny) == hashes[2]  # and each repeats byte for byte
