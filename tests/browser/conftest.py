"""Browser tests: Playwright (the Python package) driving the system's Chromium, Debian's
`chromium` (Playwright's own browser downloads are never used). Without a Chromium, or without
the package, these tests skip, unless IMAGEGEN_REQUIRE_BROWSER is set (the CI sets it): then
that is a failure. Screenshots go to ARTIFACTS_DIR (default tests/artifacts/, git-ignored); a
test that fails leaves one of its page there too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parents[2]
# Looked up on PATH (CHROMIUM may name another executable).
CHROMIUM_NAMES = ("chromium", "chromium-browser")
VIEWPORT = {"width": 1360, "height": 900}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("IMAGEGEN_REQUIRE_BROWSER"):
        pytest.fail(f"{reason}, and IMAGEGEN_REQUIRE_BROWSER is set")
    pytest.skip(f"{reason} (set IMAGEGEN_REQUIRE_BROWSER to make this a failure)")


def chromium_path() -> str | None:
    configured = os.environ.get("CHROMIUM")
    if configured:
        return shutil.which(configured)
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    folder = Path(os.environ.get("ARTIFACTS_DIR") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The browser's executable; checked before anything else of a test here is set up (an
    autouse fixture comes first), so that a skip starts no mesh."""
    path = chromium_path()
    if path is None and os.environ.get("CHROMIUM"):
        _unavailable(f"CHROMIUM={os.environ['CHROMIUM']} is not an executable")
    if path is None:
        _unavailable(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (requirements/dev.txt)")
    return path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    # Root in a container: Chromium's sandbox needs user namespaces it may not have.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=[*args, "--disable-dev-shm-usage"]
        )
        yield launched
        await launched.close()


@dataclass
class BrowserPage:
    """A page of its own context, with what went wrong in it: console errors, uncaught
    exceptions, and requests that failed or answered 4xx/5xx."""

    page: Any
    errors: list[str] = field(default_factory=list)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest_asyncio.fixture(loop_scope="session")
async def page(
    browser: Any, request: pytest.FixtureRequest, artifacts_dir: Path
) -> AsyncIterator[BrowserPage]:
    context = await browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    opened = BrowserPage(await context.new_page())

    def console(message: Any) -> None:
        if message.type == "error":
            opened.errors.append(f"console: {message.text}")

    def response(answer: Any) -> None:
        if answer.status >= 400:
            opened.errors.append(f"HTTP {answer.status}: {answer.request.method} {answer.url}")

    opened.page.on("console", console)
    opened.page.on("pageerror", lambda error: opened.errors.append(f"uncaught: {error}"))
    opened.page.on("requestfailed", lambda r: opened.errors.append(f"failed: {r.url}"))
    opened.page.on("response", response)
    try:
        yield opened
    finally:
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            shot = artifacts_dir / f"{request.node.name}-failure.png"
            await opened.page.screenshot(path=str(shot), full_page=True)
        await context.close()
