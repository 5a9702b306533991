"""The admin dashboard in a real browser, against the real mesh: after jobs that render, hit the
cache, fail, wait in the queue, are cancelled and are refused, `/admin#key=<admin key>` draws
every chart (each canvas has painted pixels, no empty state shows), the tiles show the totals,
the time-range picker reloads the charts, the console stays clean, axe-core finds nothing
serious or critical, and a full-page screenshot is kept in the artifacts. A key without the
admin scope gets the key form back, saying why."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from services.common.settings import CommonSettings
from services.tenants.keys import Scope
from tests.browser.conftest import BrowserPage
from tests.browser.ui import axe_violations
from tests.conftest import Mesh, ServiceEnv, new_key, start_in_process
from tests.helpers import png_bytes, stored_upload

WAIT = 60.0
CHARTS = ("hit", "throughput", "queue", "cost", "duration", "stages", "refusals", "models")
READY_MS = 30_000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


def body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": 4, "seed": 5, **fields}


async def final_status(http: httpx.AsyncClient, mesh: Mesh, run_id: str) -> str:
    async with http.stream("GET", f"/api/status/stream/{run_id}", headers=mesh.auth) as stream:
        async for line in stream.aiter_lines():
            if line == "event: final":
                break
    return str((await http.get(f"/api/status/{run_id}", headers=mesh.auth)).json()["status"])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def jobs_run(mesh: Mesh, env: ServiceEnv) -> int:
    """Runs the jobs every chart needs; the number of jobs admitted."""
    admitted = 0
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT, headers=mesh.auth) as http:

        async def generate(request: dict[str, Any]) -> str:
            nonlocal admitted
            answer = await http.post("/api/generate/text-to-image", json=request)
            assert answer.status_code == 201, answer.text
            admitted += 1
            return str(answer.json()["run_id"])

        repeated = body(f"a lighthouse at dusk {uuid.uuid4()}")
        others = [body(f"a red kite {uuid.uuid4()}"), body(f"a barn {uuid.uuid4()}")]
        for request in (repeated, *others):
            assert await final_status(http, mesh, await generate(request)) == "completed"
        await generate(repeated)  # a cache hit
        key = await stored_upload(env, png_bytes())
        doomed = await generate(
            body(
                f"a guided lamp {uuid.uuid4()}",
                width=256,
                height=256,
                steps=60,
                guidance_images=[{"key": key, "role": "reference"}],
            )
        )
        (env.settings(CommonSettings).objects_root() / key).unlink()
        assert await final_status(http, mesh, doomed) == "failed"
        slow = await generate(
            body(f"a slow harbour {uuid.uuid4()}", width=512, height=512, steps=100)
        )
        queued = await generate(body(f"a queued pier {uuid.uuid4()}"))
        for run_id in (queued, slow):
            assert (await http.post(f"/api/jobs/{run_id}/cancel")).status_code == 200
        refused = await http.post("/api/generate/text-to-image", json=body("a gory battlefield"))
        assert refused.status_code == 422
    return admitted


# Each canvas: its id, whether it is shown, and how many of its pixels are painted.
CANVASES = """() => [...document.querySelectorAll('canvas')].map((c) => {
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) painted++;
  return { id: c.id, shown: c.offsetParent !== null, painted, label: c.getAttribute('aria-label') };
})"""


async def test_the_dashboard_draws_every_chart_of_the_jobs_run(
    mesh: Mesh, jobs_run: int, page: BrowserPage, artifacts_dir: Path
) -> None:
    await page.page.goto(f"{mesh.http_url}/admin#key={mesh.key}")
    await page.page.wait_for_selector("body[data-ready=true]", state="attached", timeout=READY_MS)
    assert "key=" not in page.page.url  # taken out of the address at once
    assert page.page.url.endswith("#range=1h")

    canvases = {c["id"]: c for c in await page.page.evaluate(CANVASES)}
    assert set(canvases) == {f"chart-{name}" for name in CHARTS}
    for name, canvas in canvases.items():
        assert canvas["shown"], name
        assert canvas["painted"] > 2000, (name, canvas["painted"])
        assert canvas["label"], name  # a text alternative for each chart
    assert await page.page.locator(".empty-state:visible").count() == 0
    assert await page.page.locator("#t-admitted").inner_text() == str(jobs_run)
    hit_ratio = f"{100 / jobs_run:.1f}%"  # one cache hit; every job asked the cache
    assert (await page.page.locator("#t-hit").inner_text()).startswith(hit_ratio)
    assert await page.page.locator("#duration-pcts dt").all_inner_texts() == [
        "p50",
        "p95",
        "p99",
        "mean",
        "samples",
    ]
    await page.page.screenshot(path=str(artifacts_dir / "admin-dashboard.png"), full_page=True)
    assert await axe_violations(page.page) == []  # nothing serious or critical for axe-core

    # Another range reloads every chart; the address keeps it.
    await page.page.get_by_text("15 min", exact=True).click()
    await page.page.wait_for_selector("body[data-ready=true]", state="attached", timeout=READY_MS)
    assert page.page.url.endswith("#range=15m")
    await page.page.screenshot(path=str(artifacts_dir / "admin-dashboard-15m.png"), full_page=True)
    assert await page.page.locator("#t-admitted").inner_text() == str(jobs_run)
    # A custom range: refused while it ends before it starts, then applied (prefilled with the
    # last hour, which holds every job).
    await page.page.get_by_text("Custom", exact=True).click()
    start = await page.page.input_value("#custom-from")
    await page.page.fill("#custom-from", await page.page.input_value("#custom-to"))
    await page.page.click("#custom-range button")
    assert await page.page.locator("#range-error").inner_text() == (
        "The start must be before the end."
    )
    await page.page.fill("#custom-from", start)
    await page.page.click("#custom-range button")
    await page.page.wait_for_selector("body[data-ready=true]", state="attached", timeout=READY_MS)
    assert "#from=" in page.page.url and "&to=" in page.page.url
    assert await page.page.locator("#range-error").is_hidden()
    assert await page.page.locator("#t-admitted").inner_text() == str(jobs_run)
    # A stage's histogram, picked in the select.
    await page.page.select_option("#duration-of", "stage:denoise")
    assert "denoise" in (await page.page.locator("#chart-duration").get_attribute("aria-label"))
    assert page.errors == []


async def test_a_key_without_the_admin_scope_gets_the_key_form_again(
    mesh: Mesh, env: ServiceEnv, page: BrowserPage
) -> None:
    reader = await new_key(env.database_url, "tests", (Scope.READ, Scope.GENERATE))
    await page.page.goto(f"{mesh.http_url}/admin")
    form = page.page.locator("#key-form")
    await form.wait_for()
    await page.page.fill("#api-key", reader)
    await page.page.click("#key-form button")
    error = page.page.locator("#key-error")
    await error.wait_for()
    assert "admin" in await error.inner_text()
    assert await page.page.locator("#app").is_hidden()
    # The one error is the refusal itself (and Chromium's console line about it).
    assert {e.split(":")[0] for e in page.errors} <= {"HTTP 403", "console"}
    assert any("/api/admin/stats" in e for e in page.errors)
