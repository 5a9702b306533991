"""The HTTP request bodies as pydantic models: each one validates its route's body in the handler
and is the JSON Schema of that body in /openapi.json (services/gateway/openapi.py), so the two
cannot drift.

A body is read and parsed strictly first (services/gateway/http_input.py: size, JSON, every
string and number in it), then validated here, in two tiers as before: a field of the wrong JSON
type is refused alone (every such field at once), otherwise every field that breaks the
document's own rules (ranges, lengths, patterns, enums) is. The rules that depend on the model or
on stored state (sizes per model, which roles and ControlNets a model takes, whether an upload
exists, the content policy) are checked after that by the domain (services/common/spec.py
`resolve`, JobService); the document names them in each field's `x-server-rules`. Unknown
fields are ignored, as they always were (clients of the replaced system send some); their values
must still be sane JSON, which the schema says with `additionalProperties`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from services.common.errors import FieldViolation, InvalidArgument
from services.common.images import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE
from services.common.spec import (
    CONTROLNET_NAMES,
    GUIDANCE_ROLES,
    MAX_GUIDANCE_IMAGES,
    MAX_JSON_KEY_CHARS,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NON_BLANK,
    ControlNet,
    GuidanceImage,
    Spec,
    json_path,
)
from services.evaluator.client import MAX_IMAGES_PER_CALL
from services.gateway.outbound import MAX_URL_CHARS
from services.jobs.records import WEBHOOK_EVENTS, CacheMode, Priority

# Strings: prompts may hold tabs and line breaks, every other string no control character
# (http_input refuses them anywhere in a body, with their path, before these models run). The
# patterns mean the same to ECMA-262 (JSON Schema), Python's re and pydantic's Rust engine.
TEXT = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F]*$"
NAME = r"^[^\x00-\x1F\x7F]*$"
UPLOAD_KEY = r"^uploads/[a-z0-9][a-z0-9_-]{0,62}/[0-9a-f]{2}/[0-9a-f]{64}\.(png|jpg|webp)$"
# No whitespace (as Python's str.isspace sees it) and no control character.
_SOLID = r"[^\x00-\x20\x7F\x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
_TEXT_CHAR = r"[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
# Text with something in it besides whitespace, and no control character.
NON_BLANK_TEXT = f"^{_TEXT_CHAR}*{_SOLID}{_TEXT_CHAR}*$"
SHA256 = r"^[0-9a-f]{64}$"
BASE64 = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
MAX_SAFE_INTEGER = MAX_SEED  # 2**53 - 1: exact in JSON numbers and JavaScript
# What a pattern a value failed means, for the error message.
_PATTERN_MEANINGS = {
    TEXT: "contains a control character",
    NAME: "contains a control character",
    NON_BLANK_TEXT: "must not be empty",
    UPLOAD_KEY: "not an upload key from /api/uploads/presign",
    SHA256: "64 lowercase hex digits of the content's SHA-256",
    BASE64: "must be a base64-encoded image",
}
_TYPE_ERRORS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "list_type": "must be an array",
}


def _whole(value: Any) -> Any:
    """A JSON number with no fraction is an integer (JSON Schema's `integer` says so, and
    JSON has one number type): 64.0 reads as 64; 64.5 stays a float, which int refuses."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field: strict (no "64", no true) but for a number written with a zero fraction.
Int = Annotated[int, BeforeValidator(_whole)]


# An 8x8 red PNG, the example of an inline image.
_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtBIA0MoBFD5jqJkAAAAA"
    "SUVORK5CYII="
)


def rules(*lines: str) -> dict[str, Any]:
    """A field's `x-server-rules`: what the server checks beyond the schema (a request that
    meets the schema may still be refused for these, with a 422 naming the field)."""
    return {"x-server-rules": list(lines)}


UPLOADED = "must name a completed, verified upload of the caller's tenant"
UploadKey = Annotated[str, Field(pattern=UPLOAD_KEY, json_schema_extra=rules(UPLOADED))]
InlineImage = Annotated[
    str,
    Field(
        pattern=BASE64,
        json_schema_extra={
            "contentEncoding": "base64",
            "contentMediaType": "image/*",
            **rules(
                "must decode as a PNG, JPEG or WebP image of at most"
                f" {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"
            ),
        },
    ),
]

