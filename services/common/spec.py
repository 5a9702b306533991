"""What a request asks for, checked and resolved, and the cache keys derived from it.

`Spec` is the plain domain form of a generation request, shared by the gRPC API, the HTTP facade,
the cache and the generator. `resolve` checks every field (collecting every violation, named by
its HTTP/JSON field name) and fills in the model's defaults and a seed, so that a resolved spec
says everything that decides the pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument
from services.common.models import ModelSpec, Registry
from services.common.objectstore import KEY_PATTERN

# Bumped whenever a change alters the bytes produced for the same request.
ENGINE_VERSION = "2"

MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE_IMAGES = 5
MAX_SEED = 2**53 - 1  # exact in JSON numbers and JavaScript
GUIDANCE_ROLES = ("reference", "style", "texture")
CONTROLNET_NAMES = ("canny", "depth", "recoloring", "color_grid")
# How much of a reference image img2img re-noises (1: all of it) when a request does not say.
DEFAULT_STRENGTH = 0.75
MAX_NAME_CHARS = 128  # model ids
MAX_FIBO_DEPTH = 32  # nested objects and arrays; protobuf's Struct stops at 100
MAX_FIBO_BYTES = 64 * 1024  # as compact UTF-8 JSON
MAX_JSON_KEY_CHARS = 128
MAX_FIBO_NUMBER = 2**53  # beyond it JSON numbers (doubles) are no longer exact integers
# Violations reported for one free-form JSON value, and the length of a path in one: a gRPC
# error travels in trailers, which clients refuse past 8-16 KiB.
MAX_REPORTED = 5
MAX_PATH_CHARS = 256
# Models of this family read FIBO structured prompts; a text prompt sent to one is turned into
# the minimal structured prompt, `{"short_description": text}`, and the job says so.
FIBO_FAMILY = "fibo"
# A character that is not whitespace (as str.strip sees it): a prompt holding one is not blank.
# Written out, not `\S`, so that it means the same in JSON Schema (ECMA-262) as here.
NON_BLANK = r"[^\t-\r\x1C-\x20\x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
_NON_BLANK = re.compile(NON_BLANK)


@dataclass(frozen=True)
class GuidanceImage:
    key: str
    role: str


@dataclass(frozen=True)
class ControlNet:
    name: str
    weight: float
    mask_key: str = ""


@dataclass(frozen=True)
class Spec:
    prompt: str = ""
    fibo_json: dict[str, Any] | None = None
    negative_prompt: str = ""
    model: str = ""
    seed: int | None = None
    width: int = 0
    height: int = 0
    num_variants: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    guidance_images: tuple[GuidanceImage, ...] = ()
    controlnet: ControlNet | None = None
    strength: float | None = None  # img2img from the reference image; resolved when there is one
    preview_every: int = 0  # a preview event every that many steps (0: none); pixels unchanged
    # What `resolve` changed about the request that the client should know (not pixels: the
    # other fields say everything that decides those).
    notices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        controlnet = data.get("controlnet")
        return cls(
            **{
                k: v
                for k, v in data.items()
                if k not in ("guidance_images", "controlnet", "notices")
            },
            guidance_images=tuple(GuidanceImage(**g) for g in data.get("guidance_images", ())),
            controlnet=ControlNet(**controlnet) if controlnet else None,
            notices=tuple(data.get("notices", ())),
        )

    def text_prompt(self) -> str:
        """The text a text-conditioned pipeline and CLIP see (a FIBO prompt as canonical JSON)."""
        if self.fibo_json is not None:
            return fibo_prompt_text(self.fibo_json)
        return self.prompt

    def scoring_text(self) -> str:
        """The text CLIP scores the images against: the prompt, or a FIBO prompt rendered as a
        sentence (its short description first: CLIP reads only 77 tokens, and JSON syntax
        would spend them on braces and key names)."""
        if self.fibo_json is not None:
            return fibo_caption(self.fibo_json)
        return self.prompt

    def reference_key(self) -> str:
        return next((g.key for g in self.guidance_images if g.role == "reference"), "")

    def denoising_steps(self) -> int:
        """The denoising steps a render runs: img2img (a reference image) starts part-way,
        `steps x strength` steps from the end (diffusers' own count: int(steps * strength))."""
        if self.strength is None or not self.reference_key():
            return self.steps
        return min(self.steps, int(self.steps * self.strength))


def normalize_prompt(text: str) -> str:
    """Lowercase, trimmed, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def canonical_fibo(value: Any) -> Any:
    """Keys sorted and nulls dropped, recursively (sorting is done by the JSON encoder); whole
    numbers as integers, since a protobuf Struct turns every number into a double."""
    if isinstance(value, dict):
        return {k: canonical_fibo(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [canonical_fibo(v) for v in value if v is not None]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def fibo_prompt_text(fibo: dict[str, Any]) -> str:
    """A FIBO prompt as the canonical JSON text its pipeline encodes."""
    return json.dumps(canonical_fibo(fibo), sort_keys=True)


# The FIBO fields a caption is made of, most telling first.
_CAPTION_FIELDS = ("short_description", "style_medium", "artistic_style", "background_setting")


def fibo_caption(fibo: dict[str, Any]) -> str:
    """A FIBO prompt as plain sentences: short description, the objects' descriptions, then
    medium, style and setting; empty parts skipped."""
    parts = [fibo.get("short_description")]
    objects = fibo.get("objects")
    if isinstance(objects, list):
        parts += [o.get("description") for o in objects if isinstance(o, dict)]
    parts += [fibo.get(name) for name in _CAPTION_FIELDS[1:]]
    sentences = [p.strip().rstrip(".") for p in parts if isinstance(p, str) and p.strip()]
    return ". ".join(sentences) + "." if sentences else fibo_prompt_text(fibo)


def cache_keys(spec: Spec, model: ModelSpec, namespace: str = "") -> tuple[str, str]:
    """(seed-aware key, seed-agnostic key) of a resolved spec: SHA-256 over everything that
    changes the pixels, the engine and model versions included, and the cache's namespace (a
    tenant's own cache; "" the shared one)."""
    material: dict[str, Any] = {
        "engine": ENGINE_VERSION,
        "model": model.id,
        "model_version": model.version,
        # The fixed batch shape the request renders in decides the last bits of its pixels.
        "batch_shape": model.batch_shape(spec.width, spec.height),
        "prompt": normalize_prompt(spec.prompt),
        "fibo": canonical_fibo(spec.fibo_json) if spec.fibo_json is not None else None,
        "negative": normalize_prompt(spec.negative_prompt),
        "size": [spec.width, spec.height],
        "steps": spec.steps,
        "guidance": spec.guidance_scale,
        "variants": spec.num_variants,
        "guidance_images": [asdict(g) for g in spec.guidance_images],
        "controlnet": asdict(spec.controlnet) if spec.controlnet else None,
    }
    if spec.strength is not None:  # absent otherwise, so that keys made before it stay valid
        material["strength"] = spec.strength
    if namespace:  # likewise: the shared cache keeps the keys it always had
        material["namespace"] = namespace

    def digest(extra: dict[str, Any]) -> str:
        blob = json.dumps({**material, **extra}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    return digest({"seed": spec.seed}), digest({})


# Text and free-form JSON. Prompts (and the strings of a FIBO prompt) may hold tabs and line
# breaks (\r too: browsers send \r\n); names and keys no control character at all. No text may
# hold DEL or a lone surrogate (which has no UTF-8 encoding, so could be neither stored nor sent).
_BAD_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_BAD_IN_NAME = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ELIDED = "\u2026"  # …


def text_problem(value: str, multiline: bool = False) -> str | None:
    """Why `value` is not acceptable text, or None when it is."""
    found = (_BAD_IN_TEXT if multiline else _BAD_IN_NAME).search(value)
    if found is None:
        return None
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        return "contains a lone surrogate, which is not valid Unicode"
    return f"contains the control character U+{ord(char):04X}"


def json_path(parent: str, key: str | int) -> str:
    """`parent.key`, `parent[3]`, or `parent["odd key"]` (escaped, so it is safe to echo; a
    long key cut short with `…`). A path grown past MAX_PATH_CHARS ends in `…` and grows no
    more (not `...`: dots separate path segments)."""
    if parent.endswith(_ELIDED):
        return parent
    if isinstance(key, int):
        step = f"[{key}]"
    elif _PLAIN_KEY.fullmatch(key) and len(key) <= 64:
        step = f".{key}" if parent else key
    else:
        step = f"[{json.dumps(key[:32])}{_ELIDED if len(key) > 32 else ''}]"
    path = parent + step
    return path if len(path) <= MAX_PATH_CHARS else parent + _ELIDED


# Where a node is: the root's path, or (where its parent is, its key or index). Rendered by
# `path_of` only for the nodes that are reported, so that walking a large body stays cheap.
Where = str | tuple[Any, str | int]


def json_nodes(value: Any, root: str, max_depth: int) -> Iterator[tuple[Where, int, Any]]:
    """(where, depth, value) of `value` and everything inside it, depth first in document
    order, without recursion; containers deeper than `max_depth` are yielded but not entered."""
    stack: list[tuple[Where, int, Any]] = [(root, 1, value)]
    while stack:
        node = stack.pop()
        yield node
        where, depth, item = node
        if depth > max_depth:
            continue
        if isinstance(item, dict):
            stack.extend(((where, k), depth + 1, v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((where, i), depth + 1, item[i]) for i in range(len(item) - 1, -1, -1))


def path_of(where: Where) -> str:
    """The path (`fibo_json.objects[2].description`) of a node from `json_nodes`."""
    keys: list[str | int] = []
    while isinstance(where, tuple):
        where, key = where
        keys.append(key)
    path = where
    for key in reversed(keys):
        path = json_path(path, key)
    return path


def json_value_problem(value: Any, depth: int, max_depth: int, multiline: bool) -> str | None:
    """What is wrong with one node from `json_nodes` itself (not with what it holds)."""
    if isinstance(value, dict | list):
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        for key in value if isinstance(value, dict) else ():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_JSON_KEY_CHARS:
                return f"keys must be strings of 1..{MAX_JSON_KEY_CHARS} characters"
            if problem := text_problem(key):
                return f"a key {problem}"
        return None
    if isinstance(value, str):
        return text_problem(value, multiline)
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if value is None or isinstance(value, bool | int | float):
        return None
    return "is not a JSON value"


def fibo_violations(fibo: Any, field: str = "fibo_json") -> list[FieldViolation]:
    """Everything that makes a FIBO prompt unsafe to store, hash or render, then (when it is
    safe) where it does not fit FIBO's schema, each named by its JSON path
    (`fibo_json.lighting.direction`)."""
    # Imported here: services.common.fibo builds its paths with this module's json_path.
    from services.common.fibo import fibo_schema_violations

    if not isinstance(fibo, dict):
        return [FieldViolation(field, "must be a JSON object")]
    bad: list[FieldViolation] = []
    too_large = FieldViolation(field, f"at most {MAX_FIBO_BYTES} bytes as JSON")
    for count, (where, depth, value) in enumerate(json_nodes(fibo, field, MAX_FIBO_DEPTH)):
        if count > MAX_FIBO_BYTES // 2:  # each value takes 2 bytes or more: too large already
            return [too_large]
        problem = json_value_problem(value, depth, MAX_FIBO_DEPTH, multiline=True)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if problem is None and is_number and abs(value) > MAX_FIBO_NUMBER:
            problem = "must be between -2**53 and 2**53"
        if problem is not None:
            bad.append(FieldViolation(path_of(where), problem))
            if len(bad) >= MAX_REPORTED:
                break
    if not bad:
        size = len(json.dumps(fibo, ensure_ascii=False, separators=(",", ":")).encode())
        if size > MAX_FIBO_BYTES:
            bad.append(too_large)
    return bad or fibo_schema_violations(fibo, field)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def resolve(spec: Spec, registry: Registry, *, require_seed: bool = False) -> Spec:
    """Checks `spec` and fills in defaults and a seed; raises InvalidArgument naming every bad
    field. `require_seed` is for callers that must not get a random seed chosen for them."""
    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(field, description))

    has_text = _NON_BLANK.search(spec.prompt) is not None  # what the HTTP schema says, too
    check(
        has_text != (spec.fibo_json is not None),
        "prompt",
        "give exactly one of prompt or fibo_json" if has_text else "must not be empty",
    )
    check(len(spec.prompt) <= MAX_PROMPT_CHARS, "prompt", f"at most {MAX_PROMPT_CHARS} chars")
    for field, text in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
        if problem := text_problem(text, multiline=True):
            bad.append(FieldViolation(field, problem))
    if spec.fibo_json is not None:
        fibo_bad = fibo_violations(spec.fibo_json)
        bad += fibo_bad
        if not fibo_bad:
            check(bool(canonical_fibo(spec.fibo_json)), "fibo_json", "must be a non-empty object")
    check(len(spec.negative_prompt) <= MAX_PROMPT_CHARS, "negative_prompt", "too long")
    model_problem = text_problem(spec.model)
    if model_problem is None and len(spec.model) > MAX_NAME_CHARS:
        model_problem = f"at most {MAX_NAME_CHARS} characters"
    if model_problem is not None:  # not looked up: the registry's error would echo it
        raise InvalidArgument([FieldViolation("model", model_problem), *bad])
    try:
        model = registry.get(spec.model)
    except InvalidArgument as error:
        raise InvalidArgument(error.violations + bad) from None
    if model.family == FIBO_FAMILY and has_text and spec.fibo_json is None:
        spec = structured_from_text(spec, model)

    width = spec.width or model.default_width
    height = spec.height or model.default_height
    for field, size in (("width", width), ("height", height)):
        check(
            model.min_size <= size <= model.max_size,
            field,
            f"must be between {model.min_size} and {model.max_size}",
        )
        check(
            size % model.size_multiple == 0, field, f"must be a multiple of {model.size_multiple}"
        )
    variants = spec.num_variants or 1
    check(1 <= variants <= model.max_variants, "num_variants", f"must be 1..{model.max_variants}")
    steps = spec.steps or model.default_steps
    check(1 <= steps <= model.max_steps, "steps", f"must be 1..{model.max_steps}")
    # Rounded here, for every caller: gRPC carries floats, JSON doubles; both must key alike.
    guidance = model.default_guidance if spec.guidance_scale is None else spec.guidance_scale
    if _finite(guidance):
        guidance = round(guidance, 4)
        check(0.0 <= guidance <= 30.0, "guidance_scale", "must be between 0 and 30")
    else:
        bad.append(FieldViolation("guidance_scale", "must be a finite number"))
    if spec.seed is None:
        check(not require_seed, "seed", "must be set")
        seed = secrets.randbelow(2**31)
    else:
        seed = spec.seed
        check(0 <= seed <= MAX_SEED - variants, "seed", f"must be 0..{MAX_SEED - variants}")
    check(
        len(spec.guidance_images) <= MAX_GUIDANCE_IMAGES,
        "guidance_images",
        f"at most {MAX_GUIDANCE_IMAGES}",
    )
    for i, image in enumerate(spec.guidance_images):
        check(_valid_key(image.key), f"guidance_images[{i}].key", "not a valid upload key")
        if image.role not in GUIDANCE_ROLES:
            bad.append(FieldViolation(f"guidance_images[{i}].role", f"one of {GUIDANCE_ROLES}"))
        elif image.role not in model.guidance_roles:
            bad.append(
                FieldViolation(
                    f"guidance_images[{i}].role",
                    f"model {model.id} cannot use a {image.role} image; "
                    f"it takes {_listing(model.guidance_roles)}",
                )
            )
    has_reference = any(g.role == "reference" for g in spec.guidance_images)
    if spec.controlnet is not None:
        name, weight = spec.controlnet.name, spec.controlnet.weight
        if name not in CONTROLNET_NAMES:
            bad.append(FieldViolation("controlnet.name", f"one of {CONTROLNET_NAMES}"))
        elif name not in model.controlnets:
            bad.append(
                FieldViolation(
                    "controlnet.name",
                    f"model {model.id} has no {name} ControlNet; "
                    f"it has {_listing(model.controlnets)}",
                )
            )
        if _finite(weight):
            check(0.0 <= round(weight, 4) <= 1.0, "controlnet.weight", "must be between 0 and 1")
        else:
            bad.append(FieldViolation("controlnet.weight", "must be a finite number"))
        if mask := spec.controlnet.mask_key:
            no_mask = f"model {model.id} takes no ControlNet mask"
            reason = no_mask if _valid_key(mask) else "not a valid upload key"
            bad.append(FieldViolation("controlnet.mask", reason))
        check(
            has_reference,
            "controlnet",
            "needs a reference guidance image: its control image is made from it",
        )
    strength = spec.strength
    if strength is None:
        strength = DEFAULT_STRENGTH if has_reference else None
    elif not has_reference:
        bad.append(FieldViolation("strength", "only with a reference guidance image"))
    elif not _finite(strength):
        bad.append(FieldViolation("strength", "must be a finite number"))
    else:
        strength = round(strength, 4)
        if not 0.0 < strength <= 1.0:
            bad.append(FieldViolation("strength", "must be more than 0 and at most 1"))
        elif 1 <= steps <= model.max_steps and int(steps * strength) < 1:
            too_small = f"too small for {steps} steps: steps x strength must be at least 1"
            bad.append(FieldViolation("strength", too_small))
    check(
        0 <= spec.preview_every <= model.max_steps,
        "preview_every",
        f"must be between 0 (no previews) and {model.max_steps}",
    )
    if bad:
        raise InvalidArgument(bad)
    controlnet = spec.controlnet and replace(
        spec.controlnet, weight=round(spec.controlnet.weight, 4)
    )
    return replace(
        spec,
        controlnet=controlnet,
        model=model.id,
        width=width,
        height=height,
        num_variants=variants,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        strength=strength,
    )


def structured_from_text(spec: Spec, model: ModelSpec) -> Spec:
    """A text prompt for a FIBO model as the minimal structured prompt, with a notice."""
    notice = (
        f"prompt: model {model.id} reads FIBO structured prompts; the text prompt became"
        " fibo_json.short_description"
    )
    return replace(
        spec,
        prompt="",
        fibo_json={"short_description": spec.prompt.strip()},
        notices=(*spec.notices, notice),
    )


def _listing(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _valid_key(key: str) -> bool:
    # fullmatch: the pattern's `$` would also match before a trailing newline.
    return bool(KEY_PATTERN.fullmatch(key)) and ".." not in key
