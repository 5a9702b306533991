"""What the benchmarks share: a running mesh, and a lean SSE reader on raw asyncio streams
(a thousand httpx streams would measure httpx, not the gateway)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.mesh import Mesh, Ports, start_mesh

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / ".data" / "models"


@contextmanager
def running_mesh() -> Iterator[Mesh]:
    """The four services as processes on free ports, with fresh embedded stores."""
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as folder:
        mesh = start_mesh(
            Path(folder),
            Ports.free(),
            extra_env={"MODEL_DIR": str(MODEL_DIR), "LOG_LEVEL": "WARNING"},
            log_dir=Path(os.environ.get("BENCH_LOG_DIR", Path(folder) / "logs")),
        )
        try:
            yield mesh
        finally:
            mesh.stop()


@dataclass
class SseEvent:
    id: str
    event: str
    data: dict[str, Any]
    received: float  # time.time() when the event's last line arrived

    @property
    def appended(self) -> float:
        """When the event was appended: its id is the Redis Stream id, milliseconds first."""
        return int(self.id.split("-", 1)[0]) / 1000


async def sse(
    host: str, port: int, path: str, connected: asyncio.Event | None = None, key: str = ""
) -> AsyncIterator[SseEvent]:
    """GETs `path` (with the API `key`) and yields its server-sent events (HTTP/1.1,
    chunked)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {key}\r\n\r\n".encode()
        )
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{path}: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if connected is not None:
            connected.set()
        buffer = b""
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError(f"{path}: the stream ended without its last chunk")
            size = int(line.strip(), 16)
            if size == 0:
                return
            buffer += await reader.readexactly(size)
            await reader.readexactly(2)
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                if block.startswith(b":"):  # a comment: the keep-alive of a quiet stream
                    continue
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
                yield SseEvent(
                    fields["id"], fields["event"], json.loads(fields["data"]), time.time()
                )
    finally:
        writer.close()