# The JSON value an unknown field may hold: any, with sane strings and keys (a schema of the
# document's components, `JsonValue`, written by openapi.py).
_ANY_JSON: dict[str, Any] = {"$ref": "#/components/schemas/JsonValue"}
KEYS: dict[str, Any] = {"minLength": 1, "maxLength": MAX_JSON_KEY_CHARS, "pattern": NAME}
_OBJECT: dict[str, Any] = {"additionalProperties": _ANY_JSON, "propertyNames": KEYS}


class Body(BaseModel):
    """A request body: JSON types are strict (no "64" for 64, no 0 for false), null is the
    same as absent, and unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra=_OBJECT)


class Part(BaseModel):
    """An object inside a body: as strict; unknown fields are ignored too."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra=_OBJECT)


class GuidanceImageBody(Part):
    """A guidance image: an upload of the caller's tenant and what the model does with it."""

    key: str = Field(
        pattern=UPLOAD_KEY,
        description="the key /api/uploads/presign returned, once the bytes were uploaded",
        json_schema_extra=rules(UPLOADED),
    )
    role: Literal["reference", "style", "texture"] = Field(
        description="reference: img2img's start (and a ControlNet's control image); style and"
        " texture need an IP-Adapter",
        json_schema_extra=rules(
            "the model must take the role: see guidance_roles in GET /api/models",
        ),
    )


class ControlNetBody(Part):
    """A ControlNet whose control image is made from the reference guidance image."""

    name: Literal["canny", "depth", "recoloring", "color_grid"] = Field(
        json_schema_extra=rules("the model must have it: see controlnets in GET /api/models"),
    )
    weight: float | None = Field(None, ge=0, le=1, description="conditioning scale; default 1")
    mask: str | None = Field(
        None,
        pattern=UPLOAD_KEY,
        description="an upload key of a mask image",
        json_schema_extra=rules("no served model takes a ControlNet mask: always refused"),
    )


PROMPT_RULES = (
    "give exactly one of a prompt with some text in it or fibo_json",
    "the content policy may refuse it (a 422 with policy_violation {category, field})",
)


# Exactly one of a non-blank prompt or a FIBO prompt (resolve checks the same).
_SPEC_OBJECT: dict[str, Any] = {
    **_OBJECT,
    "oneOf": [
        {
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string", "pattern": NON_BLANK}},
        },
        {"required": ["fibo_json"], "properties": {"fibo_json": {"type": "object"}}},
    ],
}


class SpecBody(Body):
    """What to render: the fields every generation route takes."""

    model_config = ConfigDict(json_schema_extra=_SPEC_OBJECT)

    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        pattern=TEXT,
        description="the text prompt (tabs and line breaks allowed); or give fibo_json",
        examples=["a lighthouse on a cliff at dusk"],
        json_schema_extra=rules(*PROMPT_RULES),
    )
    fibo_json: (
        Annotated[dict[str, Any], WithJsonSchema({"$ref": "#/components/schemas/FiboPrompt"})]
        | None
    ) = Field(None, description="a FIBO structured prompt instead of a text prompt")
    negative_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        pattern=TEXT,
        description="what the image should not show (SD family)",
        examples=["blurry"],
        json_schema_extra=rules(PROMPT_RULES[1]),
    )
    model: str | None = Field(
        None,
        max_length=MAX_NAME_CHARS,
        pattern=NAME,
        description="a model id from GET /api/models; empty or absent: the default model",
    )
    seed: Int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="variant i is rendered with seed + i; absent: a random seed, recorded",
        examples=[42],
        json_schema_extra=rules("seed + num_variants must be at most 2**53 - 1"),
    )
    width: Int | None = Field(None, description="pixels; 0 or absent: the model's default")
    height: Int | None = Field(None, description="pixels; 0 or absent: the model's default")
    num_variants: Int | None = Field(
        None, description="images to render; 0 or absent: 1", examples=[2]
    )
    steps: Int | None = Field(
        None, description="denoising steps; 0 or absent: the model's default", examples=[20]
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=30, description="absent: the model's default", examples=[7.5]
    )
    guidance_images: list[GuidanceImageBody] | None = Field(
        None, max_length=MAX_GUIDANCE_IMAGES, description="uploaded images that guide the render"
    )
    controlnet: ControlNetBody | None = Field(
        None,
        json_schema_extra=rules(
            "needs a reference guidance image: its control image is made from it",
        ),
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="img2img: how much of the reference image is re-noised (1: all of it);"
        " default 0.75 with a reference image",
        json_schema_extra=rules(
            "only with a reference guidance image",
            "int(steps x strength) must be at least 1",
        ),
    )
    preview_every: Int | None = Field(
        None,
        description="a `preview` SSE event (a small PNG data URL of the latents) every that"
        " many steps (SD family); 0 or absent: none",
    )

    def spec(self) -> Spec:
        """The domain request (not yet resolved: defaults and the seed come with resolve)."""
        controlnet = None
        if self.controlnet is not None:
            weight = 1.0 if self.controlnet.weight is None else self.controlnet.weight
            controlnet = ControlNet(self.controlnet.name, weight, self.controlnet.mask or "")
        return Spec(
            prompt=self.prompt or "",
            fibo_json=self.fibo_json,
            negative_prompt=self.negative_prompt or "",
            model=self.model or "",
            seed=self.seed,
            width=self.width or 0,
            height=self.height or 0,
            num_variants=self.num_variants or 0,
            steps=self.steps or 0,
            guidance_scale=self.guidance_scale,
            guidance_images=tuple(
                GuidanceImage(key=g.key, role=g.role) for g in self.guidance_images or ()
            ),
            controlnet=controlnet,
            strength=self.strength,
            preview_every=self.preview_every or 0,
        )


