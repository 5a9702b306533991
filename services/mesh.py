"""Runs the whole mesh on one machine: `python -m services.mesh` (what `make run` does).

Starts the embedded Postgres and Redis (unless DATABASE_URL / REDIS_URL point elsewhere), then the
four services as separate processes, waits until each answers gRPC health SERVING, and on Ctrl-C
or SIGTERM stops them all (services first, then the stores), leaving nothing running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.embedded import EmbeddedStores, start_embedded
from services.common.interceptors import ClientInterceptor, bearer_interceptors
from services.common.server import PortInUse

log = logging.getLogger("imagegen.mesh")

SERVICES = ("cache", "evaluator", "generator", "gateway")


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound (no SO_REUSEPORT, as the services bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out to outgoing connections and to bind(0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_port() -> int:
    """A free port for a server to come, below the ephemeral range: a port bind(0) picked
    would be free now but could be any outgoing connection's own port by the time the
    server binds it (seen: "Address already in use" at a mesh's start)."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(100):
            port = random.randrange(10000, low)
            if port_free(port):
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ports:
    gateway: int = 50051
    cache: int = 50052
    generator: int = 50053
    evaluator: int = 50054
    http: int = 8080

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


@dataclass
class Mesh:
    data_dir: Path
    ports: Ports
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stores: EmbeddedStores | None = None
    # The admin API key of tenant "local", kept in data_dir/dev.key (made once started).
    key: str = ""

    @property
    def auth(self) -> dict[str, str]:
        """The key as HTTP headers."""
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def auth_interceptors(self) -> list[ClientInterceptor]:
        """The key for a gRPC channel to the gateway."""
        return bearer_interceptors(self.key)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def addr(self, service: str) -> str:
        return f"127.0.0.1:{getattr(self.ports, service)}"

    def start_service(self, name: str, log_dir: Path | None = None) -> None:
        output = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            output = (log_dir / f"{name}.log").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env={**self.env, "LISTEN_ADDR": self.addr(name)},
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own copy

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop_service(name)
        if self.stores is not None:
            self.stores.stop()
            self.stores = None


async def wait_serving(addr: str, within: float, process: subprocess.Popen[bytes]) -> None:
    """Waits until `addr` answers the overall health check with SERVING."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{addr}: the process exited with {process.returncode}")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} did not become SERVING in {within:.0f}s")
            await asyncio.sleep(0.1)


def prepare_mesh(data_dir: Path, ports: Ports, extra_env: dict[str, str] | None = None) -> Mesh:
    """The mesh's environment, with the embedded stores started unless DATABASE_URL and
    REDIS_URL point elsewhere; no service started yet."""
    taken = [port for port in dataclasses.astuple(ports) if not port_free(port)]
    if taken:
        # Before any store starts: a second copy must not share the first one's data folder.
        raise PortInUse(f"ports {taken} are in use: is imagegen already running?")
    env = dict(os.environ)
    env.update(extra_env or {})
    stores = None
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        stores = start_embedded(data_dir)
        env.setdefault("DATABASE_URL", stores.database_url)
        env.setdefault("REDIS_URL", stores.redis_url)
        env["EMBEDDED"] = "1"
    env.update(
        DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CACHE_ADDR=f"127.0.0.1:{ports.cache}",
        GENERATOR_ADDR=f"127.0.0.1:{ports.generator}",
        EVALUATOR_ADDR=f"127.0.0.1:{ports.evaluator}",
        HTTP_PORT=str(ports.http),
        PUBLIC_BASE_URL=env.get("PUBLIC_BASE_URL", f"http://127.0.0.1:{ports.http}"),
    )
    env.setdefault("MODEL_DIR", str(data_dir / "models"))
    return Mesh(data_dir, ports, env, stores=stores)


async def start_services(mesh: Mesh, log_dir: Path | None = None, within: float = 120) -> None:
    """Starts the four services of a prepared mesh; returns once all are SERVING, with the
    admin key of data_dir/dev.key made if new (on failure, everything is stopped)."""
    from services.gateway.cli import ensure_dev_key  # the gateway's operator commands

    try:
        for name in SERVICES:
            mesh.start_service(name, log_dir)
        await asyncio.gather(
            *(wait_serving(mesh.addr(n), within, mesh.processes[n]) for n in SERVICES)
        )
        mesh.key = await ensure_dev_key(mesh.env["DATABASE_URL"], mesh.data_dir / "dev.key")
    except BaseException:
        await asyncio.to_thread(mesh.stop)
        raise


def start_mesh(
    data_dir: Path,
    ports: Ports,
    extra_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 120,
) -> Mesh:
    """Starts the stores and the four services; returns once all are SERVING."""
    mesh = prepare_mesh(data_dir, ports, extra_env)
    asyncio.run(start_services(mesh, log_dir, timeout))
    return mesh


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mesh %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir = Path(os.environ.get("DATA_DIR", ".data"))
    started = time.monotonic()
    try:
        mesh = start_mesh(data_dir, Ports(http=int(os.environ.get("HTTP_PORT", "8080"))))
    except PortInUse as error:
        log.error("%s", error)
        raise SystemExit(2) from None
    key_path = data_dir / "dev.key"
    log.info(
        "all services SERVING in %.1fs: HTTP %s  gRPC gateway %s  (Ctrl-C stops everything)",
        time.monotonic() - started,
        mesh.http_url,
        mesh.addr("gateway"),
    )
    # As Jupyter does: the page's URL carrying the key (in the fragment, which the browser
    # never sends to a server); the page keeps it for the session and drops it from the URL.
    print(
        f"\n    Open the page:  {mesh.http_url}/#key={mesh.key}\n"
        f"    API key (admin, tenant 'local') in {key_path}, e.g.\n"
        f'    curl -H "Authorization: Bearer $(cat {key_path})" {mesh.http_url}/api/jobs\n',
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop:
            for name, process in mesh.processes.items():
                if process.poll() is not None:
                    log.error("%s exited with %s; stopping the mesh", name, process.returncode)
                    stop = True
            time.sleep(0.5)
    finally:
        log.info("stopping")
        mesh.stop()
        log.info("stopped")


if __name__ == "__main__":
    main()
