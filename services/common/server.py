"""One gRPC server bootstrap for every service.

Health (per-service status), reflection, one interceptor for request ids, errors, metrics and
traces, the Prometheus metrics port, explicit message-size limits and a graceful stop on
SIGTERM/SIGINT: services only say which servicers to add.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.common import metrics, tracing
from services.common.interceptors import CallInterceptor
from services.common.settings import CommonSettings
from services.common.watching import ServerWatch

log = logging.getLogger("imagegen.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# How long past its grace period a stopping process may take (interpreter exit included).
SHUTDOWN_WATCHDOG_SLACK_SECONDS = 5.0
# The least time a shutdown cleanup gets, however much of the grace period is left.
CLEANUP_FLOOR_SECONDS = 0.5


class StartupRefused(RuntimeError):
    """A service cannot run as configured (a taken port, a missing model file, a bad policy):
    it logs the message, which names what is wrong, and exits with status 2."""


class PortInUse(StartupRefused):
    """The service's address is taken: it refuses to start rather than share it."""


def check_secrets(settings: CommonSettings) -> None:
    """StartupRefused when the settings hold a placeholder secret (outside the embedded
    default): called first thing by every service's start."""
    try:
        settings.check_secrets()
    except ValueError as error:
        raise StartupRefused(str(error)) from None


def check_free(addr: str) -> None:
    """Raises PortInUse when `host:port` is taken: called first thing by a service's start, so
    it refuses before it opens a store (start_server checks again, when it really binds)."""
    host, _, port = addr.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # SO_REUSEADDR as the servers set it: a port left in TIME_WAIT by a stopped copy is
        # free, one another process listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as error:
            raise PortInUse(
                f"cannot listen on {addr}: {error.strerror} (is another copy running?)"
            ) from None