# Whole requests (the fields' own examples do not all go together).
_SPEC_EXAMPLES: list[dict[str, Any]] = [
    {"prompt": "a lighthouse on a cliff at dusk", "width": 256, "height": 256, "seed": 42},
    {"fibo_json": {"short_description": "a red fox in the snow", "style_medium": "photograph"}},
]


class GenerateRequest(SpecBody):
    """POST /api/generate/text-to-image: what to render, and how to run the job."""

    model_config = ConfigDict(
        json_schema_extra={
            **_SPEC_OBJECT,
            "examples": [{**_SPEC_EXAMPLES[0], "num_variants": 2, "priority": "high"}],
        }
    )

    cache: Annotated[CacheMode, Field(strict=False)] | None = Field(
        None,
        description="use (default): answer from the cache when it can and store what is"
        " rendered; refresh: render and replace the cached result; off: neither read nor write",
    )
    seed_agnostic_cache: bool | None = Field(
        None, description="with cache=use, accept a cached result of any seed"
    )
    skip_cache: bool | None = Field(
        None,
        description="the older spelling of cache=refresh",
        json_schema_extra={"deprecated": True, **rules("true is refused with cache use or off")},
    )
    priority: Annotated[Priority, Field(strict=False)] | None = Field(
        None, description="the job's lane within its tenant's fair share; default normal"
    )
    max_cost_cents: Int | None = Field(
        None,
        ge=0,
        le=MAX_SAFE_INTEGER,
        description="the most the job may cost",
        json_schema_extra=rules("refused when the request's estimate is higher"),
    )
    webhook_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        pattern=f"^[Hh][Tt][Tt][Pp][Ss]?://{_SOLID}+$",
        description="told of the job's end (Standard Webhooks, signed with the tenant's"
        " secret); default: the tenant's webhook",
        examples=["https://hooks.example.com/imagegen"],
        json_schema_extra={
            "format": "uri",
            **rules(
                "a host is required, without user name or password",
                "private, loopback and link-local hosts are refused unless the operator"
                " allows them (WEBHOOK_ALLOW_PRIVATE)",
            ),
        },
    )
    webhook_events: list[Literal["job.completed", "job.failed", "job.cancelled"]] | None = Field(
        None,
        description="the events the webhook wants; empty or absent: all three",
        json_schema_extra=rules("only with webhook_url"),
    )


class CacheLookupRequest(SpecBody):
    """POST /api/cache/lookup: what would be rendered, and whether any seed will do."""

    model_config = ConfigDict(
        json_schema_extra={
            **_SPEC_OBJECT,
            "examples": [{**_SPEC_EXAMPLES[0], "seed_agnostic": True}],
        }
    )

    seed_agnostic: bool | None = Field(None, description="accept a cached result of any seed")


class EstimateRequest(SpecBody):
    """POST /api/cost/estimate: what would be rendered (how the job would run is ignored)."""

    model_config = ConfigDict(json_schema_extra={**_SPEC_OBJECT, "examples": [*_SPEC_EXAMPLES]})


