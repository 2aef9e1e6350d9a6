"""The page against the running chain (real Mosquitto, central with an ingest worker, a real edge agent whose
upload policy is on_request) in a real headless Chromium: the devices page from what the edge publishes, and
"Request from edge" in a frame's detail, which makes the edge upload the original while the page shows progress.
Screenshots: out/test-artifacts/page/ (tests/support/browser.py)."""

from __future__ import annotations

import pytest

from tests.support.browser import cards, chrome, login, shot, text_of, wait
from tests.support.stack import running_chain
from tests.support.stack import wait as wait_for


@pytest.fixture
def live(tmp_path, tiny_model_dir):
    with running_chain(tmp_path, tiny_model_dir) as (_broker, central, agent):
        yield central, agent


def _cells(driver, device: str) -> dict:
    """The device's row of the devices table, {column heading: text, "_class": row class}; {} while absent. Read in
    one script: the table is rebuilt every 5 s."""
    return driver.execute_script("""
        const heads = [...document.querySelectorAll('#devices thead th')].map(h => h.innerText.trim());
        const row = document.querySelector(`#devices tbody tr[data-device="${arguments[0]}"]`);
        if (!row) return {};
        const out = {_class: row.className};
        [...row.querySelectorAll('td')].forEach((td, i) => { out[heads[i]] = td.innerText.trim(); });
        return out;""", device)


def test_devices_page_and_original_requested_from_the_edge(live):
    from selenium.webdriver.common.by import By

    central, agent = live
    wait_for(lambda: central.frames() >= 12, 60, "12 frames at central")
    driver = chrome()
    try:
        login(driver, central.base, central.tokens["admin"], view="devices")
        # the edge's stats arrive every 0.5 s; the page refreshes every 5 s
        wait(driver, lambda d: _cells(d, "edge-1").get("frames/s", "–") != "–", timeout=30)
        row = _cells(driver, "edge-1")
        assert row["_class"] == "online" and row["state"] == "online" and row["site"] == "plant-a"
        assert row["backlog"].isdigit() and row["oldest unconfirmed"].endswith(" s")  # protocol 2 fields
        assert row["inference"].endswith(" ms") and row["drops"].isdigit() and "cam-1" in row["cameras"]
        assert "ago" in row["last seen"]
        shot(driver, "devices-online")

        driver.find_element(By.CSS_SELECTOR, 'nav a[data-view="latest"]').click()
        wait(driver, lambda d: len(cards(d, "latest")) == 12)
        wait(driver, lambda d: "no original at central" in text_of(d, "results-latest"))
        first = wait(driver, lambda d: (cards(d, "latest") or [None])[0])  # what one look saw (views re-list)
        driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{first}"]').click()
        wait(driver, lambda d: d.find_elements(By.ID, "request-original"))
        assert "Central has no original" in text_of(driver, "detail-figure")
        driver.find_element(By.ID, "request-original").click()
        wait(driver, lambda d: "request from edge" in text_of(d, "detail-status"))
        # the edge uploads it; the page polls the progress and then shows the original
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-figure img"), timeout=40)
        wait(driver, lambda d: d.execute_script("const i = document.querySelector('#detail-figure img');"
                                                "return i && i.complete && i.naturalWidth") == 96)
        assert "original kept" in text_of(driver, "detail-fields")
        assert driver.find_elements(By.ID, "download")
        shot(driver, "original-requested")
        driver.find_element(By.ID, "close").click()

        agent.shutdown()  # clean stop: the retained status says offline
        driver.find_element(By.CSS_SELECTOR, 'nav a[data-view="devices"]').click()
        wait(driver, lambda d: _cells(d, "edge-1").get("_class") == "offline", timeout=30)
        assert _cells(driver, "edge-1")["state"] == "offline"
        shot(driver, "devices-offline")

        driver.find_element(By.CSS_SELECTOR, 'nav a[data-view="latest"]').click()
        other = wait(driver, lambda d: (lambda c: c[1] if len(c) == 12 else None)(cards(d, "latest")))
        driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{other}"]').click()
        wait(driver, lambda d: d.find_elements(By.ID, "request-original"))
        driver.find_element(By.ID, "request-original").click()
        wait(driver, lambda d: "device_offline" in text_of(d, "detail-status"))
        assert "error" in driver.find_element(By.ID, "detail-status").get_attribute("class")
        shot(driver, "original-request-device-offline")
    finally:
        driver.quit()
