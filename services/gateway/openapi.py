"""The HTTP facade's OpenAPI 3.1 document, served at /openapi.json.

Generated, not written: request bodies from the pydantic models the handlers validate with
(services/gateway/contract.py), response bodies from the TypedDicts the handlers render into
(services/gateway/http_json.py), FIBO prompts from the table services/common/fibo.py checks them
against, and the limits that depend on the model from the served registry (the one `resolve`
checks against). What the schema cannot say is in each field's `description` and
`x-server-rules`: a request may meet the schema and still be refused for one of those, with a
422 naming the field. Every status a route can answer is listed.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from services.common.events import MAX_EVENT_ID_PART
from services.common.fibo import FIBO_SCHEMA, Node
from services.common.models import ModelSpec
from services.common.spec import MAX_FIBO_BYTES, MAX_FIBO_DEPTH, MAX_FIBO_NUMBER
from services.gateway import contract, http_json
from services.gateway.admin import EARLIEST, LATEST
from services.gateway.contract import KEYS, NAME, TEXT, rules
from services.gateway.http_input import (
    MAX_EVALUATE_JSON_BYTES,
    MAX_INT_DIGITS,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    MAX_QUERY_CHARS,
    REQUEST_ID_PATTERN,
)
from services.jobs.records import JobStatus

SCHEMAS = "#/components/schemas/"
# The request bodies and response bodies the document names (with what they refer to).
_REQUESTS = (
    contract.GenerateRequest,
    contract.EstimateRequest,
    contract.CacheLookupRequest,
    contract.PresignUploadRequest,
    contract.EvaluateRequest,
)
_RESPONSES: tuple[Any, ...] = (
    http_json.AdmissionJson,
    http_json.JobJson,
    http_json.JobListJson,
    http_json.EstimateJson,
    http_json.CacheHitJson,
    http_json.CacheMissJson,
    http_json.ModelsJson,
    http_json.PresignedUploadJson,
    http_json.UploadedJson,
    http_json.EvaluationJson,
    http_json.SafetyJson,
    http_json.QueueJson,
    http_json.StatsJson,
    http_json.HealthJson,
    http_json.ErrorJson,
    *http_json.EVENT_SCHEMAS.values(),
)
UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def digits_at_most(bound: int) -> str:
    """A regex (no anchors) of the decimal numbers 0..`bound`, leading zeros allowed up to
    `bound`'s digit count: what `int()` of a string of at most that many ASCII digits reads as
    at most `bound`."""
    text = str(bound)
    choices = [f"[0-9]{{1,{len(text) - 1}}}"] if len(text) > 1 else []
    for i, digit in enumerate(text):
        if digit != "0":
            rest = len(text) - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            below = "0" if digit == "1" else f"[0-{int(digit) - 1}]"
            choices.append(text[:i] + below + tail)
    choices.append(text)
    return "(" + "|".join(choices) + ")"


_PART = digits_at_most(MAX_EVENT_ID_PART)
EVENT_ID = f"^({_PART}-{_PART})?$"


# Schemas


def _schemas() -> dict[str, Any]:
    adapters: list[tuple[Any, JsonSchemaMode, TypeAdapter[Any]]] = [
        (t, "validation", TypeAdapter(t)) for t in _REQUESTS
    ]
    adapters += [(t, "serialization", TypeAdapter(t)) for t in _RESPONSES]
    tops, defs = TypeAdapter.json_schemas(adapters, ref_template=SCHEMAS + "{model}")
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (kind, _), schema in tops.items():
        if "$ref" not in schema:
            schemas[kind.__name__] = schema
    return schemas


def _renamed(value: Any, names: Mapping[str, str], fields: bool = False) -> Any:
    """A schema with component names replaced (in `$ref`s too) and pydantic's titles dropped;
    `fields`: `value` maps field names to schemas (a `properties`)."""
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "title" and not fields:
            continue
        if key == "$ref" and isinstance(item, str) and item.startswith(SCHEMAS):
            item = SCHEMAS + names.get(item[len(SCHEMAS) :], item[len(SCHEMAS) :])
        out[key] = item if key == "examples" else _renamed(item, names, key == "properties")
    return out


def _public_name(name: str) -> str:
    for suffix in ("Json", "Body"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)]
    return name


def json_value(name: str, strings: str, number_bound: int | None, description: str) -> Any:
    """A free-form JSON value whose strings match `strings`, keys `KEYS` and numbers (when
    bounded) lie within ±`number_bound`; recursive through the component `name`."""
    number: dict[str, Any] = {"type": "number"}
    if number_bound is not None:
        number.update(minimum=-number_bound, maximum=number_bound)
    ref = {"$ref": SCHEMAS + name}
    return {
        "description": description,
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            number,
            {"type": "string", "pattern": strings},
            {"type": "array", "items": ref},
            {"type": "object", "propertyNames": KEYS, "additionalProperties": ref},
        ],
    }


def fibo_schema(node: Node) -> Any:
    """The JSON Schema of a FIBO prompt node (services.common.fibo's table): known fields
    typed, every field optional and nullable, unknown fields any FiboValue."""
    if isinstance(node, Mapping):
        return {
            "type": "object",
            "properties": {k: _nullable(fibo_schema(v)) for k, v in node.items()},
            "propertyNames": KEYS,
            "additionalProperties": {"$ref": SCHEMAS + "FiboValue"},
        }
    if isinstance(node, list):
        return {"type": "array", "items": _nullable(fibo_schema(node[0]))}
    if node is int:
        bound = MAX_FIBO_NUMBER
        return {"type": "integer", "minimum": -bound, "maximum": bound}
    return {"type": "string", "pattern": TEXT}


def _nullable(schema: Any) -> Any:
    return {"anyOf": [schema, {"type": "null"}]}


def _registry_rules(models: Sequence[ModelSpec], default: str) -> dict[str, Any]:
    """The spec fields whose limits depend on the model: their schema is the widest any served
    model allows; each model's own limits are in the description and x-server-rules."""
    sizes = "; ".join(
        f"{m.id}: {m.min_size}..{m.max_size}, a multiple of {m.size_multiple}"
        f" (default {m.default_width}x{m.default_height})"
        for m in models
    )
    multiple = reduce(math.gcd, (m.size_multiple for m in models))
    size = {
        "anyOf": [
            {
                "type": "integer",
                "minimum": min(m.min_size for m in models),
                "maximum": max(m.max_size for m in models),
                "multipleOf": multiple,
            },
            {"const": 0},
            {"type": "null"},
        ],
        "description": f"pixels; 0 or absent: the model's default. Per model: {sizes}",
        "examples": [256],
        **rules("within the model's min_size..max_size and a multiple of its size_multiple"),
    }
    max_steps = max(m.max_steps for m in models)
    steps_listed = ", ".join(f"{m.id} 1..{m.max_steps} (default {m.default_steps})" for m in models)
    variants_listed = ", ".join(f"{m.id} 1..{m.max_variants}" for m in models)

    def counted(maximum: int, description: str, rule: str, example: int) -> Any:
        return {
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": maximum}, {"type": "null"}],
            "description": description,
            "examples": [example],
            **rules(rule),
        }

    roles = ", ".join(f"{m.id}: {', '.join(m.guidance_roles) or 'none'}" for m in models)
    nets = ", ".join(f"{m.id}: {', '.join(sorted(m.controlnets)) or 'none'}" for m in models)
    return {
        "model": {
            "anyOf": [{"type": "string", "enum": ["", *(m.id for m in models)]}, {"type": "null"}],
            "description": f"a served model (GET /api/models); empty or absent: {default}."
            f" Guidance roles per model: {roles}. ControlNets per model: {nets}",
            "examples": [default],
        },
        "width": size,
        "height": size,
        "steps": counted(
            max(m.max_steps for m in models),
            f"denoising steps; 0 or absent: the model's default. Per model: {steps_listed}",
            "at most the model's max_steps",
            20,
        ),
        "num_variants": counted(
            max(m.max_variants for m in models),
            f"images to render (seeds seed, seed+1, ...); 0 or absent: 1. Per model:"
            f" {variants_listed}",
            "at most the model's max_variants",
            2,
        ),
        "preview_every": counted(
            max_steps,
            "a `preview` SSE event (a small PNG data URL of the latents, SD family) every that"
            " many steps; 0 or absent: none",
            "at most the model's max_steps",
            0,
        ),
    }


def components(models: Sequence[ModelSpec], default: str) -> dict[str, Any]:
    generated = _schemas()
    names = {name: _public_name(name) for name in generated}
    shared = sorted(n for n, count in Counter(names.values()).items() if count > 1)
    if shared:  # one schema would replace the other, silently
        raise ValueError(f"two schemas would share a component name: {shared}")
    schemas = {names[k]: _renamed(copy.deepcopy(v), names) for k, v in generated.items()}
    by_model = _registry_rules(models, default)
    for request in ("GenerateRequest", "EstimateRequest", "CacheLookupRequest"):
        properties = schemas[request]["properties"]
        for field, schema in by_model.items():
            properties[field] = copy.deepcopy(schema)
    schemas["JsonValue"] = json_value(
        "JsonValue",
        NAME,
        None,
        "any JSON value (what an unknown field may hold: it is ignored); strings without"
        " control characters",
    )
    schemas["JsonValue"].update(
        rules(
            f"an integer written with more than {MAX_INT_DIGITS} digits is refused",
            f"a body nests at most {MAX_JSON_DEPTH} levels and holds at most"
            f" {MAX_JSON_VALUES} values",
        )
    )
    schemas["FiboValue"] = json_value(
        "FiboValue",
        TEXT,
        MAX_FIBO_NUMBER,
        "a value of a FIBO prompt field the schema does not list (it reaches the model as it is)",
    )
    fibo = fibo_schema(FIBO_SCHEMA)
    fibo.update(
        description="a FIBO structured prompt: known fields are typed, every field is optional"
        " and may be null, unknown fields reach the model as they are. Minimal:"
        ' {"short_description": "a red fox"}',
        minProperties=1,
        **rules(
            f"at most {MAX_FIBO_DEPTH} levels deep and {MAX_FIBO_BYTES} bytes as compact JSON",
            "some field is not null",
            "the content policy checks every string and key (a 422 with policy_violation)",
        ),
    )
    schemas["FiboPrompt"] = fibo
    return schemas


# Paths


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": SCHEMAS + name}}}


_REQUEST_ID_HEADER = {
    "X-Request-Id": {
        "description": "the request's id: the client's X-Request-Id when it sent a sane one",
        "required": True,
        "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}


def _answer(
    description: str, content: dict[str, Any] | None = None, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "headers": {**_REQUEST_ID_HEADER, **(headers or {})},
    }
    if content is not None:
        answer["content"] = content
    return answer


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _answer(description, _json("Error"), headers)


ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("the Host header names a host this server does not answer to"),
    "401": _error(
        "no API key, or one that is malformed, unknown or revoked",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    "403": _error("the key lacks the route's scope, or a cross-site Origin"),
    "404": _error("unknown (another tenant's is unknown too)"),
    "409": _error("the request conflicts with an earlier one"),
    "413": _error(
        f"the body is over its limit ({MAX_JSON_BYTES} bytes for JSON), refused before it is read"
    ),
    "422": _error(
        "a bad field: every one is named by its JSON path in field_violations (a refused prompt"
        " also carries policy_violation {category, field})"
    ),
    "429": _error(
        "a limit: the key's rate (with RateLimit-Policy and RateLimit headers) or concurrent"
        " jobs, or the tenant's budget; quota_violation.subject names which",
        {
            **_RETRY_AFTER,
            "RateLimit-Policy": {"schema": {"type": "string"}},
            "RateLimit": {"schema": {"type": "string"}},
        },
    ),
    "503": _error("a store or service is unavailable; retry after Retry-After", _RETRY_AFTER),
}


def _errors(*codes: str, **described: str) -> dict[str, Any]:
    out = {code: ERRORS[code] for code in codes}
    for code, description in described.items():
        out[code.removeprefix("s")] = {**ERRORS[code.removeprefix("s")], "description": description}
    return out


_KEYED = ("400", "401", "403", "503")
_BODY = ("413", "422")


def _header_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
        **extra,
    }


_X_REQUEST_ID = _header_param(
    "X-Request-Id",
    {"type": "string"},
    "an id for this request, echoed in the X-Request-Id response header and in logs when it"
    f" matches {REQUEST_ID_PATTERN}; otherwise the server makes one",
)
_RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "description": "a job id (run_id of a job): a lowercase hyphenated UUID; another spelling"
    " is refused with 422 naming job_id",
    "schema": {"type": "string", "format": "uuid", "pattern": UUID},
}
# A time, or empty for the default.
_TIME = {"anyOf": [{"type": "string", "format": "date-time", "maxLength": 64}, {"const": ""}]}
_TIME_RULES = (
    f"between {EARLIEST.isoformat()} and {LATEST.isoformat()}",
    "at most 9 digits of fractions of a second",
)
_TEXT_QUERY = {"type": "string", "maxLength": MAX_QUERY_CHARS, "pattern": NAME}


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    parameters: Iterable[dict[str, Any]] = (),
    body: str | None = None,
    security: list[dict[str, list[str]]] | None = None,
    description: str = "",
    body_bytes: int = MAX_JSON_BYTES,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": [*parameters, _X_REQUEST_ID],
        "responses": responses,
    }
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": _json(body),
            "description": "a JSON object",
            **rules(
                f"at most {body_bytes} bytes (a 413 before it is read)",
                f"nested at most {MAX_JSON_DEPTH} levels, at most {MAX_JSON_VALUES} values",
                f"integers written with at most {MAX_INT_DIGITS} digits",
            ),
        }
    if security is not None:
        op["security"] = security
    return op


