"""Drive the real headless Chromium through Selenium and the system chromedriver.

Debian's ``chromium`` and ``chromium-driver`` packages give the browser and a driver
of the same version. Selenium is handed the driver's path, so it never starts
Selenium Manager (which would try to download one); ``SE_OFFLINE=1`` says the
same to any Selenium code that would ask it anyway.

``browser()`` always quits the driver (and with it Chromium) and removes its
profile directory, whatever the test did. Tests that need a browser call
``require_browser()`` first: it skips with the reason when there is none.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Long enough for a loaded two-core machine; a wait that succeeds returns at once.
PAGE_LOAD_TIMEOUT = 60


def unavailable_reason() -> str | None:
    """Why no browser can be driven here, or None when one can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


def require_browser() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 1000) -> Iterator[WebDriver]:
    """A headless Chromium with its console log kept; quit on the way out, always."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "1"
    profile = tempfile.mkdtemp(prefix="stockade-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root, where Chromium's own sandbox refuses to start
        "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MiB
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",  # no network to reach, and nothing to update
        "--disable-component-update",
        "--disable-sync",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: WebDriver, expected: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The SEVERE console entries since the last read of the log, less those matching
    one of the ``expected`` patterns (re.search on the message).

    Chromium counts a fetch answered 4xx/5xx, or not answered at all, as a SEVERE
    entry of source ``network``: a test that provokes one says so in ``expected``.
    """
    patterns = [re.compile(p) for p in expected]
    return [
        entry
        for entry in driver.get_log("browser")
        if entry.get("level") == "SEVERE" and not any(p.search(entry.get("message", "")) for p in patterns)
    ]


def screenshot(driver: WebDriver, path: str) -> str:
    """Save a PNG of the whole page (not only the window) at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    size = driver.get_window_size()
    # The window is taller than the page's viewport by the browser's own frame.
    page, viewport = driver.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
    if page > viewport:
        driver.set_window_size(size["width"], size["height"] - viewport + page)
    try:
        if not driver.save_screenshot(path):
            raise OSError(f"could not write the screenshot {path}")
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path
