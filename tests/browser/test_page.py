"""The web page (`/`) in a real browser against the real mesh: what a user does and sees.

A guided run (upload through the presigned URL, live events, step progress, scored variants
with the primary marked, a download whose bytes hash as the API says), the cache badge on a
resubmission, a refreshed run of the same seed showing the same hashes, a cancel, field errors
next to their fields, the FIBO editor and a submission by keyboard alone, every control reachable
with Tab, the ControlNet panel, the key prompt, and axe-core finding nothing serious or critical
in each of those states. The gateway restart mid-job is in test_page_restart.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from PIL import Image

from tests.browser.conftest import BrowserPage
from tests.browser.ui import (
    Page,
    Request,
    axe_violations,
    cards,
    event_log,
    expect,
    fill_request,
    open_app,
    png_file,
    run_id,
    sha256,
    submit,
    wait_for_end,
)
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import png_bytes

API_WAIT = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


async def api_job(mesh: Mesh, job_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=API_WAIT) as http:
        answer = await http.get(f"/api/status/{job_id}", headers=mesh.auth)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def unique(text: str) -> str:
    """A prompt no other test (or earlier run) used: its cache entry is its own."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def generate_bodies(page: Page) -> list[dict[str, Any]]:
    """The bodies of the page's POSTs to /api/generate, as they are sent (filled in later)."""
    sent: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/api/generate/text-to-image"):
            sent.append(request.post_data_json)

    page.on("request", on_request)
    return sent


def refused_estimate(error: str) -> bool:
    """Whether a failure the page fixture recorded is a 422 answer to a cost estimate (or the
    console's line about one)."""
    if error.startswith("console: "):
        return "status of 422" in error
    return error.startswith("HTTP 422: POST ") and error.endswith("/api/cost/estimate")


async def upload_guidance(page: Page, data: bytes, name: str = "guide.png") -> None:
    """Chooses a PNG in the guidance uploader and waits until the page says it is uploaded."""
    await page.locator("#upload-input").set_input_files(files=[png_file(data, name)])
    item = page.locator("#uploads li", has_text=name)
    await expect(item.locator(".pill")).to_have_text("uploaded")


