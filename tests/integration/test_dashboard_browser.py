"""The dashboard in a real headless Chromium: a registration goes online, its request counter
moves with requests through the tunnel, and a screenshot is saved."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.integration.harness import (
    ClientFactory,
    PythonBackend,
    ServerFactory,
    http_request,
    wait_until,
)

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_TIMEOUT = 20.0  # seconds for the page (polling every 2 s) to show a change


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium driven by the system chromedriver, in a fresh profile."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed in CI (scripts/bootstrap)")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def cell_text(driver: webdriver.Chrome, registration_id: str, column: str) -> str | None:
    """A cell of the registration's row, or None while the page has no such row (or is
    redrawing it: the page replaces its rows at each poll, which makes a found cell stale)."""
    try:
        cell = driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{registration_id}"] td.{column}')
        return str(cell.text)
    except (NoSuchElementException, StaleElementReferenceException):
        return None


async def page_shows(
    driver: webdriver.Chrome, registration_id: str, column: str, expected: str
) -> None:
    """Wait until the row's ``column`` reads ``expected`` (the page polls on its own)."""

    def showing() -> bool:
        return cell_text(driver, registration_id, column) == expected

    try:
        await wait_until(showing, PAGE_TIMEOUT, what=f"{column} {expected!r}", poll=0.2)
    except AssertionError:
        problem = driver.find_element(By.ID, "problem").text
        seen = cell_text(driver, registration_id, column)
        raise AssertionError(f"page shows {column}={seen!r}, problem {problem!r}") from None


async def test_dashboard_shows_a_registration_come_online_and_count_requests(
    browser: webdriver.Chrome,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    tmp_path: Path,
) -> None:
    server = await server_factory()
    client = await client_factory(server, python_backend.port, start=False)
    rid = client.registration_id
    # The token travels in the fragment, which the browser never sends to the server.
    url = f"http://127.0.0.1:{server.admin_port}/dashboard#token={server.admin_token}"
    await trio.to_thread.run_sync(browser.get, url)
    assert "#token" not in str(browser.current_url), "the page keeps the token out of the URL"
    await page_shows(browser, rid, "state", "offline")
    await page_shows(browser, rid, "requests", "0")

    await client.start()
    await page_shows(browser, rid, "state", "online")
    for _ in range(5):
        response = await http_request(server.http_port, client.host, target="/hello")
        assert response.status == 200
    await page_shows(browser, rid, "requests", "5")
    await page_shows(browser, rid, "policy", "\u2013")  # the en dash of an empty cell
    reply = await server.control(f"POLICY {rid} rateLimit=50 allow=10.0.0.0/8")
    assert reply["success"] is True, reply
    await page_shows(browser, rid, "policy", "allow=10.0.0.0/8, rateLimit=50")

    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 1000
    print(f"dashboard screenshot: {screenshot}")
