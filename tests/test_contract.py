"""The HTTP API against its own OpenAPI document (/openapi.json): a schema fuzzer (schemathesis)
generates requests from the document and checks every answer against it.

The gateway is a real one (cache, evaluator and gateway in this process, real Postgres and
Redis; no generator, so the jobs it admits stay queued and cost nothing to run), called over
real HTTP with the mesh's key, which has every scope. For every operation the fuzzer sends
requests the document says are valid (positive) and requests it says are not (negative), and
checks that no answer is a server error, every status, content type and body is one the
document gives for the route, every invalid request is refused, and every valid one is accepted
unless it was refused for a rule the document names in `x-server-rules` (a 422 naming such a
field) or by the content policy. Generation is derandomized (hypothesis), seeded (`random`, per
operation) and takes no feedback from earlier answers: reruns send the same requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import Case, CheckContext, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.feedback import NO_FEEDBACK
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema
from starlette.routing import Route

from services.gateway.http_api import build_app
from services.gateway.http_json import EVENT_SCHEMAS
from tests.conftest import Mesh, ServiceEnv, start_in_process

WAIT = 30.0
MIN_REQUESTS = 1000
# Generation uses no feedback: by default schemathesis also draws on constants it finds in the
# modules this process has imported, so what it generates would depend on the other tests run.
# Examples per operation and mode (valid, invalid): the routes with a body more (createJob most:
# it is the admission path), the SSE route fewer (it streams: valid requests for jobs that do not
# exist are 404s, and one for a job still queued would follow it for as long as it waits), the
# pages, /metrics, /healthz and /openapi.json a few (they take nothing to vary). The routes of a
# job also get REAL_JOB_EXAMPLES valid requests for a real job, cancelled so that it has ended.
DEFAULT_EXAMPLES = (40, 25)
REAL_JOB_EXAMPLES = 15
EXAMPLES = {
    "createJob": (140, 50),
    "estimateCost": (80, 30),
    "lookupCache": (60, 25),
    "evaluateImages": (40, 25),
    "presignUpload": (40, 25),
    "adminStats": (60, 25),
    "listJobs": (50, 25),
    "streamJob": (25, 15),
    "page": (5, 3),
    "adminPage": (5, 3),
    "staticFile": (15, 10),
    "metrics": (5, 3),
    "openapi": (5, 3),
    "health": (5, 3),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def document(mesh: Mesh) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        response = await http.get("/openapi.json", headers=mesh.auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served: dict[str, Any] = response.json()
    return served


async def test_the_served_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_of_the_app_is_in_the_document(document: dict[str, Any]) -> None:
    # The app the gateway serves; building it calls nothing of what it is given.
    app = build_app(cast(Any, None), cast(Any, None), [], [], cast(Any, None))
    served = {
        (method, re.sub(r"\{(\w+):path\}", r"{\1}", route.path))
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert documented == served


# The fuzzer


def path_steps(field: str) -> list[str | int]:
    """`guidance_images[1].role` as ["guidance_images", 1, "role"]."""
    steps: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", field):
        steps.append(int(index) if index else name)
    return steps


class Document:
    """Finds what the document says about a field of a request."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def resolve(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = self.raw["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def rules_on_path(self, root: Any, steps: list[str | int]) -> bool:
        """Whether the schema node at `steps` from `root` has x-server-rules."""
        nodes = [self.resolve(root)]
        for step in steps:
            found = []
            for node in nodes:
                for option in [node, *node.get("anyOf", []), *node.get("oneOf", [])]:
                    option = self.resolve(option)
                    if isinstance(step, int) and "items" in option:
                        found.append(self.resolve(option["items"]))
                    elif isinstance(step, str):
                        child = option.get("properties", {}).get(step)
                        if child is None and isinstance(option.get("additionalProperties"), dict):
                            child = option["additionalProperties"]
                        if child is not None:
                            found.append(self.resolve(child))
            nodes = found
        return self.has_rules(nodes)

    def has_rules(self, nodes: list[Any]) -> bool:
        options = [self.resolve(o) for n in nodes for o in [n, *n.get("anyOf", [])]]
        return any("x-server-rules" in o for o in options)

    def documents_refusal(self, case: Case, field: str) -> bool:
        operation = case.operation.definition.raw
        for parameter in operation.get("parameters", []):
            if parameter["name"] == field and "x-server-rules" in parameter:
                return True
        body = operation.get("requestBody", {})
        if field == "body":
            return "x-server-rules" in body
        content = body.get("content", {}).get("application/json")
        return content is not None and self.rules_on_path(content["schema"], path_steps(field))


def documented_refusal(
    document: Document, refused: Counter[str]
) -> Callable[[CheckContext, Any, Case], bool | None]:
    """positive_data_acceptance, except for a 422 whose every field has rules the document
    names (x-server-rules) and a refusal by the content policy; counts those in `refused`."""

    def check(ctx: CheckContext, response: Any, case: Case) -> bool | None:
        if response.status_code == 422:
            error = response.json()["error"]
            fields = [v["field"] for v in error.get("field_violations", [])]
            if "policy_violation" in error:
                refused["content policy"] += 1
                return True
            if fields and all(document.documents_refusal(case, f) for f in fields):
                refused.update(re.sub(r"\[\d+\]", "[i]", f) for f in fields)
                return True
        return positive_data_acceptance(ctx, response, case)

    return check