def check_metrics_free(host: str, port: int) -> None:
    """As check_free, for the metrics port: one this process serves already is not taken."""
    if port > 0 and not metrics.serving_on(host, port):
        check_free(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def prepare_observability(service: str, metrics_host: str, metrics_port: int) -> None:
    """Before a service starts anything: its metrics port is free; metrics are collected unless
    turned off (port -1: no metric interceptors or middleware); tracing is set up from the
    OTEL_* variables (a bad one refuses the start, naming it)."""
    check_metrics_free(metrics_host, metrics_port)
    metrics.set_collecting(metrics_port >= 0)
    try:
        tracing.configure(service)
    except tracing.TracingConfigError as error:
        raise StartupRefused(str(error)) from None


def serve_metrics(host: str, port: int) -> int:
    """Starts (once per process and port) the metrics HTTP server; its port, 0 when off."""
    try:
        bound = metrics.serve(host, port)
    except OSError as error:
        raise PortInUse(
            f"cannot listen on {host}:{port} for metrics: {error.strerror}"
            " (is another copy running?)"
        ) from None
    if bound:
        log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


@dataclass
class Servicer:
    """A servicer to add: its full service name and the generated `add_..._to_server`."""

    name: str
    add: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    names: list[str] = field(default_factory=list)
    stopping: bool = False
    metrics_port: int = 0  # 0: off

    async def set_serving(self, serving: bool) -> None:
        """Sets every served service's status; once stopping, it stays NOT_SERVING."""
        status = SERVING if serving and not self.stopping else NOT_SERVING
        for name in [*self.names, ""]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    service: str,
    addr: str,
    servicers: Sequence[Servicer],
    max_message_bytes: int,
    serving: bool = True,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    metrics_host: str = "127.0.0.1",
    metrics_port: int = -1,
) -> RunningServer:
    """Starts a server on `addr` (port 0 picks a free one); health starts NOT_SERVING unless
    `serving`, so a service can load its models before it takes traffic. `interceptors` run
    inside the call interceptor (their errors get the status table too; its metrics and span
    see the status each call ends with). The metrics are served on
    `metrics_host:metrics_port` (0: a free port; -1: off)."""
    bound_metrics = serve_metrics(metrics_host, metrics_port)
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Clients' keepalive pings on a quiet stream (the SDK pings after 20 s): accepted up to
        # one a second, where gRPC's default (one per 5 min) answers "Too many pings" (GOAWAY).
        # grpc core 1.85 reads the receiving side's limit from this name.
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ]
    server = grpc.aio.server(
        interceptors=[CallInterceptor(ServerWatch.of(service)), *interceptors], options=options
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for servicer in servicers:
        servicer.add(server)
    names = [s.name for s in servicers]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError:
        port = 0
    if port == 0:
        # SO_REUSEPORT is off: a second copy of the service cannot silently share the port.
        raise PortInUse(
            f"cannot listen on {addr}: the address is in use (is another copy running?)"
        )
    await server.start()
    running = RunningServer(server, port, health, names, metrics_port=bound_metrics)
    await running.set_serving(serving)
    log.info("gRPC %s listening on port %d", ", ".join(names), port)
    return running


async def wait_for_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@dataclass
class Service:
    """A started service: its gRPC server and what to close after it stops."""

    grpc: RunningServer
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    http_port: int = 0
    # Other servers of the service (the gateway's HTTP facade): drained alongside the gRPC
    # server, within the same grace, before the cleanups.
    drains: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        """Where GET /metrics answers (0: off)."""
        return self.grpc.metrics_port

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING, drains in-flight calls, then cleans up, all within `grace`
        (each cleanup gets at least CLEANUP_FLOOR_SECONDS). A cleanup still running at its
        deadline is cancelled and left, with a warning naming it: a stopping process must
        not wait on one await that never returns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.grpc.stopping = True
        await self.grpc.set_serving(False)
        drains = [asyncio.ensure_future(drain()) for drain in self.drains]
        await self.grpc.stop(grace)
        if drains:
            # The grace, and a moment after it: a server cuts what is left at the grace.
            budget = max(deadline - loop.time(), 0.0) + CLEANUP_FLOOR_SECONDS
            _, left = await asyncio.wait(drains, timeout=budget)
            for task in left:
                task.cancel()
                log.warning("shutdown: a server did not drain in %.1fs; left", budget)
        for cleanup in reversed(self.cleanups):
            budget = max(deadline - loop.time(), CLEANUP_FLOOR_SECONDS)
            task = asyncio.ensure_future(cleanup())
            done, _ = await asyncio.wait({task}, timeout=budget)
            if not done:
                task.cancel()  # not awaited: its cancellation may hang as well
                name = getattr(cleanup, "__qualname__", repr(cleanup))
                log.warning("shutdown: %s did not finish in %.1fs; left", name, budget)
            elif task.exception() is not None:
                log.warning("shutdown: %s failed", cleanup, exc_info=task.exception())


def run(start: Callable[[], Awaitable[Service]], grace: float) -> None:
    """A service process's main: start, serve until SIGTERM/SIGINT, stop gracefully."""

    async def main() -> None:
        try:
            service = await start()
        except StartupRefused as error:
            log.error("%s", error)
            raise SystemExit(2) from None
        await wait_for_signal()
        log.info("shutting down (grace %.1fs)", grace)
        # A stop that outlives its grace (a thread that never returns, a blocked loop) must not
        # keep the process: past this, every thread's stack goes to stderr and it exits 1.
        faulthandler.dump_traceback_later(grace + SHUTDOWN_WATCHDOG_SLACK_SECONDS, exit=True)
        await service.stop(grace)
        tracing.flush()  # the spans still buffered go out before the process does
        log.info("stopped")
        # Stopped: the stores are closed and nothing is in flight. The interpreter's teardown
        # (joining the default executor's and libraries' threads) is skipped: it adds nothing
        # now, and under load it has kept a stopped generator alive past its grace.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    asyncio.run(main())
