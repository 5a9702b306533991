"""Unit tests of the request domain: spec checking and resolving, cache keys, prices, and the
protobuf conversions every servicer uses at its edge."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import struct_pb2
from imagegen.v1 import types_pb2

from services.common.convert import spec_from_pb, spec_to_pb, with_pb_fields
from services.common.errors import FieldViolation, InvalidArgument
from services.common.models import ModelSpec, Registry, load_registry
from services.common.settings import ROOT
from services.common.spec import (
    GUIDANCE_ROLES,
    MAX_SEED,
    ControlNet,
    GuidanceImage,
    Spec,
    cache_keys,
    canonical_fibo,
    normalize_prompt,
    resolve,
)
from services.gateway.cost import Cost, estimate

TINY = ModelSpec(
    id="tiny-sd",
    family="sd",
    path="/models/tiny-sd",
    version="tiny-sd-1",
    default_steps=20,
    default_width=256,
    default_height=256,
    default_guidance=7.5,
    min_size=64,
    max_size=1024,
    guidance_roles=GUIDANCE_ROLES,  # as if it had an IP-Adapter for style and texture
)
HD = replace(
    TINY,
    id="hd",
    version="hd-2",
    min_size=256,
    max_size=2048,
    price_multiplier=1.5,
    controlnets={"canny": "/models/hd-canny", "depth": "/models/hd-depth"},
)
REGISTRY = Registry(models={"tiny-sd": TINY, "hd": HD}, default="tiny-sd")

FIBO = {
    "short_description": "a red fox in snow",
    "objects": [
        {"description": "fox", "location": "center", "texture": None},
        None,
        {"description": "tree", "shape_and_color": "dark green"},
    ],
    "lighting": {"conditions": "overcast", "direction": None, "shadows": "soft"},
    "style_medium": None,
}


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def resolved(**fields: object) -> Spec:
    values: dict[str, object] = {"prompt": "a red fox", "seed": 42}
    values.update(fields)
    return resolve(Spec(**values), REGISTRY)  # type: ignore[arg-type]


# Prompt normalization and FIBO canonical form


def test_normalize_prompt_lowercases_trims_and_collapses_whitespace() -> None:
    assert normalize_prompt("  A  Red\tFOX \n in   Snow  ") == "a red fox in snow"


def test_canonical_fibo_drops_nulls_recursively() -> None:
    assert canonical_fibo(FIBO) == {
        "short_description": "a red fox in snow",
        "objects": [
            {"description": "fox", "location": "center"},
            {"description": "tree", "shape_and_color": "dark green"},
        ],
        "lighting": {"conditions": "overcast", "shadows": "soft"},
    }


def test_fibo_text_prompt_is_the_same_for_any_key_order_and_nulls() -> None:
    reordered = {
        "lighting": {"shadows": "soft", "conditions": "overcast"},
        "objects": [
            {"location": "center", "description": "fox"},
            {"shape_and_color": "dark green", "description": "tree"},
        ],
        "short_description": "a red fox in snow",
    }
    first = Spec(fibo_json=FIBO).text_prompt()
    assert first == Spec(fibo_json=reordered).text_prompt()
    assert first == json.dumps(json.loads(first), sort_keys=True)  # keys sorted at every level
    assert "null" not in first


# Cache keys


def test_cache_key_is_the_same_for_prompts_that_normalize_alike() -> None:
    first = cache_keys(resolved(prompt="A red  fox"), TINY)
    second = cache_keys(resolved(prompt="  a RED fox\n"), TINY)
    assert first == second


def test_cache_key_is_the_same_for_equivalent_fibo_prompts() -> None:
    reordered = dict(reversed(list(FIBO.items())))
    first = cache_keys(resolved(prompt="", fibo_json=FIBO), TINY)
    second = cache_keys(resolved(prompt="", fibo_json=canonical_fibo(reordered)), TINY)
    assert first == second


def test_cache_key_of_a_fibo_prompt_differs_from_a_text_prompt_and_other_fibo() -> None:
    fibo_key, _ = cache_keys(resolved(prompt="", fibo_json=FIBO), TINY)
    text_key, _ = cache_keys(resolved(prompt=json.dumps(FIBO)), TINY)
    other_key, _ = cache_keys(
        resolved(prompt="", fibo_json={**FIBO, "short_description": "a grey fox"}), TINY
    )
    assert len({fibo_key, text_key, other_key}) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 43},
        {"steps": 21},
        {"width": 512},
        {"height": 512},
        {"negative_prompt": "blurry"},
        {"guidance_scale": 5.0},
        {"num_variants": 2},
        {"prompt": "a red fox at night"},
        {"guidance_images": (GuidanceImage("uploads/ab/ref.png", "reference"),)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_cache_key_changes_with_every_field_that_changes_the_pixels(
    change: dict[str, object],
) -> None:
    base_key, _ = cache_keys(resolved(), TINY)
    changed_key, _ = cache_keys(resolved(**change), TINY)
    assert changed_key != base_key


def test_cache_key_changes_with_controlnet_and_its_weight() -> None:
    base = resolve(Spec(prompt="a fox", seed=1, model="hd"), REGISTRY)
    canny = replace(base, controlnet=ControlNet("canny", 0.5))
    stronger = replace(base, controlnet=ControlNet("canny", 0.75))
    keys = {cache_keys(spec, HD)[0] for spec in (base, canny, stronger)}
    assert len(keys) == 3


def test_cache_key_changes_with_the_model_version() -> None:
    spec = resolved()
    retrained = replace(TINY, version="tiny-sd-2")
    assert cache_keys(spec, TINY)[0] != cache_keys(spec, retrained)[0]
    assert cache_keys(spec, TINY)[1] != cache_keys(spec, retrained)[1]


def test_seedless_key_is_independent_of_the_seed_and_differs_from_the_seed_aware_key() -> None:
    key_1, seedless_1 = cache_keys(resolved(seed=1), TINY)
    key_2, seedless_2 = cache_keys(resolved(seed=2), TINY)
    assert seedless_1 == seedless_2
    assert key_1 != key_2
    assert seedless_1 not in (key_1, key_2)


def test_seedless_key_still_changes_with_the_other_fields() -> None:
    _, seedless = cache_keys(resolved(), TINY)
    _, other_steps = cache_keys(resolved(steps=5), TINY)
    assert seedless != other_steps


# resolve


def test_resolve_fills_the_model_defaults_and_chooses_a_seed() -> None:
    spec = resolve(Spec(prompt="a red fox"), REGISTRY)
    assert spec.model == "tiny-sd"
    assert (spec.width, spec.height) == (256, 256)
    assert spec.steps == 20
    assert spec.num_variants == 1
    assert spec.guidance_scale == 7.5
    assert spec.seed is not None and 0 <= spec.seed < 2**31
    assert spec.prompt == "a red fox"


def test_resolve_keeps_given_values() -> None:
    spec = resolve(
        Spec(
            prompt="a fox",
            model="hd",
            seed=0,
            width=512,
            height=768,
            num_variants=3,
            steps=7,
            guidance_scale=0.0,
        ),
        REGISTRY,
    )
    assert (spec.model, spec.seed, spec.width, spec.height) == ("hd", 0, 512, 768)
    assert (spec.num_variants, spec.steps, spec.guidance_scale) == (3, 7, 0.0)


def test_resolve_is_idempotent_on_a_resolved_spec() -> None:
    once = resolved()
    assert resolve(once, REGISTRY) == once


def test_resolve_collects_every_violation_with_its_field_name() -> None:
    spec = Spec(
        prompt="",
        width=70,
        height=2048,
        num_variants=50,
        steps=101,
        guidance_scale=31.0,
        seed=-1,
        guidance_images=(
            GuidanceImage("uploads/ok.png", "style"),
            GuidanceImage("Not A Key!", "mood"),
        ),
        controlnet=ControlNet("sketch", 1.5),
    )
    with pytest.raises(InvalidArgument) as caught:
        resolve(spec, REGISTRY)
    assert set(fields_of(caught.value)) == {
        "prompt",
        "width",
        "height",
        "num_variants",
        "steps",
        "guidance_scale",
        "seed",
        "guidance_images[1].key",
        "guidance_images[1].role",
        "controlnet.name",
        "controlnet.weight",
        "controlnet",  # no reference image to make its control image from
    }
    assert all(v.description for v in caught.value.violations)


def test_resolve_names_the_unknown_model_together_with_the_prompt() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="", model="sdxl-turbo"), REGISTRY)
    assert set(fields_of(caught.value)) == {"model", "prompt"}


def test_resolve_rejects_both_a_text_and_a_fibo_prompt() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="a fox", fibo_json={"short_description": "a fox"}), REGISTRY)
    assert fields_of(caught.value) == ["prompt"]


@pytest.mark.parametrize("fibo", [{}, {"short_description": None}])
def test_resolve_rejects_an_empty_fibo_prompt(fibo: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(fibo_json=fibo), REGISTRY)
    assert fields_of(caught.value) == ["fibo_json"]


def test_resolve_accepts_a_fibo_prompt_alone() -> None:
    spec = resolve(Spec(fibo_json=FIBO, seed=3), REGISTRY)
    assert spec.fibo_json == FIBO and spec.prompt == ""


def test_resolve_rejects_a_whitespace_only_prompt() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt=" \n\t "), REGISTRY)
    assert fields_of(caught.value) == ["prompt"]


def test_resolve_rejects_a_prompt_over_the_length_limit() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="x" * 2001), REGISTRY)
    assert fields_of(caught.value) == ["prompt"]
    assert resolve(Spec(prompt="x" * 2000, seed=1), REGISTRY).prompt == "x" * 2000


def test_resolve_with_require_seed_rejects_a_missing_seed() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="a fox"), REGISTRY, require_seed=True)
    assert fields_of(caught.value) == ["seed"]


def test_resolve_keeps_every_variant_seed_within_the_exact_integer_range() -> None:
    assert resolve(Spec(prompt="a", seed=MAX_SEED - 2, num_variants=2), REGISTRY).seed
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="a", seed=MAX_SEED - 1, num_variants=2), REGISTRY)
    assert fields_of(caught.value) == ["seed"]


def test_resolve_checks_sizes_against_the_chosen_model() -> None:
    # 128 is fine for the tiny model, below the HD model's minimum.
    assert resolve(Spec(prompt="a", width=128, height=128), REGISTRY).width == 128
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="a", model="hd", width=128, height=128), REGISTRY)
    assert fields_of(caught.value) == ["width", "height"]


def test_resolve_rejects_more_than_five_guidance_images() -> None:
    images = tuple(GuidanceImage(f"uploads/{i}.png", "style") for i in range(6))
    with pytest.raises(InvalidArgument) as caught:
        resolve(Spec(prompt="a", guidance_images=images), REGISTRY)
    assert fields_of(caught.value) == ["guidance_images"]


def test_resolve_rejects_a_controlnet_the_model_does_not_have() -> None:
    reference = (GuidanceImage("uploads/ref.png", "reference"),)
    canny = Spec(prompt="a", guidance_images=reference, controlnet=ControlNet("canny", 0.5))
    with pytest.raises(InvalidArgument) as caught:
        resolve(canny, REGISTRY)
    assert fields_of(caught.value) == ["controlnet.name"]
    spec = resolve(replace(canny, model="hd"), REGISTRY)
    assert spec.controlnet == ControlNet("canny", 0.5)


def test_the_deployed_tiny_registry_resolves_its_default_model() -> None:
    registry = load_registry(ROOT / "deploy" / "models" / "tiny.json", ROOT / ".data" / "models")
    spec = resolve(Spec(prompt="a fox"), registry)
    model = registry.get(spec.model)
    assert model.id == registry.default
    assert model.path == str(ROOT / ".data" / "models" / "tiny-sd")
    assert (spec.width, spec.height, spec.steps) == (
        model.default_width,
        model.default_height,
        model.default_steps,
    )


# Prices


@pytest.mark.parametrize(
    ("model", "fields", "expected"),
    [
        # 1 MP, one variant: 3 cents.
        (TINY, {"width": 1024, "height": 1024}, (3.0, 0.0, 0.0, 1.0, 3)),
        # 4 variants of 0.25 MP are 1 MP: 3; one guidance image +0.5; rounded up: 4.
        (
            TINY,
            {
                "width": 512,
                "height": 512,
                "num_variants": 4,
                "guidance_images": (GuidanceImage("uploads/a.png", "style"),),
            },
            (3.0, 0.0, 0.5, 1.0, 4),
        ),
        # 2 x 1 MP = 6, ControlNet +1, two guidance images +1, x1.5 = 12.
        (
            HD,
            {
                "width": 1024,
                "height": 1024,
                "num_variants": 2,
                "controlnet": ControlNet("canny", 0.5),
                "guidance_images": (
                    GuidanceImage("uploads/a.png", "style"),
                    GuidanceImage("uploads/b.png", "reference"),
                ),
            },
            (6.0, 1.0, 1.0, 1.5, 12),
        ),
        # 1 MP x1.5 = 4.5, rounded up to 5.
        (HD, {"width": 1024, "height": 1024}, (3.0, 0.0, 0.0, 1.5, 5)),
        # 2048x2048 is 4 MP: 12 cents, x1.5 = 18.
        (HD, {"width": 2048, "height": 2048}, (12.0, 0.0, 0.0, 1.5, 18)),
        # 64x64 is 3/256 of a cent: the minimum of 1 applies.
        (TINY, {"width": 64, "height": 64}, (3.0 * 64 * 64 / 1024**2, 0.0, 0.0, 1.0, 1)),
    ],
    ids=["1mp", "variants-and-guidance", "hd-everything", "hd-rounds-up", "hd-4mp", "minimum"],
)
def test_estimate_follows_the_price_formula(
    model: ModelSpec, fields: dict[str, object], expected: tuple[float, float, float, float, int]
) -> None:
    spec = resolve(Spec(prompt="a fox", model=model.id, **fields), REGISTRY)  # type: ignore[arg-type]
    cost = estimate(spec, model)
    got = (
        cost.base_cents,
        cost.controlnet_cents,
        cost.guidance_cents,
        cost.model_multiplier,
        cost.total_cents,
    )
    assert got == pytest.approx(expected)
    assert isinstance(cost.total_cents, int)


def test_estimate_does_not_round_float_noise_up_a_cent() -> None:
    # (4 variants x 4 MP x 3 cents + 4 guidance images x 0.5) x 1.1 is exactly 55; in floats it
    # is 55.00000000000001.
    images = tuple(GuidanceImage(f"uploads/{i}.png", "style") for i in range(4))
    spec = resolve(
        Spec(
            prompt="a",
            model="hd",
            width=2048,
            height=2048,
            num_variants=4,
            seed=1,
            guidance_images=images,
        ),
        REGISTRY,
    )
    assert (48 + 2.0) * 1.1 > 55
    assert estimate(spec, replace(HD, price_multiplier=1.1)).total_cents == 55


def priced(model: ModelSpec, steps: int, **fields: Any) -> Cost:
    """The price of a one-variant request at `steps`, 1 MP unless `fields` say otherwise, as
    `resolve` leaves it (the price reads only sizes, variants, steps and the extras)."""
    size: dict[str, Any] = {"width": 1024, "height": 1024, "num_variants": 1, "seed": 1}
    spec = Spec(prompt="a fox", model=model.id, steps=steps, **{**size, **fields})
    return estimate(spec, model)


def test_a_job_of_twice_the_default_steps_costs_twice_as_much() -> None:
    # 1 MP at the default 20 steps: 3 cents; at 40 steps: 6. The base is shown before the factor.
    at_default, doubled = priced(TINY, 20), priced(TINY, 40)
    assert (at_default.base_cents, at_default.steps_factor, at_default.total_cents) == (3, 1, 3)
    assert (doubled.base_cents, doubled.steps_factor, doubled.total_cents) == (3, 2, 6)


def test_steps_scale_the_denoising_part_only_and_the_total_rounds_up() -> None:
    # (3 x 10/20 + ControlNet 1 + one guidance image 0.5) x 1.5 = 4.5 -> 5;
    # (3 x 40/20 + 1 + 0.5) x 1.5 = 11.25 -> 12: twice the steps, not twice the surcharges.
    extras: dict[str, Any] = {
        "controlnet": ControlNet("canny", 0.5),
        "guidance_images": (GuidanceImage("uploads/a.png", "style"),),
    }
    half, doubled = priced(HD, 10, **extras), priced(HD, 40, **extras)
    assert (half.steps_factor, half.total_cents) == (0.5, 5)
    assert (doubled.steps_factor, doubled.total_cents) == (2.0, 12)
    for cost in (half, doubled):
        assert (cost.controlnet_cents, cost.guidance_cents) == (1.0, 0.5)


def test_a_few_steps_round_up_to_a_whole_cent_and_never_below_one() -> None:
    # 1 MP at 7 of 20 steps is 1.05 cents: 2. 64x64 at 1 step is ~0.0006 cents: the minimum, 1.
    assert priced(TINY, 7).total_cents == 2
    tiny = priced(TINY, 1, width=64, height=64)
    assert tiny.steps_factor == pytest.approx(1 / 20)
    assert tiny.total_cents == 1


# Protobuf conversions


def test_text_spec_round_trips_through_protobuf() -> None:
    spec = Spec(
        prompt="a red fox",
        negative_prompt="blurry",
        model="hd",
        seed=0,
        width=512,
        height=768,
        num_variants=2,
        steps=12,
        guidance_scale=6.5,
        guidance_images=(
            GuidanceImage("uploads/a.png", "reference"),
            GuidanceImage("uploads/b.png", "texture"),
        ),
        controlnet=ControlNet("depth", 0.25, "uploads/mask.png"),
    )
    message = spec_to_pb(spec)
    assert message.WhichOneof("prompt") == "text"
    assert message.HasField("seed") and message.seed == 0
    assert message.guidance_images[0].role == types_pb2.GUIDANCE_ROLE_REFERENCE
    assert spec_from_pb(message) == spec
    assert spec_from_pb(types_pb2.GenerationSpec.FromString(message.SerializeToString())) == spec


def test_fibo_spec_round_trips_through_a_protobuf_struct() -> None:
    fibo = canonical_fibo(FIBO)
    spec = Spec(fibo_json=fibo, seed=5)
    message = spec_to_pb(spec)
    assert message.WhichOneof("prompt") == "fibo_json"
    assert isinstance(message.fibo_json, struct_pb2.Struct)
    assert message.fibo_json["lighting"]["shadows"] == "soft"
    back = spec_from_pb(types_pb2.GenerationSpec.FromString(message.SerializeToString()))
    assert back == spec
    assert back.prompt == ""


def test_fibo_prompt_text_is_the_same_after_a_protobuf_round_trip() -> None:
    # A Struct holds every number as a double: 3 comes back as 3.0 and must render the same.
    spec = Spec(fibo_json={"short_description": "three foxes", "objects_count": 3}, seed=1)
    back = spec_from_pb(spec_to_pb(spec))
    assert back.text_prompt() == spec.text_prompt()
    assert cache_keys(resolve(back, REGISTRY), TINY) == cache_keys(resolve(spec, REGISTRY), TINY)


def test_canonical_fibo_writes_whole_numbers_as_integers() -> None:
    assert canonical_fibo({"a": 3.0, "b": [2.0, 0.5], "c": True}) == {
        "a": 3,
        "b": [2, 0.5],
        "c": True,
    }
    assert json.dumps(canonical_fibo({"a": 3.0})) == '{"a": 3}'


def test_absent_seed_and_guidance_scale_stay_absent_through_protobuf() -> None:
    message = spec_to_pb(Spec(prompt="a fox"))
    assert not message.HasField("seed")
    assert not message.HasField("guidance_scale")
    back = spec_from_pb(message)
    assert back.seed is None and back.guidance_scale is None


def test_zero_seed_and_zero_guidance_scale_are_kept_as_present_values() -> None:
    back = spec_from_pb(spec_to_pb(Spec(prompt="a fox", seed=0, guidance_scale=0.0)))
    assert back.seed == 0
    assert back.guidance_scale == 0.0


def test_an_unspecified_guidance_role_is_not_a_valid_role() -> None:
    message = types_pb2.GenerationSpec(
        text="a fox", guidance_images=[types_pb2.GuidanceImage(key="uploads/a.png")]
    )
    with pytest.raises(InvalidArgument) as caught:
        resolve(spec_from_pb(message), REGISTRY)
    assert fields_of(caught.value) == ["guidance_images[0].role"]


def test_spec_json_round_trips_for_the_job_store() -> None:
    spec = resolve(
        Spec(
            prompt="a fox",
            model="hd",
            guidance_images=(
                GuidanceImage("uploads/r.png", "reference"),
                GuidanceImage("uploads/a.png", "style"),
            ),
            controlnet=ControlNet("canny", 0.5),
            strength=0.5,
        ),
        REGISTRY,
    )
    assert Spec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_with_pb_fields_names_violations_by_their_protobuf_paths() -> None:
    error = InvalidArgument(
        [
            FieldViolation("width", "w"),
            FieldViolation("height", "h"),
            FieldViolation("prompt", "p"),
            FieldViolation("guidance_images[1].key", "k"),
            FieldViolation("guidance_images[0].role", "r"),
            FieldViolation("controlnet.mask", "m"),
            FieldViolation("controlnet.weight", "cw"),
            FieldViolation("num_variants", "n"),
        ]
    )
    converted = with_pb_fields(error)
    assert [(v.field, v.description) for v in converted.violations] == [
        ("spec.width_px", "w"),
        ("spec.height_px", "h"),
        ("spec.text", "p"),
        ("spec.guidance_images[1].key", "k"),
        ("spec.guidance_images[0].role", "r"),
        ("spec.controlnet.mask_key", "m"),
        ("spec.controlnet.weight", "cw"),
        ("spec.num_variants", "n"),
    ]


def test_with_pb_fields_keeps_the_names_of_fields_outside_the_spec() -> None:
    error = InvalidArgument(
        [
            FieldViolation("idempotency_key", "too long"),
            FieldViolation("spec.width_px", "already a protobuf path"),
            FieldViolation("seed", "s"),
        ]
    )
    assert fields_of(with_pb_fields(error)) == ["idempotency_key", "spec.width_px", "spec.seed"]


def test_with_pb_fields_without_a_prefix_only_renames() -> None:
    converted = with_pb_fields(InvalidArgument.one("width", "w"), prefix="")
    assert fields_of(converted) == ["width_px"]


def test_every_pb_path_names_a_real_field_of_the_request() -> None:
    error = InvalidArgument(
        [FieldViolation(name, "") for name in ("prompt", "width", "height", "seed", "steps")]
        + [FieldViolation("controlnet.mask", ""), FieldViolation("guidance_images[0].key", "")]
    )
    descriptor = types_pb2.GenerationSpec.DESCRIPTOR
    for violation in with_pb_fields(error, prefix="").violations:
        top = violation.field.split(".")[0].split("[")[0]
        assert top in descriptor.fields_by_name, violation.field