def load(raw: dict[str, Any]) -> OpenApiSchema:
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                # A valid request may be refused only as not allowed (a file URL's bad
                # signature), unknown, conflicting or over a limit; 422s: documented_refusal.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "429"]
                },
            },
            # The key is sent with every request (below): no requests without it or with a
            # bad one, which would test the key rather than the document.
            "generation": {"deterministic": True, "with-security-parameters": False},
        }
    )
    return schemathesis.openapi.from_dict(raw, config=config)


async def test_the_document_fuzzed_finds_no_server_error_and_no_answer_outside_it(
    mesh: Mesh, document: dict[str, Any]
) -> None:
    schema = load(document)
    schema.config.update(base_url=mesh.http_url)
    described = Document(document)
    seen: Counter[tuple[str, str, int]] = Counter()
    failures: list[str] = []
    unsatisfiable: list[str] = []
    refused: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    session = requests.Session()
    common = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
    ]
    checks = {
        GenerationMode.POSITIVE: [*common, documented_refusal(described, refused)],
        GenerationMode.NEGATIVE: [*common, negative_data_rejection],
    }

    def fuzz(
        operation: Any, mode: GenerationMode, examples: int, strategy: Any = None, tag: str = ""
    ) -> None:
        name = operation.definition.raw["operationId"] + tag
        if strategy is None:
            strategy = operation.as_strategy(generation_mode=mode, feedback=NO_FEEDBACK)

        @settings(
            max_examples=examples,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Case) -> None:
            try:
                response = case.call(session=session, headers=mesh.auth, timeout=WAIT)
            except requests.RequestException as error:
                failures.append(f"{name} {mode.value}: no answer: {error}")
                return
            seen[name, mode.value, response.status_code] += 1
            try:
                case.validate_response(response, checks=checks[mode])
            except FailureGroup as group:
                failures.append(f"{name} {mode.value}: {group.message}")
            except Failure as failure:
                failures.append(f"{name} {mode.value}: {failure}")

        began = time.monotonic()
        # schemathesis also draws from the global `random`, which other code uses too.
        random.seed(f"{name} {mode.value}")
        try:
            run()
            spent[f"{name} {mode.value}"] += time.monotonic() - began
        except Unsatisfiable:  # nothing in the operation can be invalid (GET / takes nothing)
            assert mode is GenerationMode.NEGATIVE, name
            unsatisfiable.append(name)

    def fuzz_all() -> None:
        for result in schema.get_all_operations():
            operation = result.ok()
            name = operation.definition.raw["operationId"]
            positive, negative = EXAMPLES.get(name, DEFAULT_EXAMPLES)
            # The document's own examples first (a few cases each), then generated ones.
            for strategy in schema.get_strategies_from_examples(operation):
                fuzz(operation, GenerationMode.POSITIVE, 5, strategy, " (examples)")
            fuzz(operation, GenerationMode.POSITIVE, positive)
            fuzz(operation, GenerationMode.NEGATIVE, negative)
            if "{run_id}" in operation.path:
                known = operation.as_strategy(
                    path_parameters={"run_id": run_id}, feedback=NO_FEEDBACK
                )
                fuzz(operation, GenerationMode.POSITIVE, REAL_JOB_EXAMPLES, known, " (a real job)")

    # A job of the tenant's own, ended (cancelled), so that reading, cancelling and following
    # it answer 200 (its stream replays its events and ends).
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        body = {"prompt": "a kite over a beach", "width": 64, "height": 64, "steps": 4}
        run_id = (await http.post("/api/generate/text-to-image", json=body)).json()["run_id"]
        assert (await http.post(f"/api/jobs/{run_id}/cancel")).status_code == 200

    started = time.monotonic()
    await asyncio.to_thread(fuzz_all)
    took = time.monotonic() - started
    session.close()

    per_operation: Counter[str] = Counter()
    for (name, mode, _), count in sorted(seen.items()):
        per_operation[f"{name} {mode}"] += count
    total = sum(seen.values())
    print(f"\n{total} requests in {took:.1f} s, {len(failures)} failures")
    print(f"  no invalid request to make: {', '.join(unsatisfiable)}")
    for key, count in sorted(per_operation.items()):
        statuses = {s: c for (n, m, s), c in seen.items() if f"{n} {m}" == key}
        print(f"  {key}: {count} in {spent[key]:.1f} s {dict(sorted(statuses.items()))}")
    print(f"  valid requests refused for documented rules, by field: {dict(refused)}")
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:20])
    assert total >= MIN_REQUESTS
    # The admission path ran: jobs were priced, checked against the cache and stored.
    assert seen["createJob", "positive", 201] >= 50