class PresignUploadRequest(Body):
    """POST /api/uploads/presign: the image the client is about to upload."""

    content_type: Literal["image/png", "image/jpeg", "image/webp"] = Field(
        description="the image's type; the upload must be an image of it"
    )
    sha256: str = Field(
        pattern=SHA256,
        description="the SHA-256 of the bytes, lowercase hex",
        examples=["3f" * 32],
    )
    size_bytes: Int = Field(ge=1, le=MAX_IMAGE_BYTES, description="the upload's exact size")


class EvaluateRequest(Body):
    """POST /api/evaluate: images to score against a prompt."""

    model_config = ConfigDict(
        json_schema_extra={**_OBJECT, "examples": [{"prompt": "a red square", "images": [_PNG]}]}
    )

    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS,
        pattern=NON_BLANK_TEXT,
        description="the text the images are scored against",
        examples=["a red bicycle"],
    )
    image_keys: list[UploadKey] | None = Field(
        None,
        max_length=MAX_IMAGES_PER_CALL,
        description="keys of verified uploads (POST /api/uploads/presign)",
        json_schema_extra=rules(f"1..{MAX_IMAGES_PER_CALL} images in all with images"),
    )
    images: list[InlineImage] | None = Field(
        None,
        max_length=MAX_IMAGES_PER_CALL,
        description="image files inline, base64-encoded: PNG, JPEG or WebP",
        json_schema_extra=rules(f"1..{MAX_IMAGES_PER_CALL} images in all with image_keys"),
    )
    reference_key: str | None = Field(
        None,
        pattern=f"^$|{UPLOAD_KEY}",
        description="an upload to score LPIPS against; empty or absent: none",
        json_schema_extra=rules(UPLOADED),
    )


# The constants the models spell out, checked against the domain's own at import.
assert (GUIDANCE_ROLES, CONTROLNET_NAMES) == (
    ("reference", "style", "texture"),
    ("canny", "depth", "recoloring", "color_grid"),
)
assert WEBHOOK_EVENTS == ("job.completed", "job.failed", "job.cancelled")

Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], body: dict[str, Any]) -> Model:
    """`body` (parsed JSON) as `model`; InvalidArgument naming every bad field by its path: the
    fields of a wrong type if any, else every field that breaks a rule of the schema."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise InvalidArgument(violations(error)) from None


def violations(error: ValidationError) -> list[FieldViolation]:
    found = error.errors(include_url=False)
    wrong_types = [e for e in found if _wrong_type(e)]
    return [_violation(e) for e in wrong_types or found]


def _wrong_type(error: Any) -> bool:
    # An enum's value that is not even a string is a wrong type, as it always was.
    enum = error["type"] in ("literal_error", "enum") and not isinstance(error["input"], str)
    return enum or error["type"] in _TYPE_ERRORS


def _violation(error: Any) -> FieldViolation:
    path = ""
    for step in error["loc"]:
        path = json_path(path, step)
    kind, context = error["type"], error.get("ctx") or {}
    if kind in _TYPE_ERRORS or _wrong_type(error):
        return FieldViolation(path, _TYPE_ERRORS.get(kind, "must be a string"))
    if kind == "missing":
        parent = error.get("input")
        if error["loc"][-1] == "key" and isinstance(parent, dict) and "url" in parent:
            url = json_path(path.rsplit(".", 1)[0], "url")
            return FieldViolation(url, "give the key returned by /api/uploads/presign")
        return FieldViolation(path, "required")
    described = {
        "string_pattern_mismatch": lambda: _PATTERN_MEANINGS.get(
            context.get("pattern", ""), "does not match its pattern"
        ),
        "string_too_long": lambda: f"at most {context.get('max_length')} characters",
        "too_long": lambda: f"at most {context.get('max_length')} items",
        "greater_than_equal": lambda: f"must be at least {context.get('ge')}",
        "greater_than": lambda: f"must be more than {context.get('gt')}",
        "less_than_equal": lambda: f"must be at most {context.get('le')}",
        "literal_error": lambda: f"one of {context.get('expected')}",
        "enum": lambda: f"one of {context.get('expected')}",
    }
    make = described.get(kind)
    return FieldViolation(path, make() if make else str(error["msg"]))
