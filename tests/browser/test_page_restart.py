"""The page survives a gateway restart mid-job: while a slow job streams, the gateway is stopped
and a new one started on the same HTTP port; the page's stream comes back with `Last-Event-ID`,
shows every step once, and the job reaches its end on the page.

Its own module (and mesh): it replaces the mesh's gateway.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from services.common.settings import GatewaySettings
from services.gateway.service import start as start_gateway
from tests.browser.conftest import BrowserPage
from tests.browser.ui import (
    Request,
    cards,
    event_log,
    expect,
    fill_request,
    open_app,
    run_id,
    submit,
    wait_for_end,
)
from tests.conftest import Mesh, ServiceEnv, start_in_process

STEPS = 60
# Long enough to outlast the restart; the job is not cached, so each run renders.
SLOW = Request(
    f"a night train {uuid.uuid4().hex[:8]}", width=320, height=320, steps=STEPS, variants=1
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


def event_id(text: str) -> tuple[int, int]:
    millis, seq = text.split("-")
    return int(millis), int(seq)


async def test_a_gateway_restart_mid_job_resumes_the_pages_stream_after_its_last_event(
    mesh: Mesh, env: ServiceEnv, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    streams: list[Any] = []
    p.on("request", lambda r: streams.append(r) if "/api/status/stream/" in r.url else None)
    await open_app(p, mesh.http_url, mesh.key)
    await fill_request(p, SLOW)
    estimates: list[Any] = []
    p.on("request", lambda r: estimates.append(r) if "/api/cost/estimate" in r.url else None)
    job_id = await submit(p)
    # Leaving the last field (its `change`) asks for no second estimate of the same form: no
    # request that the stop below could cut.
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    assert estimates == []
    progress = p.locator("#log li[data-kind=progress]")
    await expect(progress.nth(2)).to_be_attached(timeout=30_000)  # a few steps in

    # The HTTP server drains alongside the gRPC server: its open streams are cut at the grace.
    await mesh.services["gateway"].stop(1.0)
    # The page noticed, keeps trying, and has seen no end: the job is mid-way.
    await expect(p.locator("#stream-state")).to_have_text("reconnecting")
    seen = [entry for entry in await event_log(p) if entry[1] != "client"]
    last_seen = seen[-1][0]
    assert all(name != "final" for _, name, _ in seen)
    await expect(p.locator("#run-status")).to_have_text("running")

    peers = {f"{name}_addr": mesh.addr(name) for name in ("cache", "evaluator", "generator")}
    mesh.services["gateway"] = await start_gateway(
        env.settings(GatewaySettings, http_port=env.http_port, **peers)
    )
    await expect(p.locator("#stream-state")).to_have_text("live", timeout=30_000)
    await p.screenshot(path=str(artifacts_dir / "page-restart-resumed.png"), full_page=True)
    await wait_for_end(p, timeout_ms=120_000)

    # Every request after the first asked to resume after the last event the page had.
    assert streams[0].headers.get("last-event-id") is None
    assert len(streams) >= 2
    assert {r.headers.get("last-event-id") for r in streams[1:]} == {last_seen}
    resumed = await streams[-1].response()
    assert resumed is not None and resumed.status == 200
    log = await event_log(p)
    assert any(
        name == "client" and text == f"reconnected; resuming after {last_seen}"
        for _, name, text in log
    )

    # Each event once, in order; every step once; the run's end shown.
    events = [(event_id(i), name, text) for i, name, text in log if name != "client"]
    ids = [i for i, _, _ in events]
    assert ids == sorted(set(ids))
    assert any(i > event_id(last_seen) and name == "progress" for i, name, _ in events)
    steps = [
        int(m[1])
        for _, name, text in events
        if name == "progress" and (m := re.search(rf"step (\d+)/{STEPS}\b", text))
    ]
    assert steps == list(range(1, STEPS + 1))
    previews = [text for _, name, text in events if name == "preview"]
    assert previews
    assert all(re.fullmatch(r"variant 0 · step \d+ · latent preview", t) for t in previews)
    assert events[-1][1] == "final" and events[-1][2].startswith("completed")
    await expect(p.locator("#progress-pct")).to_have_text("100%")
    assert await run_id(p) == job_id
    assert len(await cards(p)) == 1
    await p.screenshot(path=str(artifacts_dir / "page-restart-completed.png"), full_page=True)
    # What failed is the stream the stop cut, and attempts while the gateway was away.
    cut = ("/api/status/stream/", "ERR_INCOMPLETE_CHUNKED_ENCODING", "ERR_CONNECTION_REFUSED")
    assert all(any(c in e for c in cut) for e in page.errors), page.errors
