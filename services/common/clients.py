"""gRPC client channels: one place sets retries on UNAVAILABLE, default deadlines, limits and
the client metrics."""

from __future__ import annotations

import json

import grpc

from services.common.interceptors import mesh_interceptors

_STREAMING_METHODS = [{"service": "imagegen.v1.GeneratorService", "method": "Generate"}]


def _service_config(timeout_seconds: float) -> str:
    retry = {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {
            "methodConfig": [
                {"name": _STREAMING_METHODS, "retryPolicy": retry},
                {"name": [{}], "timeout": f"{timeout_seconds:.3f}s", "retryPolicy": retry},
            ]
        }
    )


def open_channel(addr: str, timeout_seconds: float, max_message_bytes: int) -> grpc.aio.Channel:
    """An insecure channel to a mesh peer (mTLS is the service mesh's job in a cluster)."""
    return grpc.aio.insecure_channel(
        addr,
        options=[
            ("grpc.service_config", _service_config(timeout_seconds)),
            ("grpc.enable_retries", 1),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ],
        interceptors=mesh_interceptors(),
    )