def sse_event_schema() -> dict[str, Any]:
    """One event of the job stream, as an SSE parser reads it: `data` is JSON whose schema
    depends on `event` (contentSchema)."""
    kinds = []
    for name, shape in http_json.EVENT_SCHEMAS.items():
        data = {
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": SCHEMAS + _public_name(shape.__name__)},
        }
        kinds.append({"properties": {"event": {"const": name}, "data": data}})
    return {
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": EVENT_ID},
            "event": {"enum": list(http_json.EVENT_SCHEMAS)},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
        "oneOf": kinds,
    }


def _paths() -> dict[str, Any]:
    job = _answer("the job", _json("Job"))
    links = {
        "GetJob": {"operationId": "getJob", "parameters": {"run_id": "$response.body#/run_id"}},
        "StreamJob": {
            "operationId": "streamJob",
            "parameters": {"run_id": "$response.body#/run_id"},
        },
        "CancelJob": {
            "operationId": "cancelJob",
            "parameters": {"run_id": "$response.body#/run_id"},
        },
    }
    admission = _json("Admission")
    event = sse_event_schema()
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/api/generate/text-to-image": {
            "post": _operation(
                "createJob",
                "Create a generation job, or answer it from the prompt cache",
                "jobs",
                {
                    "201": {
                        **_answer(
                            "a new job: queued, or completed from the cache at cost 0", admission
                        ),
                        "links": links,
                    },
                    "200": {
                        **_answer(
                            "the job an earlier request with the same Idempotency-Key"
                            " and body created (idempotent_replay: true)",
                            admission,
                        ),
                        "links": links,
                    },
                    **_errors(
                        *_KEYED,
                        *_BODY,
                        "429",
                        s409="the Idempotency-Key was used for"
                        " another request within IDEMPOTENCY_TTL_SECONDS",
                    ),
                },
                body="GenerateRequest",
                parameters=[
                    _header_param(
                        "Idempotency-Key",
                        {"type": "string", "maxLength": 200, "pattern": NAME},
                        "a retry with the same key and body returns the first job for"
                        " IDEMPOTENCY_TTL_SECONDS (default a day); another body gets 409;"
                        " empty: none",
                    )
                ],
                description="Checked in this order, each step naming every bad field: the body"
                " (size, JSON), the schema's types, the schema's other rules, then the rules"
                " that depend on the model and on stored state (x-server-rules), the content"
                " policy, the uploads, max_cost_cents, and the key's limits.",
            )
        },
        "/api/status/{run_id}": {
            "get": _operation(
                "getJob",
                "Read a job",
                "jobs",
                {"200": job, **_errors(*_KEYED, "404", "422")},
                parameters=[_RUN_ID],
            )
        },
        "/api/status/stream/{run_id}": {
            "get": _operation(
                "streamJob",
                "Follow a job: server-sent events to its final event",
                "jobs",
                {
                    "200": _answer(
                        "server-sent events, each described by the schema (as Open API 3.2's"
                        " itemSchema would): `id:` the event id (resume after it with"
                        " Last-Event-ID), `event:` its kind, `data:` its JSON; the stream ends"
                        " after `final`. A quiet while (5 s) sends the comment `: keep-alive`",
                        {"text/event-stream": {"schema": event}},
                    ),
                    "204": _answer("resumed after the final event: nothing more will come"),
                    **_errors(*_KEYED, "404", "422"),
                },
                parameters=[
                    _RUN_ID,
                    _header_param(
                        "Last-Event-ID",
                        {"type": "string", "pattern": EVENT_ID},
                        "resume after this event id (what EventSource sends on reconnecting);"
                        " empty: use `after`",
                    ),
                    _query(
                        "after",
                        {"type": "string", "pattern": EVENT_ID},
                        "resume after this event id when Last-Event-ID is not sent; empty:"
                        " from the start",
                    ),
                ],
            )
        },
        "/api/jobs": {
            "get": _operation(
                "listJobs",
                "List the tenant's jobs, newest first",
                "jobs",
                {
                    "200": _answer("a page of jobs, newest first", _json("JobList")),
                    **_errors(*_KEYED, "422"),
                },
                parameters=[
                    _query(
                        "page_size",
                        {"type": "integer", "minimum": 0, "maximum": 100},
                        "jobs per page; 0 or absent: 20",
                    ),
                    _query(
                        "page_token",
                        _TEXT_QUERY,
                        "next_page_token of the page before; empty or absent: the first",
                        **rules("must be a next_page_token this service handed out"),
                    ),
                    _query(
                        "status",
                        {"type": "string", "enum": ["", *(s.value for s in JobStatus)]},
                        "only jobs in this status; empty or absent: all",
                    ),
                ],
            )
        },
        "/api/jobs/{run_id}/cancel": {
            "post": _operation(
                "cancelJob",
                "Cancel a job: a queued one at once, a running one at its next step",
                "jobs",
                {
                    "200": _answer(
                        "the job (a job that had already ended, as it is)", _json("Job")
                    ),
                    **_errors(*_KEYED, "404", "422"),
                },
                parameters=[_RUN_ID],
            )
        },
        "/api/cost/estimate": {
            "post": _operation(
                "estimateCost",
                "Price a request",
                "jobs",
                {
                    "200": _answer("the price and its breakdown", _json("Estimate")),
                    **_errors(*_KEYED, *_BODY),
                },
                body="EstimateRequest",
            )
        },
        "/api/cache/lookup": {
            "post": _operation(
                "lookupCache",
                "Look a request up in the tenant's prompt cache",
                "jobs",
                {
                    "200": _answer(
                        "a hit (with the cached images) or a miss",
                        {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": SCHEMAS + "CacheHit"},
                                        {"$ref": SCHEMAS + "CacheMiss"},
                                    ]
                                }
                            }
                        },
                    ),
                    **_errors(*_KEYED, *_BODY),
                },
                body="CacheLookupRequest",
            )
        },
        "/api/models": {
            "get": _operation(
                "listModels",
                "The served models: defaults, limits, what each can honour",
                "models",
                {"200": _answer("the models", _json("Models")), **_errors(*_KEYED)},
            )
        },
        "/api/uploads/presign": {
            "post": _operation(
                "presignUpload",
                "Presign the upload of a guidance image, bound to the tenant, type and size",
                "uploads",
                {
                    "200": _answer("how to send the bytes", _json("PresignedUpload")),
                    **_errors(*_KEYED, *_BODY, "429"),
                },
                body="PresignUploadRequest",
            )
        },
        "/api/evaluate": {
            "post": _operation(
                "evaluateImages",
                "Score images against a prompt: CLIP score each, LPIPS between them and to a"
                " reference",
                "evaluation",
                {
                    "200": _answer("the scores, and which models made them", _json("Evaluation")),
                    **_errors(
                        *_KEYED,
                        "422",
                        "429",
                        s413=f"the body is over {MAX_EVALUATE_JSON_BYTES} bytes, refused before"
                        " it is read",
                    ),
                },
                body="EvaluateRequest",
                body_bytes=MAX_EVALUATE_JSON_BYTES,
            )
        },
        "/api/admin/safety": {
            "get": _operation(
                "safetyCounts",
                "Refused prompts and withheld images per day, kind and category (admin)",
                "admin",
                {"200": _answer("the counts", _json("Safety")), **_errors(*_KEYED, "422")},
                parameters=[
                    _query(
                        "days",
                        {"type": "integer", "minimum": 0, "maximum": 366},
                        "days back from today; 0 or absent: 30",
                    )
                ],
            )
        },
        "/api/admin/queue": {
            "get": _operation(
                "queueDepth",
                "The job queue's depth (admin): what autoscalers read",
                "admin",
                {"200": _answer("the depth", _json("Queue")), **_errors(*_KEYED)},
            )
        },
        "/api/admin/stats": {
            "get": _operation(
                "adminStats",
                "The admin dashboard's data, from the jobs in Postgres (admin)",
                "admin",
                {
                    "200": _answer(
                        "jobs, cache, queue, cost, durations, models and refusals per"
                        " bucket and over the range",
                        _json("Stats"),
                    ),
                    **_errors(*_KEYED, "422"),
                },
                parameters=[
                    _query(
                        "from",
                        _TIME,
                        "RFC 3339 with an offset; empty or absent: an hour before `to`",
                        **rules(
                            "before `to`, and at most 366 days before it",
                            *_TIME_RULES,
                        ),
                    ),
                    _query(
                        "to",
                        _TIME,
                        "RFC 3339 with an offset, excluded; empty or absent: now",
                        **rules(*_TIME_RULES),
                    ),
                    _query(
                        "bucket",
                        {"type": "integer", "minimum": 1, "maximum": 9_999_999},
                        "bucket size in seconds; default: a round size giving at most 60",
                        **rules("at most 1000 buckets over the range"),
                    ),
                ],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                "meta",
                {
                    "200": _answer(
                        "the OpenAPI 3.1 document",
                        {"application/json": {"schema": {"type": "object"}}},
                    ),
                    **_errors(*_KEYED),
                },
            )
        },
        "/healthz": {
            "get": _operation(
                "health",
                "Liveness of the HTTP facade",
                "meta",
                {"200": _answer("alive", _json("Health")), **_errors("400", "403")},
                security=[],
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics (open: scrapers carry no key)",
                "meta",
                {
                    "200": _answer(
                        "the text exposition format", {"text/plain": {"schema": {"type": "string"}}}
                    ),
                    **_errors("400", "403"),
                },
                security=[],
            )
        },
        "/files/{key}": {
            "get": _operation(
                "getFile",
                "A stored image or upload: by its signed URL (no key), or with the owning"
                " tenant's key",
                "files",
                {
                    "200": _answer(
                        "the file",
                        {
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    ),
                    **_errors("400", "401", "403", "404", "503"),
                },
                parameters=[
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "description": "the object's key (it may hold slashes)",
                        "schema": {"type": "string"},
                    },
                    _query(
                        "expires",
                        {"type": "string"},
                        "with signature: the signed URL's expiry (unix seconds)",
                    ),
                    _query(
                        "signature",
                        {"type": "string"},
                        "the signed URL's signature; without expires and signature the"
                        " owning tenant's key is needed",
                    ),
                ],
                security=[{}, {"apiKey": []}],
            ),
            "put": _operation(
                "putFile",
                "The local store's presigned upload (its URL came from /api/uploads/presign)",
                "files",
                {
                    "201": _answer("stored", _json("Uploaded")),
                    **_errors("400", "403", "413", "422", "503"),
                },
                parameters=[
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "description": "the upload's key",
                        "schema": {"type": "string"},
                    },
                    *(
                        _query(name, {"type": "string"}, "as upload_url carries it", required=True)
                        for name in ("expires", "ct", "max", "signature")
                    ),
                ],
                security=[],
                description="The body must be the image the upload was presigned for (type,"
                " size and SHA-256); a URL whose parameters were changed, or that expired, is"
                " refused with 403.",
            )
            | {
                "requestBody": {
                    "required": True,
                    "content": {
                        kind: {"schema": {"type": "string", "format": "binary"}}
                        for kind in ("image/png", "image/jpeg", "image/webp")
                    },
                }
            },
        },
        "/": {
            "get": _operation(
                "page",
                "The web page (it asks for a key)",
                "pages",
                {"200": _answer("the page", html), **_errors("400", "403")},
                security=[],
            )
        },
        "/admin": {
            "get": _operation(
                "adminPage",
                "The admin dashboard (it asks for an admin key)",
                "pages",
                {"200": _answer("the page", html), **_errors("400", "403")},
                security=[],
            )
        },
        "/static/{path}": {
            "get": _operation(
                "staticFile",
                "The pages' scripts and styles, and the vendored Chart.js",
                "pages",
                {
                    "200": _answer(
                        "the file",
                        {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    ),
                    **_errors("400", "403", "404"),
                },
                parameters=[
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                security=[],
            )
        },
    }


def openapi_document(models: Sequence[ModelSpec], default: str) -> dict[str, Any]:
    """The document for a gateway serving `models` (the first default: `default`)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagegen",
            "version": "1",
            "description": "Text-to-image generation: jobs, their events, the prompt cache,"
            " uploads and evaluation. Every request carries Authorization: Bearer <key> but"
            " the pages, /healthz, /metrics and signed file URLs. Errors are one JSON shape"
            " (Error), every response carries X-Request-Id. A field's x-server-rules list what"
            " the server checks beyond its schema.",
        },
        "security": [{"apiKey": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key (`python -m services.gateway keys create`)",
                }
            },
            "schemas": components(models, default),
        },
    }
