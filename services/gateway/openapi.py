"""The HTTP facade's OpenAPI 3.1 description, served at /openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, ok: str, body: str | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": ok},
            "404": {
                "description": "unknown run",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "413": {
                "description": "body over 1 MiB (refused before it is read)",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "422": {
                "description": "bad field",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "503": {
                "description": "the job store is unavailable; retry after the Retry-After header",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
        **extra,
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


_RUN_ID = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "imagegen", "version": "1"},
    "paths": {
        "/api/generate/text-to-image": {
            "post": _op(
                "Create a generation job (or answer from the cache)",
                "the job",
                "GenerateRequest",
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "a retry with the same key and body returns the first job"
                        " for IDEMPOTENCY_TTL_SECONDS (default a day); another body gets 409",
                        "schema": {"type": "string", "maxLength": 200},
                    }
                ],
            )
        },
        "/api/status/{run_id}": {"get": _op("Read a job", "the job", parameters=_RUN_ID)},
        "/api/status/stream/{run_id}": {
            "get": _op(
                "Server-sent events of a job: progress, artifact, evaluation, final, error",
                "text/event-stream; resumes after the Last-Event-ID header",
                parameters=_RUN_ID,
            )
        },
        "/api/jobs": {
            "get": _op(
                "List jobs, newest first (page_size, page_token, status)",
                "{jobs, next_page_token}",
            )
        },
        "/api/jobs/{run_id}/cancel": {"post": _op("Cancel a job", "the job", parameters=_RUN_ID)},
        "/api/cost/estimate": {"post": _op("Price a request", "the price", "GenerateRequest")},
        "/api/cache/lookup": {
            "post": _op("Look a request up in the prompt cache", "hit or miss", "GenerateRequest")
        },
        "/api/models": {"get": _op("List the served models", "the models")},
        "/api/uploads/presign": {
            "post": _op(
                "Presign the upload of a guidance image ({content_type, sha256, size_bytes})",
                "{key, upload_url, method, headers, expires_at}: PUT the bytes to upload_url",
            )
        },
    },
    "components": {
        "schemas": {
            "GenerateRequest": {
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "maxLength": 2000},
                    "fibo_json": {"type": "object"},
                    "negative_prompt": {"type": "string"},
                    "model": {"type": "string"},
                    "seed": {"type": "integer", "minimum": 0},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "num_variants": {"type": "integer", "minimum": 1},
                    "steps": {"type": "integer", "minimum": 1},
                    "guidance_scale": {"type": "number"},
                    "guidance_images": {
                        "type": "array",
                        "maxItems": 5,
                        "items": {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string"},
                                "role": {"enum": ["reference", "style", "texture"]},
                            },
                        },
                    },
                    "controlnet": {
                        "type": "object",
                        "properties": {
                            "name": {"enum": ["canny", "depth", "recoloring", "color_grid"]},
                            "weight": {"type": "number", "minimum": 0, "maximum": 1},
                            "mask": {"type": "string"},
                        },
                    },
                    "seed_agnostic_cache": {"type": "boolean"},
                    "skip_cache": {"type": "boolean"},
                    "refine_mode": {"type": "string"},
                    "meta": {"type": "object"},
                },
            },
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field_violations": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "field": {"type": "string"},
                                        "description": {"type": "string"},
                                    },
                                },
                            },
                        },
                    }
                },
            },
        }
    },
}
