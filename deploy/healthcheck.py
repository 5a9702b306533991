"""Container health check over the gRPC health protocol (grpc.health.v1.Health/Check).

    python deploy/healthcheck.py [ADDR] [SERVICE]

ADDR defaults to the port of $LISTEN_ADDR on 127.0.0.1 (so the same command works in every
service's container); SERVICE defaults to "" (the server as a whole). Exits 0 when the answer is
SERVING, 1 otherwise (NOT_SERVING while models load or during shutdown, unreachable, timeout).
Needs only grpcio and grpcio-health-checking, which every image has.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = float(os.environ.get("HEALTHCHECK_TIMEOUT_SECONDS", "3"))


def local_addr(listen_addr: str) -> str:
    """`0.0.0.0:50051`, `[::]:50051` or `:50051` -> `127.0.0.1:50051`."""
    port = listen_addr.rsplit(":", 1)[-1]
    return f"127.0.0.1:{port}"


def main(argv: list[str]) -> int:
    addr = argv[1] if len(argv) > 1 else local_addr(os.environ.get("LISTEN_ADDR", ":50051"))
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
    except grpc.RpcError as error:
        print(f"{addr} {service or '(overall)'}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{addr} {service or '(overall)'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