# Server-sent events: the fuzzer follows streams of a job that ended; this follows one whole
# stream and checks every event against the document by hand.


async def test_the_events_of_a_job_match_their_documented_schemas(
    mesh: Mesh, document: dict[str, Any]
) -> None:
    import jsonschema

    answer = document["paths"]["/api/status/stream/{run_id}"]["get"]["responses"]["200"]
    event_schema = answer["content"]["text/event-stream"]["schema"]
    data_schemas = {
        kind["properties"]["event"]["const"]: kind["properties"]["data"]["contentSchema"]
        for kind in event_schema["oneOf"]
    }
    assert set(data_schemas) == set(EVENT_SCHEMAS)

    def check(schema: Any, value: Any) -> None:
        whole = {**schema, "components": document["components"]}
        jsonschema.validate(value, whole, cls=jsonschema.Draft202012Validator)

    body = {"prompt": "a windmill at noon", "width": 64, "height": 64, "steps": 4, "seed": 1}
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        created = await http.post("/api/generate/text-to-image", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        await http.post(f"/api/jobs/{run_id}/cancel")
        seen = []
        async with http.stream("GET", f"/api/status/stream/{run_id}") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            event: dict[str, str] = {}
            async for line in stream.aiter_lines():
                if line.startswith(":"):  # a comment: the keep-alive of a quiet stream
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    event[name] = value
                    continue
                if not event:  # the end of a comment's message
                    continue
                check(event_schema, event)
                check(data_schemas[event["event"]], json.loads(event["data"]))
                seen.append(event["event"])
                event = {}
    assert seen[0] == "status" and seen[-1] == "final"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a fox", "width": 72, "model": "tiny-fibo"}, "width"),
        ({"prompt": "a fox", "steps": 60, "model": "tiny-fibo"}, "steps"),
        (
            {
                "prompt": "a fox",
                "guidance_images": [
                    {"key": "uploads/x/ab/" + "ab" * 32 + ".png", "role": "reference"}
                ],
                "model": "tiny-fibo",
            },
            "guidance_images[0].role",
        ),
        ({"prompt": "a fox", "seed": 2**53 - 1, "num_variants": 2}, "seed"),
        ({"prompt": "a fox", "strength": 0.5}, "strength"),
    ],
    ids=["size-multiple", "max-steps", "role", "seed-range", "strength-without-reference"],
)
async def test_a_model_dependent_rule_is_a_422_naming_a_field_the_document_flags(
    mesh: Mesh, document: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        response = await http.post("/api/cost/estimate", json=body)
    assert response.status_code == 422, response.text
    assert [v["field"] for v in response.json()["error"]["field_violations"]] == [field]
    schema = document["components"]["schemas"]["EstimateRequest"]
    assert Document(document).rules_on_path(schema, path_steps(field))
    # What the schema says in full is not flagged: a refusal of it would fail the fuzz test.
    for plain in ("guidance_scale", "guidance_images[0]", "controlnet.weight", "fibo_json.objects"):
        assert not Document(document).rules_on_path(schema, path_steps(plain)), plain


@pytest.mark.parametrize(
    "query",
    [
        {"from": "0001-01-01T00:00:00+05:00", "to": "0001-01-02T00:00:00Z"},
        {"to": "0001-01-01T00:30:00Z"},
        {"to": "9999-12-31T23:59:59-05:00"},
    ],
    ids=["year-1-with-an-offset", "an-hour-before-year-1", "past-year-9999"],
)
async def test_admin_stats_at_the_ends_of_time_is_a_422_not_a_500(
    mesh: Mesh, query: dict[str, str]
) -> None:
    """Found on the way: these overflowed Python's datetime (a 500)."""
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        response = await http.get("/api/admin/stats", params=query)
    assert response.status_code == 422, response.text
    assert [v["field"] for v in response.json()["error"]["field_violations"]] == ["to"]


async def test_a_number_with_a_zero_fraction_is_an_integer_as_the_schema_says(mesh: Mesh) -> None:
    """JSON Schema's `integer` admits 64.0; the server reads it as 64 (64.5 stays refused)."""
    body = {"prompt": "a fox", "width": 64.0, "height": 64, "steps": 4.0, "seed": 7.0}
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        whole = await http.post("/api/cost/estimate", json=body)
        half = await http.post("/api/cost/estimate", json={**body, "width": 64.5})
        presigned = await http.post(
            "/api/uploads/presign",
            json={"content_type": "image/png", "sha256": "ab" * 32, "size_bytes": 10.0},
        )
    assert whole.status_code == 200, whole.text
    assert half.status_code == 422
    assert [v["field"] for v in half.json()["error"]["field_violations"]] == ["width"]
    assert presigned.status_code == 200 and presigned.json()["max_bytes"] == 10


async def test_empty_stats_times_are_the_defaults_as_the_document_says(mesh: Mesh) -> None:
    """Found on the way: the document said `to` must be a date-time; the server took `to=` as
    absent (the document now says so)."""
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as http:
        response = await http.get("/api/admin/stats", params={"from": "", "to": ""})
    assert response.status_code == 200, response.text
