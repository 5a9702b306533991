"""`make demo`: submits a job to the running mesh, prints its SSE stream, downloads the PNGs,
then submits the same request again and shows the byte-identical cache hit."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from imagegen.http_transport import sse_messages
from PIL import Image

REQUEST = {
    "prompt": "A lighthouse on a cliff at dusk, oil painting",
    "seed": 42,
    "width": 256,
    "height": 256,
    "num_variants": 2,
    "steps": 20,
}


async def sse_events(client: httpx.AsyncClient, path: str) -> AsyncIterator[dict[str, Any]]:
    """The job stream's events as {id, event, data} dicts (read by the SDK's SSE parser)."""
    async with client.stream("GET", path) as response:
        response.raise_for_status()
        async for name, event_id, data in sse_messages(response.aiter_lines()):
            yield {"id": event_id, "event": name, "data": json.loads(data)}


def _describe(event: dict[str, Any]) -> str:
    data = event["data"]
    if event["event"] == "progress":
        return (
            f"variant {data['variant_index']} step {data['step']}/{data['total_steps']}"
            f"  {data['percent']:.0f}%  eta {data['eta_ms']} ms"
        )
    if event["event"] == "artifact":
        return f"variant {data['variant_index']} stored as {data['key']}"
    if event["event"] == "evaluation":
        return "scores " + ", ".join(
            f"v{a['variant_index']}: clip {a['semantic_score']:.2f} lpips {a['perceptual_score']}"
            for a in data["artifacts"]
        )
    if event["event"] == "final":
        return f"{data['status']} (cost {data['cost_cents']} cents, cache hit {data['cached_hit']})"
    return json.dumps(data)


async def main(base_url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        started = time.perf_counter()
        job = (await client.post("/api/generate/text-to-image", json=REQUEST)).raise_for_status()
        created = job.json()
        print(
            f"POST /api/generate/text-to-image -> run {created['run_id']}, seed "
            f"{created['seed']}, estimate {created['est_cost_cents']} cents"
        )
        final: dict[str, Any] = {}
        async for event in sse_events(client, f"/api/status/stream/{created['run_id']}"):
            print(f"  id {event['id']:<16} {event['event']:<10} {_describe(event)}")
            final = event["data"] if event["event"] == "final" else final
        print(f"done in {time.perf_counter() - started:.2f}s")
        if final.get("status") != "completed":
            return 1
        digests = {}
        for artifact in final["artifacts"]:
            png = (await client.get(artifact["url"])).raise_for_status().content
            size = Image.open(io.BytesIO(png)).size
            digests[artifact["variant_index"]] = hashlib.sha256(png).hexdigest()
            print(
                f"  variant {artifact['variant_index']}: {size[0]}x{size[1]} PNG, "
                f"{len(png)} bytes, sha256 {digests[artifact['variant_index']][:16]}…"
                f"{'  (primary)' if artifact['is_primary'] else ''}"
            )
        again = (await client.post("/api/generate/text-to-image", json=REQUEST)).json()
        same = True
        for artifact in again["artifacts"]:
            png = (await client.get(artifact["url"])).content
            same = same and hashlib.sha256(png).hexdigest() == digests[artifact["variant_index"]]
        print(
            f"again: cached_hit={again['cached_hit']} cost_cents={again['cost_cents']} "
            f"byte-identical={same}"
        )
        return 0 if again["cached_hit"] and same else 1


if __name__ == "__main__":
    url = os.environ.get("IMAGEGEN_URL", "http://127.0.0.1:8080")
    # IMAGEGEN_API_KEY, else the key `make run` keeps in DATA_DIR/dev.key.
    key_file = Path(os.environ.get("DATA_DIR", ".data")) / "dev.key"
    key = os.environ.get("IMAGEGEN_API_KEY") or (
        key_file.read_text().strip() if key_file.exists() else ""
    )
    if not key:
        sys.exit(f"no API key: set IMAGEGEN_API_KEY, or start `make run` (it writes {key_file})")
    sys.exit(asyncio.run(main(url, key)))
