"""A real browser for the tests: Debian's chromium driven by its chromium-driver (Selenium).

CI installs both with apt (`.ci/run`); there (``CI`` or ``LATENTLENS_REQUIRE_BROWSER`` set) a
missing browser fails the test. Elsewhere the test is skipped, saying what to install.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")
HOW = "apt-get install -y chromium chromium-driver && pip install selenium"


def find_browser() -> tuple[str, str] | str:
    """``(browser, driver)`` paths, or why they cannot be used."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    if browser is None or driver is None:
        return f"no {'chromium' if browser is None else 'chromedriver'} on PATH"
    return browser, driver


def require_browser() -> tuple[str, str]:
    """The browser and driver, else fail (in CI) or skip (elsewhere) with the reason."""
    found = find_browser()
    if isinstance(found, tuple):
        return found
    message = f"a real browser is needed: {found} ({HOW})"
    if os.environ.get("CI") or os.environ.get("LATENTLENS_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def chrome(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver (no network: background services off)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--allow-file-access-from-files",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield d
    finally:
        d.quit()


def wait_for(d: Any, test: Callable[[Any], Any], timeout: float = 20.0) -> Any:
    """Poll ``test(d)`` until it returns something true (or fail with the page's errors)."""
    end = time.monotonic() + timeout
    while True:
        value = test(d)
        if value:
            return value
        if time.monotonic() > end:
            errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
            raise AssertionError(f"timed out on {d.current_url}; console errors: {errors}")
        time.sleep(0.05)


def ready(d: Any) -> bool:
    """The image page has drawn the current state (and not an error)."""
    state = d.find_element("tag name", "body").get_attribute("data-ready")
    assert state != "error", d.find_element("id", "patch-title").text
    return state == "1"


def severe_console_errors(d: Any) -> list[str]:
    """Console errors of the page (a script that threw, a file that did not load)."""
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
