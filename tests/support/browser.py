"""A real headless Chromium for the page tests (Debian's chromium + chromium-driver, driven by selenium).

Screenshots go under ``out/test-artifacts/page/`` (git-ignored; ``TOKENLINE_TEST_ARTIFACTS`` moves them), so a
person can look at the views a run produced. Chromium runs in the Asia/Tokyo time zone, so "one time zone
everywhere" is tested against a browser whose local zone is not UTC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

import pytest

from tests.support.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TOKENLINE_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts")) / "page"
BROWSER_TZ = "Asia/Tokyo"  # UTC+9, no daylight saving time


def chrome(download_dir: Path | None = None):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("page test needs Debian's chromium and chromium-driver (`make test` installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("page test needs selenium (dev extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    if download_dir is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                               "download.prompt_for_download": False})
    # Chromium leaves a singleton folder in TMPDIR (/tmp/org.chromium.Chromium.*) behind on every start: give each
    # browser a temporary folder of its own, removed with the driver
    tmp = tempfile.mkdtemp(prefix="tokenline-chromium-")
    opts.add_argument(f"--user-data-dir={tmp}/profile")
    browser = webdriver.Chrome(service=Service(driver, env=dict(os.environ, TZ=BROWSER_TZ, TMPDIR=tmp)), options=opts)
    weakref.finalize(browser, shutil.rmtree, tmp, True)
    return browser


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


@contextlib.contextmanager
def serving(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


def wait(driver, cond, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(cond)


def login(driver, base: str, token: str, view: str = "search") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/#{view}")
    driver.execute_script("localStorage.clear()")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
    wait(driver, lambda d: d.find_element(By.ID, "me").text != "")
    # the page's start ends by naming the models (after the filter menus and the features' start hooks): until
    # then a menu may be rebuilt under a test that picks from it (a stale element)
    wait(driver, lambda d: "model(s)" in text_of(d, "status-search"))


def texts(driver, css: str) -> list:
    """The text of every element matching ``css``, read in one script (menus are rebuilt on change: no stale
    element between finding and reading)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim())",
                                 css)


def text_of(driver, element_id: str) -> str:
    """The text of the element with this id ("" when absent), read in one script: views re-render parts of the
    page (the detail after an action), so a found element may be replaced before its text is read."""
    return driver.execute_script("const e = document.getElementById(arguments[0]);"
                                 "return e ? e.innerText.replace(/\\t/g, ' ') : ''", element_id)


def cards(driver, view: str) -> list:
    """The frame ids of the cards shown in ``view``'s grid, in order."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(c => c.dataset.frameId)",
                                 f"#results-{view} .card")
