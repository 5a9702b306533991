"""Shared fixtures: real Postgres and Redis (embedded, or external via TEST_DATABASE_URL and
TEST_REDIS_URL), the tiny models, and the services started in this process on 127.0.0.1:0.

Each test module gets its own Postgres database and Redis database, so queues, caches and jobs of
one module never leak into another.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from imagegen.v1 import image_service_pb2_grpc

from services.common import db
from services.common.interceptors import ClientInterceptor, bearer_interceptors
from services.common.objectstore import S3Store, open_store
from services.common.server import Service
from services.common.settings import (
    CacheSettings,
    CommonSettings,
    EvaluatorSettings,
    GatewaySettings,
    GeneratorSettings,
)
from services.mesh import free_port
from services.tenants.keys import ALL_SCOPES, KeyStore, Scope

ROOT = Path(__file__).resolve().parents[1]
_redis_dbs = itertools.count(1)


@dataclass(frozen=True)
class StoreUrls:
    database_url: str
    redis_url: str


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreUrls]:
    external = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL")
    if all(external):
        yield StoreUrls(*external)  # type: ignore[arg-type]
        return
    from services.common.embedded import start_embedded

    embedded = start_embedded(tmp_path_factory.mktemp("stores"))
    yield StoreUrls(embedded.database_url, embedded.redis_url)
    embedded.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models `make models` built, or a fresh build when run outside make."""
    built = Path(os.environ.get("MODEL_DIR", ROOT / ".data" / "models"))
    pipelines = ("tiny-sd", "tiny-fibo")
    controlnets = ("tiny-sd-controlnet-canny", "tiny-sd-controlnet-depth")  # not importing torch
    if (
        all((built / name / "model_index.json").exists() for name in pipelines)
        and all((built / name / "config.json").exists() for name in controlnets)
        and (built / "tiny-clip").exists()
    ):
        return built
    from services.evaluator.tiny_models import build_tiny_clip
    from services.generator.tiny_models import (
        TINY_SD_CONTROLNETS,
        build_tiny_controlnet,
        build_tiny_fibo,
        build_tiny_sd,
    )

    target = tmp_path_factory.mktemp("models")
    build_tiny_sd(target)
    build_tiny_fibo(target)
    build_tiny_clip(target)
    for kind in TINY_SD_CONTROLNETS:
        build_tiny_controlnet(target, kind)
    return target


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return f"{base}?{query}" if query else base


def _with_redis_db(url: str, db: int) -> str:
    if url.startswith("unix://"):
        return f"{url.split('?')[0]}?db={db}"
    return f"{url.rstrip('/').rsplit('/', 1)[0] if url.count('/') > 2 else url}/{db}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol server on 127.0.0.1 (moto's standalone server), for the module."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path) -> S3Store:
    """An S3Store on a bucket of the test's own."""
    settings = CommonSettings(
        s3_endpoint=s3_endpoint,
        s3_access_key="test-access",
        s3_secret_key="test-secret",
        s3_bucket=f"imagegen-{tmp_path.name.lower().replace('_', '-')[:40]}",
        data_dir=tmp_path,
    )
    store = open_store(settings)
    assert isinstance(store, S3Store)
    return store


@dataclass(frozen=True)
class ServiceEnv:
    """Settings for one module's services: its own databases, objects folder and models."""

    database_url: str
    redis_url: str
    model_dir: Path
    data_dir: Path
    http_port: int
    # Settings every service of the module gets (e.g. a test's content policy).
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, cls: type[Any], **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "model_dir": self.model_dir,
            "data_dir": self.data_dir,
            "url_signing_key": "test-signing-key",
            "listen_addr": "127.0.0.1:0",
            "grace_seconds": 1.0,
            "public_base_url": f"http://127.0.0.1:{self.http_port}",
        }
        values.update(self.overrides)
        values.update(overrides)
        return cls(**values)


