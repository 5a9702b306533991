"""What the page tests do to the page, in a user's terms: open it with a key, fill in a request,
wait for the run to end, read the variants the grid shows, and check the page with axe-core.

axe-core is vendored under tests/browser/vendor/ (a test-only asset, never served) and injected
into the page under test.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.async_api import FilePayload, Page, expect
except ImportError:  # the test modules import Page and expect from here
    if os.environ.get("IMAGEGEN_REQUIRE_BROWSER"):
        raise
    pytest.skip(
        "the playwright package is not installed (requirements/dev.txt)", allow_module_level=True
    )

__all__ = ["Page", "expect"]  # for the test modules, which get them from here

AXE_JS = Path(__file__).parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
# How long a 64x64, 4-step run may take end to end, queueing included.
RUN_MS = 60_000
BLOCKING_IMPACTS = ("serious", "critical")

# Every violation axe finds: its rule, impact, and the elements it names with why.
AXE_RUN = """async () => {
  const result = await axe.run(document, { resultTypes: ['violations'] });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map((n) => `${n.target.join(' ')}: ${n.failureSummary}`),
  }));
}"""


async def axe_violations(page: Page, impacts: tuple[str, ...] = BLOCKING_IMPACTS) -> list[str]:
    """The page's axe-core violations of these impacts, one readable line per element."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.add_script_tag(path=str(AXE_JS))
    found: list[dict[str, Any]] = await page.evaluate(AXE_RUN)
    return [
        f"{v['id']} ({v['impact']}, {v['help']}): {node}"
        for v in found
        if v["impact"] in impacts
        for node in v["nodes"]
    ]


async def open_app(page: Page, base_url: str, key: str) -> None:
    """Opens the page with the key in the fragment, as `make run` prints it, and waits for the
    first cost estimate (the models are loaded and the form is usable then)."""
    await page.goto(f"{base_url}/#key={key}")
    await expect(page.locator("#cost-state")).to_have_text("up to date")


@dataclass(frozen=True)
class Request:
    """What the tests type into the form; None leaves a field as the page set it."""

    prompt: str
    width: int = 64
    height: int = 64
    steps: int = 4
    variants: int = 2
    seed: int | None = None
    cache: str | None = None  # "use", "agnostic", "refresh", "off"


async def fill_request(page: Page, request: Request) -> None:
    await page.get_by_role("textbox", name="Prompt", exact=True).fill(request.prompt)
    await page.get_by_role("spinbutton", name="Width px").fill(str(request.width))
    await page.get_by_role("spinbutton", name="Height px").fill(str(request.height))
    await page.get_by_role("spinbutton", name="Steps").fill(str(request.steps))
    await page.get_by_role("spinbutton", name="Variants").fill(str(request.variants))
    if request.seed is not None:
        await page.get_by_role("checkbox", name="Random").uncheck()
        await page.get_by_role("spinbutton", name="Seed").fill(str(request.seed))
    if request.cache is not None:
        await page.locator(f"input[name=cache][value={request.cache}]").check()
    await expect(page.locator("#cost-state")).to_have_text("up to date")


async def wait_for_end(page: Page, status: str = "completed", timeout_ms: int = RUN_MS) -> None:
    """Waits until the run's status pill shows `status` and the stream is closed."""
    await expect(page.locator("#run-status")).to_have_text(status, timeout=timeout_ms)
    await expect(page.locator("#stream-state")).to_have_text("closed")


async def run_id(page: Page) -> str:
    return (await page.locator("#run-id").inner_text()).strip()


async def submit(page: Page) -> str:
    """Clicks Generate; the id of the run the page then shows (a new one)."""
    before = await run_id(page) if await page.locator("#run-body").is_visible() else ""
    await page.get_by_role("button", name="Generate", exact=True).click()
    await expect(page.locator("#run-id")).not_to_have_text(before or "\0")
    await expect(page.locator("#run-id")).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))
    return await run_id(page)


@dataclass(frozen=True)
class Card:
    """A variant as its card in the grid shows it."""

    variant_index: int
    sha256: str
    short_sha256: str
    clip: str
    badges: tuple[str, ...]
    download_url: str


async def cards(page: Page) -> list[Card]:
    """The grid's cards in the order shown."""
    shown: list[dict[str, Any]] = await page.locator("#grid .card").evaluate_all(
        """(cards) => cards.map((card) => {
          const sha = card.querySelector('[data-sha256]');
          const scores = Object.fromEntries([...card.querySelectorAll('.scores dt')]
            .map((dt) => [dt.textContent, dt.nextElementSibling.textContent]));
          return {
            badges: [...card.querySelectorAll('.badges .pill')].map((p) => p.textContent),
            sha256: sha ? sha.dataset.sha256 : '', short: sha ? sha.textContent : '',
            clip: scores.CLIP || '', href: card.querySelector('a.dl').href,
          };
        })"""
    )
    return [
        Card(
            variant_index=int(c["badges"][0].lstrip("#")),
            sha256=c["sha256"],
            short_sha256=c["short"],
            clip=c["clip"],
            badges=tuple(c["badges"]),
            download_url=c["href"],
        )
        for c in shown
    ]


def png_file(data: bytes, name: str = "guide.png") -> FilePayload:
    """A PNG as a file chooser or file input takes it."""
    return {"name": name, "mimeType": "image/png", "buffer": data}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def event_log(page: Page) -> list[tuple[str, str, str]]:
    """The live event panel's lines: (event id, event name, text); the page's own lines
    ("client") have no id."""
    rows: list[list[str]] = await page.locator("#log li[data-kind]").evaluate_all(
        """(items) => items.map((li) => [
          li.querySelector('.ev-id').textContent,
          li.querySelector('.ev-name').textContent,
          li.querySelector('.ev-text').textContent,
        ])"""
    )
    return [(r[0], r[1], r[2]) for r in rows]
