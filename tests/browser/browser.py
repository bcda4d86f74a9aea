"""Headless Chromium for the browser tests: Debian's ``chromium`` driven through ``chromium-driver``.

No browser is downloaded: the binaries come from the system (``.ci/run``
installs the Debian packages when they are absent). Without them the tests
are skipped, unless ``EDGEORCH_BROWSER_TESTS=required`` (set by ``.ci/run``)
turns the skip into a failure, so CI can never pass by not running them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB, too little for a renderer
)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (apt-get install chromium chromium-driver)"
    return None


def require_browser() -> None:
    """Skip (or fail, when required) unless Chromium, its driver and Selenium are here."""
    why = _missing()
    if why is None:
        return
    if os.environ.get("EDGEORCH_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required but {why}")
    pytest.skip(why)


def start_chromium(width: int = 1280, height: int = 1000):
    """A fresh headless Chromium (own profile directory) that records the page's console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    profile = Path(tempfile.mkdtemp(prefix="edgeorch-chromium-"))
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(shutil.which("chromedriver") or "chromedriver")
    )
    driver.profile_dir = profile
    return driver


def stop_chromium(driver) -> None:
    """Quit the browser and remove its profile."""
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def console_errors(driver) -> list[dict]:
    """Console entries at SEVERE level since the last call (the log is drained on read)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