async def test_the_empty_page_has_no_serious_accessibility_violations(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    await open_app(page.page, mesh.http_url, mesh.key)
    assert "key=" not in page.page.url  # taken out of the address at once
    assert await axe_violations(page.page) == []
    await page.page.screenshot(path=str(artifacts_dir / "page-empty.png"), full_page=True)
    assert page.errors == []


async def test_a_guided_run_streams_its_steps_and_shows_scored_variants_and_a_verified_download(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    uploads: list[Any] = []
    p.on("request", lambda r: uploads.append(r) if r.method == "PUT" else None)
    sent = generate_bodies(p)
    guide = png_bytes(64)
    await upload_guidance(p, guide)

    # The bytes went straight to the presigned URL, without the API key, under their hash.
    assert len(uploads) == 1
    assert "/files/" in uploads[0].url and "signature=" in uploads[0].url
    assert "authorization" not in await uploads[0].all_headers()
    meta = await p.locator("#uploads .meta").get_attribute("title") or ""
    assert f"/{sha256(guide)}.png" in meta
    assert await p.locator("#upload-count").inner_text() == "1"
    await expect(p.locator("#bd-guidance")).to_have_text("+0.5¢")

    await fill_request(p, Request(unique("a lighthouse on a cliff at dusk"), seed=42))
    job_id = await submit(p)
    await wait_for_end(p)

    # The request carried the uploaded image as the reference.
    assert [g["role"] for g in sent[-1]["guidance_images"]] == ["reference"]
    assert sent[-1]["guidance_images"][0]["key"] in await p.locator("#uploads .meta").inner_text()

    # The live panel: every event with its id, in order, from queued to final.
    log = [(i, name, text) for i, name, text in await event_log(p) if name != "client"]
    names = [name for _, name, _ in log]
    assert names[0] == "status" and names[-1] == "final"
    assert {"progress", "artifact", "evaluation"} <= set(names)
    ids = [tuple(int(part) for part in i.split("-")) for i, _, _ in log]
    assert ids == sorted(set(ids))  # each event once, in order
    # Step progress: every step the run took, of the steps it runs (img2img at the default
    # strength, 0.75, runs 3 of the 4), and the bar at 100% when done.
    steps = {
        int(m[1])
        for _, name, text in log
        if name == "progress" and (m := re.search(r"step (\d+)/3\b", text))
    }
    assert steps == {1, 2, 3}
    await expect(p.locator("#progress")).to_have_js_property("value", 100)
    await expect(p.locator("#progress-pct")).to_have_text("100%")
    await expect(p.locator("#progress")).to_have_class("done")
    assert await p.locator("#run-cache").is_hidden()

    # The variants: sorted by CLIP score, the API's primary marked "best" (and shown first).
    job = await api_job(mesh, job_id)
    assert job["status"] == "completed" and len(job["artifacts"]) == 2
    shown = await cards(p)
    assert [c.variant_index for c in shown] == [
        a["variant_index"]
        for a in sorted(job["artifacts"], key=lambda a: (-a["semantic_score"], a["variant_index"]))
    ]
    by_index = {a["variant_index"]: a for a in job["artifacts"]}
    primary = next(a for a in job["artifacts"] if a["is_primary"])
    for card in shown:
        artifact = by_index[card.variant_index]
        assert card.clip == f"{artifact['semantic_score']:.2f}"
        assert card.sha256 == artifact["sha256"]
        assert card.short_sha256 == artifact["sha256"][:8] + "…"
        assert ("best" in card.badges) == (card.variant_index == primary["variant_index"])
    assert shown[0].variant_index == primary["variant_index"]
    await expect(p.locator("#viewer-primary")).to_be_visible()
    await expect(p.locator("#viewer-title")).to_have_text(
        f"Variant #{primary['variant_index']} selected"
    )
    await expect(p.locator("#viewer-kv")).to_contain_text(primary["sha256"])  # in full

    # Downloading the primary from its card gives the PNG the API describes.
    first_card = p.locator("#grid .card").first
    async with p.expect_download() as started:
        await first_card.get_by_role("link", name=re.compile("^Download")).click()
    download = await started.value
    data = await asyncio.to_thread(Path(await download.path()).read_bytes)
    assert sha256(data) == primary["sha256"]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    index = primary["variant_index"]
    assert download.suggested_filename.endswith(f"-v{index}-seed{42 + index}.png")

    assert await axe_violations(p) == []
    await p.screenshot(path=str(artifacts_dir / "page-guided-run.png"), full_page=True)
    assert page.errors == []


async def test_the_same_request_again_is_answered_from_the_cache_with_its_badge(
    mesh: Mesh, page: BrowserPage
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    await fill_request(p, Request(unique("a red kite over a hill"), seed=7))
    first = await submit(p)
    await wait_for_end(p)
    assert await p.locator("#run-cache").is_hidden()
    rendered = {c.variant_index: c.sha256 for c in await cards(p)}

    second = await submit(p)
    await wait_for_end(p)
    assert second != first
    await expect(p.locator("#run-cache")).to_be_visible()
    await expect(p.locator("#run-cache")).to_have_text("cache hit")
    await expect(p.locator("#run-cost")).to_have_text("0¢, served from the cache")
    await expect(p.locator("#progress-detail")).to_have_text("· served from the cache")
    assert {c.variant_index: c.sha256 for c in await cards(p)} == rendered
    assert (await api_job(mesh, second))["cached_hit"] is True
    assert page.errors == []


async def test_two_refreshed_runs_of_one_seed_show_the_same_hashes(
    mesh: Mesh, page: BrowserPage
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    sent = generate_bodies(p)
    await fill_request(p, Request(unique("a barn in the snow"), seed=1234, cache="refresh"))
    hashes: list[dict[int, str]] = []
    for _ in range(2):
        job_id = await submit(p)
        await wait_for_end(p)
        assert await p.locator("#run-cache").is_hidden()  # rendered again, not read
        shown = {c.variant_index: c.sha256 for c in await cards(p)}
        job = await api_job(mesh, job_id)
        assert job["cached_hit"] is False
        assert shown == {a["variant_index"]: a["sha256"] for a in job["artifacts"]}
        hashes.append(shown)
    assert [body["cache"] for body in sent] == ["refresh", "refresh"]
    assert [body["seed"] for body in sent] == [1234, 1234]
    assert len(hashes[0]) == 2
    assert hashes[0] == hashes[1]
    assert page.errors == []


async def test_a_running_job_is_cancelled_from_the_page(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    await fill_request(
        p, Request(unique("a slow harbour"), width=512, height=512, steps=100, variants=1)
    )
    job_id = await submit(p)
    await expect(p.locator("#progress-detail")).to_contain_text("step", timeout=30_000)
    await expect(p.locator("#run-status")).to_have_text("running")
    await p.get_by_role("button", name="Cancel run").click()
    await wait_for_end(p, "cancelled")

    await expect(p.locator("#progress")).to_have_class("failed")
    await expect(p.locator("#results-empty")).to_have_text("The run ended cancelled; no images.")
    await expect(p.get_by_role("button", name="Generate", exact=True)).to_be_enabled()
    assert await p.get_by_role("button", name="Cancel run").is_hidden()
    events = [(name, text) for _, name, text in await event_log(p) if name != "client"]
    assert events[-1][0] == "final" and events[-1][1].startswith("cancelled")
    job = await api_job(mesh, job_id)
    assert job["status"] == "cancelled" and job["artifacts"] == []
    assert await axe_violations(p) == []
    await p.screenshot(path=str(artifacts_dir / "page-cancelled.png"), full_page=True)
    assert page.errors == []


async def test_field_errors_are_shown_next_to_their_fields(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    sent = generate_bodies(p)

    # The page's own check: no prompt, nothing sent, the prompt marked and focused.
    prompt = p.get_by_role("textbox", name="Prompt", exact=True)
    await p.get_by_role("button", name="Generate", exact=True).click()
    await expect(p.locator("#err-prompt")).to_have_text("Enter a prompt.")
    await expect(prompt).to_have_attribute("aria-invalid", "true")
    await expect(prompt).to_have_accessible_description(re.compile("Enter a prompt"))
    await expect(prompt).to_be_focused()
    assert sent == []

    # The server's checks, while typing (the estimate) and on submitting: each under its field.
    await prompt.fill(unique("a windmill"))
    width = p.get_by_role("spinbutton", name="Width px")
    steps = p.get_by_role("spinbutton", name="Steps")
    await width.fill("70")
    await steps.fill("101")
    await expect(p.locator("#cost-state")).to_have_text("2 fields to fix")
    for field, message in ((width, "must be a multiple of 8"), (steps, "must be 1..100")):
        error = p.locator(".field", has=field).locator(".field-error")
        await expect(error).to_have_text(message)
        await expect(field).to_have_attribute("aria-invalid", "true")
        await expect(field).to_have_accessible_description(re.compile(re.escape(message)))
    # Clicking Generate also takes the focus from the steps field, whose change asks for a new
    # estimate: the refusal's notice outlives it.
    async with p.expect_response(lambda r: r.url.endswith("/api/cost/estimate")):
        await p.get_by_role("button", name="Generate", exact=True).click()
    await expect(p.locator("#cost-state")).to_have_text("2 fields to fix")
    await expect(p.locator("#form-errors")).to_contain_text("The server refused the request")
    await expect(width).to_be_focused()  # the first field the server named
    assert len(sent) == 1 and sent[0]["width"] == 70
    assert await p.locator("#run-body").is_hidden()

    assert await axe_violations(p) == []
    await p.screenshot(path=str(artifacts_dir / "page-field-errors.png"), full_page=True)

    # Fixed fields lose their errors, and the refusal's notice goes with the first edit.
    await width.fill("64")
    await expect(p.locator("#form-errors")).to_be_hidden()
    await steps.fill("4")
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    assert await p.locator(".field-error:visible").count() == 0
    await expect(width).not_to_have_attribute("aria-invalid", "true")

    # A prompt the content policy refuses: only the submission finds it (the estimate does not
    # moderate), and its error stays next to the prompt while other fields are edited.
    await prompt.fill(unique("a gory battlefield"))
    await p.get_by_role("button", name="Generate", exact=True).click()
    refusal = re.compile(r"^refused by the content policy \(\w+\)$")
    await expect(p.locator("#err-prompt")).to_have_text(refusal)
    await expect(prompt).to_be_focused()
    await p.get_by_role("textbox", name="Negative prompt").fill("blurry")
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    await expect(p.locator("#err-prompt")).to_have_text(refusal)
    await expect(prompt).to_have_attribute("aria-invalid", "true")
    await prompt.fill(unique("a windmill at noon"))
    await expect(p.locator("#err-prompt")).to_be_hidden()
    assert len(sent) == 2 and await p.locator("#run-body").is_hidden()
    # What went wrong is only the refusals the test asked for.
    assert page.errors and all("422" in e for e in page.errors), page.errors


async def tab_to(page: Page, selector: str, limit: int = 80, *, back: bool = False) -> int:
    """Presses Tab (Shift+Tab when `back`) until `selector` has the focus; the presses it took."""
    target = page.locator(selector)
    for presses in range(1, limit + 1):
        await page.keyboard.press("Shift+Tab" if back else "Tab")
        if await target.evaluate("(node) => node === document.activeElement"):
            return presses
    raise AssertionError(f"{selector} not reached with {limit} presses of Tab")


async def type_into(page: Page, selector: str, text: str) -> None:
    """Tabs to a field, selects what it holds and types `text` over it."""
    await tab_to(page, selector)
    await page.keyboard.press("ControlOrMeta+a")
    await page.keyboard.type(text)


async def test_a_text_request_is_submitted_and_its_variants_picked_by_keyboard_alone(
    mesh: Mesh, page: BrowserPage
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    sent = generate_bodies(p)
    # Listening for the file chooser from the start: Playwright turns its interception on
    # asynchronously, and a chooser opened before that is never reported.
    chooser: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    p.once("filechooser", lambda opened: chooser.set_result(opened))
    await type_into(p, "#prompt", unique("a paper boat on a pond"))
    for selector, value in (("#width", "64"), ("#height", "64"), ("#steps", "4")):
        await type_into(p, selector, value)
    await type_into(p, "#num_variants", "2")
    # A guidance image chosen with Space on the uploader, its role left as "reference".
    await tab_to(p, "#upload-input")
    await p.keyboard.press("Space")
    await (await asyncio.wait_for(chooser, API_WAIT)).set_files(files=[png_file(png_bytes(64))])
    await expect(p.locator("#uploads .pill")).to_have_text("uploaded")
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    await tab_to(p, "#generate")
    await p.keyboard.press("Enter")
    await wait_for_end(p)
    assert len(sent) == 1 and sent[0]["width"] == 64 and sent[0]["num_variants"] == 2
    assert [g["role"] for g in sent[0]["guidance_images"]] == ["reference"]

    # The second card (the variant not shown yet) is picked with Tab and Space.
    second = p.locator("#grid .card").nth(1)
    index = (await cards(p))[1].variant_index
    await tab_to(p, "#grid .card:nth-child(2) .pick")
    await p.keyboard.press("Space")
    await expect(second).to_have_class(re.compile(r"\bselected\b"))
    await expect(p.locator("#viewer-title")).to_have_text(f"Variant #{index} selected")
    await expect(second.locator(".pick")).to_have_attribute("aria-pressed", "true")
    # Its seed goes back into the form with Enter on "Use this seed".
    await tab_to(p, "#viewer-use-seed")
    await p.keyboard.press("Enter")
    seed = p.get_by_role("spinbutton", name="Seed")
    await expect(seed).to_be_focused()
    await expect(p.get_by_role("checkbox", name="Random")).not_to_be_checked()
    job = await api_job(mesh, await run_id(p))
    await expect(seed).to_have_value(str(job["seed"] + index))  # variant i renders seed + i
    assert page.errors == []


async def test_the_fibo_editor_validates_and_submits_by_keyboard_alone(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    sent = generate_bodies(p)
    editor, status = p.locator("#fibo"), p.locator("#fibo-status")

    # The prompt type is a radio group: Tab to it, an arrow key picks FIBO JSON.
    await tab_to(p, "#mode-text")
    await p.keyboard.press("ArrowRight")
    await expect(p.get_by_role("radio", name="FIBO JSON")).to_be_checked()
    await expect(editor).to_be_visible()
    await expect(status).to_have_text("Paste a FIBO JSON object or load the example.")

    # A syntax error: where it is, with the line and a caret, and nothing is sent.
    await tab_to(p, "#fibo")
    await p.keyboard.type('{\n"short_description": "a fox in the snow",\n}')
    await expect(status).to_contain_text(
        "Invalid JSON, line 3, column 1: trailing comma before “}”"
    )
    await expect(status.locator(".excerpt")).to_have_text("}\n^")
    await expect(editor).to_have_attribute("aria-invalid", "true")
    await p.keyboard.press("ControlOrMeta+Enter")
    await expect(p.locator("#err-fibo_json")).to_have_text("Fix the JSON first (see above).")
    assert sent == []
    assert await axe_violations(p) == []

    # Valid JSON of the wrong shape: accepted, with warnings. Tab indents inside the editor.
    await p.keyboard.press("ControlOrMeta+a")
    await p.keyboard.type('{"short_description": "a fox in the snow", "lighting": "dawn",')
    await p.keyboard.press("Enter")
    await p.keyboard.press("Tab")
    await p.keyboard.type('"mood": "calm"}')
    await expect(editor).to_be_focused()
    assert '\n  "mood"' in await editor.input_value()
    await expect(status).to_contain_text("Valid JSON · 3 fields · 0 objects")
    await expect(status).to_contain_text("“lighting” should be an object")
    await expect(status).to_contain_text("unknown field “mood” (sent as is)")
    await expect(editor).to_have_attribute("aria-invalid", "false")
    # The server's schema check names the misfit by its path, next to the editor.
    await expect(p.locator("#err-fibo_json")).to_have_text("lighting: must be an object")

    # Escape then Tab leaves the editor; Shift+Tab back to "Load example", Enter loads it.
    await p.keyboard.press("Escape")
    await p.keyboard.press("Tab")
    await expect(editor).not_to_be_focused()
    await tab_to(p, "#fibo-example", back=True)
    await p.keyboard.press("Enter")
    await expect(status).to_have_text("Valid JSON · 10 fields · 2 objects")
    await expect(editor).to_be_focused()
    example = json.loads(await editor.input_value())

    # The FIBO model picked from its select with the keyboard, a small size, then Ctrl+Enter.
    await p.keyboard.press("Escape")
    await tab_to(p, "#model")
    await p.keyboard.press("ArrowDown")
    await expect(p.get_by_role("combobox", name="Model")).to_have_value("tiny-fibo")
    for selector, value in (("#width", "64"), ("#height", "64"), ("#steps", "4")):
        await type_into(p, selector, value)
    await type_into(p, "#num_variants", "1")
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    await p.keyboard.press("ControlOrMeta+Enter")
    await wait_for_end(p)
    assert len(sent) == 1
    assert sent[0]["model"] == "tiny-fibo" and sent[0]["fibo_json"] == example
    assert "prompt" not in sent[0]
    job = await api_job(mesh, await run_id(p))
    assert job["request"]["fibo_json"]["short_description"] == example["short_description"]
    assert len(await cards(p)) == 1
    await p.screenshot(path=str(artifacts_dir / "page-fibo.png"), full_page=True)
    # The estimate the server refused for the misfit, and nothing else.
    assert page.errors and all(refused_estimate(e) for e in page.errors), page.errors


# What a keyboard user must be able to reach, in the page's order: every native control that
# is shown and enabled (of a radio group only the checked radio is a Tab stop: arrow keys move
# within it), every scrollable region with nothing focusable inside, and anything else given a
# tabindex. Each is numbered in data-stop; the list names them.
FOCUSABLE = """() => {
  const native = 'a[href], button, input, select, textarea, summary';
  const shown = (n) => !n.closest('[hidden], [inert]') && n.getClientRects().length > 0
    && getComputedStyle(n).visibility !== 'hidden';
  const controls = [...document.querySelectorAll(native)]
    .filter((n) => !n.disabled && !(n.type === 'radio' && !n.checked));
  const scrollers = [...document.querySelectorAll('body *')].filter((n) =>
    /auto|scroll/.test(getComputedStyle(n).overflowY) && n.scrollHeight > n.clientHeight
    && !n.querySelector(native));
  const others = [...document.querySelectorAll('[tabindex]')].filter((n) => n.tabIndex >= 0);
  const stops = [...new Set([...controls, ...scrollers, ...others])].filter(shown)
    .sort((a, b) => (a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING ? -1 : 1));
  stops.forEach((n, i) => { n.dataset.stop = String(i); });
  const name = (n) => n.id || n.getAttribute('aria-label') || n.textContent.trim().slice(0, 20);
  return stops.map((n) => `${n.tagName.toLowerCase()} ${name(n)}`);
}"""


async def test_every_control_is_reachable_with_tab_in_an_order_that_follows_the_page(
    mesh: Mesh, page: BrowserPage
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    # A state with every kind of control: a guidance image, ControlNet on, a result grid.
    await upload_guidance(p, png_bytes(64))
    await p.get_by_role("checkbox", name=re.compile("^Enable")).check()
    await fill_request(p, Request(unique("a tram at night"), variants=2))
    await submit(p)
    await wait_for_end(p)

    expected: list[str] = await p.evaluate(FOCUSABLE)
    assert len(expected) > 30
    assert "ol log" in expected  # the event log scrolls: it is a stop of its own
    # From the first control, Tab visits every other one, in the order of the page.
    await p.locator("[data-stop='0']").focus()
    reached = [expected[0]]
    for _ in range(len(expected) + 5):
        await p.keyboard.press("Tab")
        stop = await p.evaluate("() => document.activeElement.dataset.stop ?? null")
        if stop is None:
            break  # past the last control (the browser's own UI)
        reached.append(expected[int(stop)])
    assert reached == expected
    assert page.errors == []


async def test_the_controlnet_panel_prices_checks_and_sends_its_settings(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await open_app(p, mesh.http_url, mesh.key)
    sent = generate_bodies(p)
    kind = p.get_by_role("combobox", name="Type")
    weight = p.get_by_role("slider", name=re.compile("^Weight"))
    await expect(kind).to_be_disabled()
    await expect(weight).to_be_disabled()
    await expect(p.locator("#cn-hint")).to_have_text(re.compile("tiny-sd offers: canny, depth"))
    # Only what the model has is offered as such.
    await expect(kind.locator("option[value=recoloring]")).to_have_text(
        "recoloring (not on this model)"
    )

    await p.get_by_role("checkbox", name=re.compile("^Enable")).check()
    await expect(kind).to_be_enabled()
    # Without a reference image the server says why, under the panel.
    await expect(p.locator("#err-controlnet")).to_contain_text("needs a reference guidance image")
    await expect(p.locator("#cost-state")).to_have_text("1 field to fix")
    await upload_guidance(p, png_bytes(64))
    await expect(p.locator("#err-controlnet")).to_be_hidden()
    await expect(p.locator("#bd-cn")).to_have_text("+1¢")

    # A type the model lacks: refused by the estimate, named under the select.
    await kind.select_option("recoloring")
    await expect(p.locator("#err-controlnet\\.name")).to_contain_text(
        "model tiny-sd has no recoloring ControlNet"
    )
    await expect(kind).to_have_attribute("aria-invalid", "true")
    await kind.select_option("canny")
    await expect(p.locator("#err-controlnet\\.name")).to_be_hidden()

    # The weight slider moves with the keyboard and shows its value.
    await weight.focus()
    for _ in range(4):
        await p.keyboard.press("ArrowLeft")
    await expect(p.locator("#cn-weight-out")).to_have_text("0.80")

    await fill_request(p, Request(unique("a bridge in the fog"), variants=1))
    job_id = await submit(p)
    await wait_for_end(p)
    assert sent[-1]["controlnet"] == {"name": "canny", "weight": 0.8}
    assert len(await cards(p)) == 1
    # The estimate shown is what the run was charged: 0.012¢ of pixels, +1¢ for the ControlNet
    # and +0.5¢ for the guidance image, rounded up.
    job = await api_job(mesh, job_id)
    assert job["status"] == "completed" and job["cost_cents"] == 2
    await expect(p.locator("#cost-cents")).to_have_text("2")
    await expect(p.locator("#run-cost")).to_have_text("charged 2¢")
    await p.screenshot(path=str(artifacts_dir / "page-controlnet.png"), full_page=True)
    # The estimates the server refused while the panel was incomplete, and nothing else.
    assert page.errors and all(refused_estimate(e) for e in page.errors), page.errors


async def test_without_a_stored_key_the_page_asks_for_one(
    mesh: Mesh, page: BrowserPage, artifacts_dir: Path
) -> None:
    p = page.page
    await p.goto(mesh.http_url)
    key_input = p.locator("#api-key")
    await expect(key_input).to_be_visible()
    await expect(key_input).to_have_accessible_name("API key")
    await expect(key_input).to_be_focused()
    await expect(p.locator("#app")).to_be_hidden()
    assert await axe_violations(p) == []
    await p.screenshot(path=str(artifacts_dir / "page-key-prompt.png"), full_page=True)

    # Not a key at all: said at once, nothing sent.
    await key_input.fill("hunter2")
    await key_input.press("Enter")
    await expect(p.locator("#key-error")).to_contain_text("That is not an API key")

    # A key of the right shape that the server does not know: refused, asked again.
    unknown = "igk_" + "x" * 40
    await key_input.fill(unknown)
    await key_input.press("Enter")
    await expect(p.locator("#key-error")).to_contain_text(
        "The server refused the key igk_xxxxxxxx…"
    )
    await expect(p.locator("#app")).to_be_hidden()
    await expect(key_input).to_have_value("")

    # The real key (pasted as the URL `make run` prints): the page works, and keeps it.
    await key_input.fill(f"{mesh.http_url}/#key={mesh.key}")
    await p.get_by_role("button", name="Use key").click()
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    await expect(p.locator("#key-status")).to_have_text(f"key {mesh.key[:12]}…")
    assert await p.evaluate("() => sessionStorage.getItem('imagegen.api_key')") == mesh.key
    await p.reload()
    await expect(p.locator("#cost-state")).to_have_text("up to date")
    assert await p.locator("#key-panel").is_hidden()

    # Forgotten: asked for again, and the tab holds no key.
    await p.get_by_role("button", name="Forget key").click()
    await expect(key_input).to_be_visible()
    await expect(p.locator("#key-error")).to_contain_text("The key was forgotten")
    assert await p.evaluate("() => sessionStorage.getItem('imagegen.api_key')") is None
    # The only failures were the unknown key's refusal (and the console's line about it).
    assert page.errors and all("401" in e for e in page.errors), page.errors
