"""What the SDK takes and returns: plain, typed dataclasses, the same over HTTP and gRPC.

Field names follow the HTTP API's (`prompt`, `width`, `num_variants`, `controlnet.mask`), which
are also the names error field paths use.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any, TypedDict, TypeVar

E = TypeVar("E", bound=enum.StrEnum)


class JobStatus(enum.StrEnum):
    """Where a job is; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class CacheMode(enum.StrEnum):
    """How a job uses the prompt cache: `use` answers from it and stores what it renders (the
    server's default), `refresh` renders and replaces, `off` neither reads nor writes."""

    USE = "use"
    REFRESH = "refresh"
    OFF = "off"


class Priority(enum.StrEnum):
    """A job's lane within its tenant's fair share."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


@dataclass(frozen=True)
class GuidanceImage:
    """An uploaded image (its key from `upload`) that guides generation: `role` is
    "reference" (img2img's start, and ControlNet's source), "style" or "texture"."""

    key: str
    role: str = "reference"


@dataclass(frozen=True)
class ControlNet:
    """ControlNet conditioning ("canny", "depth", ...) made from the reference image."""

    name: str
    weight: float = 1.0
    mask: str = ""


@dataclass(frozen=True)
class Webhook:
    """Where the job's end is announced; `events` among "job.completed", "job.failed",
    "job.cancelled" (empty: all three)."""

    url: str
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """Everything that decides the pixels. Zero and None mean the model's default (a random
    seed, recorded on the job, when `seed` is None)."""

    prompt: str = ""
    fibo_json: Mapping[str, Any] | None = None
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
    strength: float | None = None
    preview_every: int = 0


class SpecFields(TypedDict, total=False):
    """`Spec`'s fields as keyword arguments."""

    prompt: str
    fibo_json: Mapping[str, Any] | None
    negative_prompt: str
    model: str
    seed: int | None
    width: int
    height: int
    num_variants: int
    steps: int
    guidance_scale: float | None
    guidance_images: Sequence[GuidanceImage]
    controlnet: ControlNet | None
    strength: float | None
    preview_every: int


class SubmitFields(SpecFields, total=False):
    """`submit`'s keyword arguments: the spec's fields and how to run the job."""

    cache: CacheMode | str | None
    seed_agnostic_cache: bool
    priority: Priority | str | None
    max_cost_cents: int | None
    webhook: Webhook | str | None
    idempotency_key: str | None


@dataclass(frozen=True)
class Options:
    """How to run a job (what `submit` takes besides the spec)."""

    cache: CacheMode | None = None
    seed_agnostic_cache: bool = False
    priority: Priority | None = None
    max_cost_cents: int | None = None
    webhook: Webhook | None = None


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options)) | {"idempotency_key"}


def make_spec(spec: str | Spec | None, fields: Mapping[str, Any]) -> Spec:
    """A Spec from a prompt or a Spec, with `fields` (SpecFields) replacing its fields."""
    base = Spec(prompt=spec) if isinstance(spec, str) else (spec or Spec())
    values = {k: v for k, v in fields.items() if k not in _OPTION_NAMES}
    if "guidance_images" in values:
        values["guidance_images"] = tuple(values["guidance_images"])
    return dataclasses.replace(base, **values)


def make_options(fields: Mapping[str, Any]) -> Options:
    webhook = fields.get("webhook")
    return Options(
        cache=_choice(CacheMode, "cache", fields.get("cache")),
        seed_agnostic_cache=bool(fields.get("seed_agnostic_cache", False)),
        priority=_choice(Priority, "priority", fields.get("priority")),
        max_cost_cents=fields.get("max_cost_cents"),
        webhook=Webhook(webhook) if isinstance(webhook, str) else webhook,
    )


def _choice(kind: type[E], field: str, value: Any) -> E | None:
    """`value` as a member of the enum `kind`; InvalidArgument naming `field` otherwise."""
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        from imagegen.errors import FieldViolation, InvalidArgument

        allowed = ", ".join(m.value for m in kind)
        raise InvalidArgument(
            f"invalid request: {field}: one of {allowed}",
            [FieldViolation(field, f"one of {allowed}")],
        ) from None


@dataclass(frozen=True)
class Scores:
    """An image's scores: CLIP score against the prompt (higher is closer), LPIPS distance to
    the job's other variants and to the reference image; `*_calibrated` is false for the tiny
    seeded-random scoring models, whose numbers only test the plumbing."""

    clip_score: float | None = None
    lpips_diversity: float | None = None
    lpips_to_reference: float | None = None
    clip_model: str = ""
    clip_calibrated: bool = False
    lpips_model: str = ""
    lpips_calibrated: bool = False


