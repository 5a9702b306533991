"""Every Prometheus metric of the mesh, in one catalogue, and the `/metrics` endpoint.

Names follow Prometheus conventions: a `imagegen_` prefix, base units in the name (`_seconds`,
`_bytes`), `_total` on counters; label values come from small fixed sets (never job ids,
prompts or tenants' free text). Each service process registers the same catalogue (what it
does not use stays at zero or absent) and serves it on its own HTTP port (METRICS_PORT; the
gateway also on its HTTP facade's `/metrics`), with the default process collectors (RSS, CPU,
open files) alongside.

The registry is the process's: services started in one process (the tests do that) share it,
and one metrics server per process and port serves it (`serve` starts each only once). In
production each service is its own process, so its numbers are its own.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

# Latency buckets, in seconds: RPCs and HTTP requests (a millisecond to half a minute).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Job stages and whole jobs (ten milliseconds to an hour).
JOB_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    3600.0,
)
# Rows in an engine batch, images in an evaluator round.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# gRPC, both sides (labels: the full service name, the method name, the status code name).
GRPC_SERVER_HANDLED = Counter(
    "imagegen_grpc_server_handled_total",
    "RPCs completed by this server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SERVER_SECONDS = Histogram(
    "imagegen_grpc_server_handling_seconds",
    "Time from an RPC's start to its end on this server (a stream: to its last message).",
    ["grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
)
GRPC_SERVER_IN_FLIGHT = Gauge(
    "imagegen_grpc_server_in_flight",
    "RPCs this server is handling now.",
    ["grpc_service", "grpc_method"],
)
GRPC_CLIENT_HANDLED = Counter(
    "imagegen_grpc_client_handled_total",
    "RPCs this process made to other services, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_CLIENT_SECONDS = Histogram(
    "imagegen_grpc_client_handling_seconds",
    "Time this process waited for another service's answer (a stream: to its last message).",
    ["grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
)

# The gateway's HTTP facade (route: the route's template, e.g. /api/status/{run_id}).
HTTP_REQUESTS = Counter(
    "imagegen_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "imagegen_http_request_seconds",
    "Time to answer an HTTP request (an SSE stream: until it closes).",
    ["route", "method"],
    buckets=RPC_BUCKETS,
)
SSE_WATCHERS = Gauge("imagegen_sse_watchers", "Clients following a job's events now (SSE).")

# Jobs (model: a registry id; status: completed, failed or cancelled; reason: a fixed set).
JOBS_ADMITTED = Counter(
    "imagegen_jobs_admitted_total",
    "Jobs admitted, by model and how the cache answered (hit, miss, off).",
    ["model", "cache"],
)
JOBS_FINISHED = Counter(
    "imagegen_jobs_finished_total",
    "Jobs that ended, by model, status and failure reason ('' when not failed).",
    ["model", "status", "reason"],
)
JOB_SECONDS = Histogram(
    "imagegen_job_duration_seconds",
    "A job's time from admission to its end, by model and status.",
    ["model", "status"],
    buckets=JOB_BUCKETS,
)
JOB_STAGE_SECONDS = Histogram(
    "imagegen_job_stage_seconds",
    "Time a job spent in a stage: queue_wait, model_load, denoise, decode, evaluate, upload.",
    ["stage"],
    buckets=JOB_BUCKETS,
)
COST_CENTS = Counter(
    "imagegen_cost_cents_total",
    "Cents estimated at admission and charged at completion, by model.",
    ["model", "kind"],
)
QUEUE_WAITING = Gauge(
    "imagegen_queue_waiting_jobs", "Jobs waiting in the queue, by priority lane.", ["lane"]
)
QUEUE_OLDEST_SECONDS = Gauge(
    "imagegen_queue_oldest_age_seconds",
    "Age of the oldest queued job, by priority lane (0 when none waits).",
    ["lane"],
)

# The cache (result: hit_seed_aware, hit_seed_agnostic, miss).
CACHE_LOOKUPS = Counter(
    "imagegen_cache_lookups_total", "Prompt cache lookups, by result.", ["result"]
)

# The generator's engine and the evaluator.
ENGINE_BATCH_ROWS = Histogram(
    "imagegen_engine_batch_rows",
    "Rows (variants) of requests in each engine batch, padding not counted.",
    buckets=BATCH_BUCKETS,
)
ENGINE_STEP_SECONDS = Histogram(
    "imagegen_engine_step_seconds",
    "Time of one denoising step of a batch, by model.",
    ["model"],
    buckets=RPC_BUCKETS,
)
EVALUATOR_BATCH_IMAGES = Histogram(
    "imagegen_evaluator_batch_images",
    "Images scored in each evaluator round.",
    buckets=BATCH_BUCKETS,
)

# Safety (kind: prompt refused or image withheld; category: the policy's category names).
SAFETY_REFUSALS = Counter(
    "imagegen_safety_refusals_total",
    "Prompts refused and images withheld by the content policy, by kind and category.",
    ["kind", "category"],
)


_collecting = True


def set_collecting(on: bool) -> None:
    """Whether this process's services install the metric interceptors and middleware (a
    service started with the metrics port off turns them off: one service per process)."""
    global _collecting
    _collecting = on


def collecting() -> bool:
    return _collecting


# The metrics servers this process started: (host, port asked for) -> the port bound.
_serving: dict[tuple[str, int], int] = {}
_serving_lock = threading.Lock()


def serving_on(host: str, port: int) -> int:
    """The port this process already serves the metrics on for `host:port` (port 0: any port
    on `host`), or 0."""
    with _serving_lock:
        if port == 0:
            return next((bound for (h, _), bound in _serving.items() if h == host), 0)
        return next((b for (h, _), b in _serving.items() if h == host and b == port), 0)


def serve(host: str, port: int) -> int:
    """Serves the registry over HTTP on `host:port` (0: a free port; below 0: not at all) and
    returns the port (0 when off). Once per process and port: a second call for a port this
    process serves already returns it. OSError when the port is taken."""
    if port < 0:
        return 0
    with _serving_lock:
        for (h, asked), bound in _serving.items():
            if h == host and (port in (asked, bound) or port == 0):
                return bound
        server, _ = start_http_server(port, addr=host)  # a daemon thread, for the process's life
        bound = int(server.server_port)
        _serving[(host, port)] = bound
        return bound


def exposition() -> tuple[bytes, str]:
    """The registry in the text format, and its content type: the `/metrics` answer."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
