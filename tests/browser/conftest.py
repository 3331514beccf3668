"""A real browser: Debian's Chromium, driven by Playwright (sync API), once per module.

Nothing downloads a browser: Playwright only drives /usr/bin/chromium, which
`./just test` installs with apt when it is missing. Without it every browser
test fails and says so; none is skipped.
"""

from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser tests need Debian's Chromium at {CHROMIUM}: "
            "`apt-get install chromium` (./just test does it when apt can)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture(autouse=True)
def no_task_left():
    """The browser tests are synchronous (Playwright's sync API runs its own event loop), so
    they have no asyncio tasks to leak: this replaces the root conftest's async check."""
    yield
