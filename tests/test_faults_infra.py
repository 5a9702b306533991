"""The fault-test servers (tests/faults.py) are real processes that really restart, keep what
they acknowledged, lose it only when told to, and leave nothing running behind them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from tests.faults import (
    FaultEnv,
    PostgresServer,
    RedisServer,
    fault_env,  # noqa: F401
    fault_stores,  # noqa: F401
    running_fault_stores,
)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _retry_once(call: Callable[[], Awaitable[Any]]) -> Any:
    """A pool's connections broke with the server: the first query may fail, not the second."""
    try:
        return await call()
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
        return await call()


def test_redis_keeps_acknowledged_writes_across_stop_and_kill_and_loses_them_when_told(
    fault_env: FaultEnv,
) -> None:
    server = fault_env.redis
    with server.client() as client:
        assert client.dbsize() == 0  # the fixture flushed it
        client.set("before-stop", "1")
    pid = server.pid
    server.restart()
    assert server.pid != pid
    with server.client() as client:
        assert client.get("before-stop") == b"1"
        client.set("before-kill", "2")
    server.restart(hard=True)  # kill -9: appendfsync always kept the write
    with server.client() as client:
        assert client.mget("before-stop", "before-kill") == [b"1", b"2"]
    server.wipe_and_restart()
    with server.client() as client:
        assert client.dbsize() == 0
        client.set("after-wipe", "3")
    server.flushall()
    with server.client() as client:
        assert client.dbsize() == 0


async def test_a_postgres_pool_survives_restarts_and_the_data_stays(
    fault_env: FaultEnv,
) -> None:
    server = fault_env.postgres
    pool = await asyncpg.create_pool(fault_env.database_url, min_size=2, max_size=2)
    try:
        await pool.execute("CREATE TABLE jobs (id int PRIMARY KEY, status text)")
        await pool.execute("INSERT INTO jobs VALUES (1, 'queued')")
        await asyncio.to_thread(server.restart)  # pg_ctl stop -m fast, then start
        rows = await _retry_once(lambda: pool.fetch("SELECT id, status FROM jobs"))
        assert [tuple(r) for r in rows] == [(1, "queued")]

        await pool.execute("INSERT INTO jobs VALUES (2, 'running')")
        # kill -9 of every server process: crash recovery
        await asyncio.to_thread(server.restart, hard=True)
        rows = await _retry_once(lambda: pool.fetch("SELECT id FROM jobs ORDER BY id"))
        assert [r["id"] for r in rows] == [1, 2]
        # the pool is whole again: both connections work
        async with pool.acquire() as a, pool.acquire() as b:
            assert await _retry_once(lambda: a.fetchval("SELECT 1")) == 1
            assert await _retry_once(lambda: b.fetchval("SELECT 2")) == 2
    finally:
        await pool.close()


def test_the_next_test_gets_both_servers_back_up_a_fresh_database_and_an_empty_redis(
    fault_env: FaultEnv,
) -> None:
    assert (
        fault_env.postgres.psql(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'jobs'", (fault_env.database)
        ).strip()
        == "0"
    )
    fault_env.redis.kill()
    fault_env.postgres.kill()
    assert not fault_env.redis.running and not fault_env.postgres.running


def test_after_the_killed_servers_the_fixture_restarts_them(
    fault_env: FaultEnv,
) -> None:
    assert fault_env.redis.running and fault_env.postgres.running
    with fault_env.redis.client() as client:
        assert client.ping()
    assert fault_env.postgres.psql("SELECT 41 + 1", fault_env.database).strip() == "42"


def test_teardown_leaves_no_server_process(tmp_path: Path) -> None:
    with running_fault_stores(tmp_path) as stores:
        redis_server, postgres_server = stores.redis, stores.postgres
        assert isinstance(redis_server, RedisServer)
        assert isinstance(postgres_server, PostgresServer)
        postgres_server.create_database("busy")
        postgres_server.restart(hard=True)
        backend = subprocess.Popen(  # a client holding a backend open through the teardown
            [
                str(postgres_server.bin / "psql"),
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(postgres_server.port),
                "-U",
                "postgres",
                "-d",
                "busy",
                "-c",
                "SELECT pg_sleep(60)",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        busy = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
        deadline = time.monotonic() + 10
        while postgres_server.psql(busy).strip() != "1":
            assert time.monotonic() < deadline and backend.poll() is None
            time.sleep(0.05)
        assert len(postgres_server.pids()) > 2  # postmaster, its workers, the busy backend
        assert redis_server.pids()
    try:
        assert redis_server.pids() == [] and postgres_server.pids() == []
        assert not _answers(redis_server.port) and not _answers(postgres_server.port)
        leftover = [
            p.info
            for p in psutil.process_iter(["pid", "name", "cmdline"])
            if str(tmp_path.resolve()) in " ".join(p.info["cmdline"] or [])
        ]
        assert leftover == []
    finally:
        backend.kill()
        backend.wait()