@contextlib.asynccontextmanager
async def fresh_env(
    stores: StoreUrls, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceEnv]:
    """A database and a Redis db of their own (the Redis db flushed at the end)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(stores.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    redis_db = next(_redis_dbs) % 16
    yield ServiceEnv(
        _with_database(stores.database_url, name),
        _with_redis_db(stores.redis_url, redis_db),
        model_dir,
        tmp_path_factory.mktemp("data"),
        free_port(),
    )
    import redis.asyncio as aioredis

    client = aioredis.from_url(_with_redis_db(stores.redis_url, redis_db))
    await client.flushdb()
    await client.aclose()


@pytest_asyncio.fixture(scope="module")
async def env(
    stores: StoreUrls, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceEnv]:
    """The module's stores, which its services share."""
    async with fresh_env(stores, model_dir, tmp_path_factory) as made:
        yield made


@pytest_asyncio.fixture(loop_scope="session")
async def private_env(
    stores: StoreUrls, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceEnv]:
    """Stores of this test's own, which no service of the module (no worker, no reconciler)
    reads: for tests that drive the job lifecycle step by step."""
    async with fresh_env(stores, model_dir, tmp_path_factory) as made:
        yield made


async def new_key(
    database_url: str,
    tenant: str = "tests",
    scopes: tuple[Scope, ...] = ALL_SCOPES,
    **limits: Any,
) -> str:
    """A new API key of `tenant` (made if new), with `scopes` and limits (rate_per_minute,
    max_concurrent)."""
    pool = await db.connect(database_url)
    try:
        _, key = await KeyStore(pool).create(tenant, scopes, **limits)
    finally:
        await pool.close()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Mesh:
    """Services started in this process, by name, and an API key of tenant "tests" with every
    scope (`auth`: its headers for HTTP; `auth_interceptors`: for a gRPC channel)."""

    services: dict[str, Service]
    key: str = ""

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.services[name].port}"

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.key)

    @property
    def auth_interceptors(self) -> list[ClientInterceptor]:
        return bearer_interceptors(self.key)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.services['gateway'].http_port}"

    async def stop(self) -> None:
        """Stops every service, the rest too when one fails to (a generator left running
        would take the queue entries of a later module that gets the same Redis db)."""
        failures = []
        for name, service in reversed(list(self.services.items())):
            try:
                await service.stop(1.0)
            except Exception as error:  # noqa: BLE001 - raised after the others stopped
                failures.append(f"{name}: {error!r}")
        if failures:
            raise RuntimeError(f"services failed to stop: {'; '.join(failures)}")


async def start_in_process(env: ServiceEnv, names: tuple[str, ...], workers: int = 1) -> Mesh:
    """Starts the named services (in dependency order) wired to each other."""
    mesh = Mesh({})
    addrs: dict[str, str] = {}

    def peers() -> dict[str, Any]:
        return {f"{name}_addr": addr for name, addr in addrs.items() if name != "gateway"}

    try:
        if "cache" in names:
            from services.cache.service import start as start_cache

            mesh.services["cache"] = await start_cache(env.settings(CacheSettings))
            addrs["cache"] = mesh.addr("cache")
        if "evaluator" in names:
            from services.evaluator.service import start as start_evaluator

            mesh.services["evaluator"] = await start_evaluator(env.settings(EvaluatorSettings))
            addrs["evaluator"] = mesh.addr("evaluator")
        if "generator" in names:
            from services.generator.service import start as start_generator

            mesh.services["generator"] = await start_generator(
                env.settings(
                    GeneratorSettings,
                    workers=workers,
                    claim_idle_ms=2000,
                    reconcile_interval_seconds=0.5,
                    requeue_after_seconds=1.0,
                    lease_seconds=3.0,
                    torch_threads=1,
                    **peers(),
                )
            )
            addrs["generator"] = mesh.addr("generator")
        if "gateway" in names:
            from services.gateway.service import start as start_gateway

            mesh.services["gateway"] = await start_gateway(
                env.settings(GatewaySettings, http_port=env.http_port, **peers())
            )
            mesh.key = await new_key(env.database_url)
    except BaseException:
        await mesh.stop()
        raise
    return mesh


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def images(mesh: Mesh) -> AsyncIterator[image_service_pb2_grpc.ImageServiceStub]:
    """An ImageService stub on the gateway of the module's `mesh` (modules that start one)."""
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        yield image_service_pb2_grpc.ImageServiceStub(channel)