@dataclass(frozen=True)
class Variant:
    """One generated image. `url` is an expiring signed URL: `save` and `read` fetch it with a
    plain GET and check the bytes against `sha256` (`Client.download` also renews an expired
    URL)."""

    job_id: str
    index: int
    key: str
    url: str
    sha256: str
    width: int
    height: int
    seed: int
    id: str = ""
    is_primary: bool = False
    scores: Scores | None = None

    def read(self, timeout: float = 60.0) -> bytes:
        """The PNG's bytes (blocking)."""
        import httpx

        from imagegen.errors import NotFound

        if not self.url:
            raise NotFound(f"variant {self.index} has no URL: use Client.download")
        response = httpx.get(self.url, timeout=timeout, follow_redirects=True)
        if response.status_code != 200:
            from imagegen.http_transport import error_from_response

            raise error_from_response(response)
        return check_digest(self, response.content)

    def save(self, path: str | PathLike[str], timeout: float = 60.0) -> Path:
        """Writes the PNG to `path` (a folder, existing or ending in "/": `<job id>-<index>.png`
        in it) and returns the file's path."""
        return write_png(self, self.read(timeout), path)


def check_digest(variant: Variant, data: bytes) -> bytes:
    from imagegen.errors import IntegrityError

    if variant.sha256 and hashlib.sha256(data).hexdigest() != variant.sha256:
        raise IntegrityError(f"variant {variant.index}: the bytes do not match its SHA-256")
    return data


def write_png(variant: Variant, data: bytes, path: str | PathLike[str]) -> Path:
    target = Path(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):  # a folder, made if new
        target = target / f"{variant.job_id}-{variant.index}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


@dataclass(frozen=True)
class Withheld:
    """A variant the image safety check kept back (never stored or returned)."""

    index: int
    category: str


@dataclass(frozen=True)
class Estimate:
    """A price in cents and how it is made: (base x steps_factor + controlnet + guidance) x
    model_multiplier, rounded up, at least 1."""

    total_cents: int
    base_cents: float = 0.0
    steps_factor: float = 1.0
    controlnet_cents: float = 0.0
    guidance_cents: float = 0.0
    model_multiplier: float = 1.0


@dataclass(frozen=True)
class Job:
    """A job as the server last described it. `spec` is the request with the server's defaults
    and seed filled in; `estimate` and `idempotent_replay` come only from `submit`."""

    id: str
    status: JobStatus
    stage: str = ""
    progress_percent: float = 0.0
    spec: Spec = Spec()
    cost_cents: int = 0
    cache_hit: bool = False
    variants: tuple[Variant, ...] = ()
    withheld: tuple[Withheld, ...] = ()
    error: str = ""
    retryable: bool = False
    attempts: int = 0
    engine_version: str = ""  # the code that rendered the pixels
    evaluator_models: tuple[str, ...] = ()  # the models behind the scores
    notices: tuple[str, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    estimate: Estimate | None = None
    idempotent_replay: bool = False

    @property
    def seed(self) -> int | None:
        return self.spec.seed

    @property
    def done(self) -> bool:
        return self.status.final

    @property
    def primary(self) -> Variant | None:
        return next((v for v in self.variants if v.is_primary), None)


@dataclass(frozen=True)
class CacheHit:
    """A cached result for a request: the job that made it and its images."""

    job_id: str
    seed: int
    hit_count: int
    expires_at: datetime | None
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Model:
    """A served model, its defaults and limits, and what it can honour."""

    id: str
    family: str
    version: str
    is_default: bool
    default_steps: int
    default_width: int
    default_height: int
    default_guidance: float
    min_size: int
    max_size: int
    size_multiple: int
    max_steps: int
    max_variants: int
    price_multiplier: float
    guidance_roles: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()


# Events of a job's stream, in the order the server appends them. `id` resumes a stream.


@dataclass(frozen=True)
class Event:
    id: str
    job_id: str


@dataclass(frozen=True)
class Status(Event):
    """The job's status or stage changed (`loading_model`, `denoising`, `evaluating`...)."""

    status: JobStatus
    stage: str


@dataclass(frozen=True)
class Progress(Event):
    """A denoising step of variant `variant` is done: `step` of `total`; `percent` is the
    job's overall progress and `eta_ms` the server's estimate of the time left."""

    variant: int
    step: int
    total: int
    percent: float
    eta_ms: int


@dataclass(frozen=True)
class Preview(Event):
    """A small picture of a variant part-way through (when the job asked for previews)."""

    variant: int
    step: int
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class Artifact(Event):
    """A variant's image is stored."""

    variant: Variant
    render_ms: float = 0.0
    encode_ms: float = 0.0
    store_ms: float = 0.0


@dataclass(frozen=True)
class Evaluation(Event):
    """The job's images are scored (primary first)."""

    variants: tuple[Variant, ...]
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Error(Event):
    """An attempt failed; `retrying` says whether the job goes back on the queue. A `Final`
    follows when it does not."""

    message: str
    retrying: bool = False


@dataclass(frozen=True)
class Final(Event):
    """The job ended; the last event of every stream."""

    job: Job


def to_json(value: Any) -> Any:
    """`value` (dataclasses, enums, datetimes, bytes, in lists and dicts) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Event):
            data = {"type": type(value).__name__.lower(), **data}
        return data
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value
