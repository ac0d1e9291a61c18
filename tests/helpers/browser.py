"""Headless Chromium for the tests that look at a page (Debian's `chromium` and `chromium-driver`,
which tests/run.sh installs), driven through selenium:

    with headless_chromium() as browser:
        browser.get(url)
        browser.save_screenshot(str(path))
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest

INSTALL_HINT = "apt-get install -y --no-install-recommends chromium chromium-driver (tests/run.sh does it)"


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser_binary, driver_binary = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser_binary and driver_binary):
        pytest.fail(f"headless Chromium missing: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_binary
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_binary), options=options)
    try:
        yield browser
    finally:
        browser.quit()
