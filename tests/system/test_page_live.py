"""The page against the running chain (real Mosquitto, central with an ingest worker, a real edge agent whose
upload policy is on_request) in a real headless Chromium: the devices page from what the edge publishes, and
"Request from edge" in a frame's detail, which makes the edge upload the original while the page shows progress.
Screenshots: out/test-artifacts/page/ (tests/support/browser.py)."""

from __future__ import annotations

import pytest

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.browser import cards, chrome, login, shot, wait
from tests.support.stack import Central, edge_config
from tests.support.stack import wait as wait_for


@pytest.fixture
def live(tmp_path, tiny_model_dir):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; `make test` installs Debian's 'mosquitto' package")
    broker = Mosquitto(tmp_path / "broker").start()
    central = Central(tmp_path, tiny_model_dir, broker).start()
    agent = Agent(parse_config(edge_config(tmp_path, tiny_model_dir, broker, central, frames=12)))
    agent.start()
    try:
        yield central, agent
    finally:
        agent.shutdown()
        central.stop()
        broker.stop()


def _cells(driver, device: str) -> dict:
    from selenium.webdriver.common.by import By

    heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#devices thead th")]
    row = driver.find_elements(By.CSS_SELECTOR, f'#devices tbody tr[data-device="{device}"]')
    if not row:
        return {}
    return dict(zip(heads, [td.text for td in row[0].find_elements(By.TAG_NAME, "td")]), _class=row[0].get_attribute("class"))


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
        wait(driver, lambda d: "no original at central" in d.find_element(By.ID, "results-latest").text)
        first = cards(driver, "latest")[0]
        driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{first}"]').click()
        wait(driver, lambda d: d.find_elements(By.ID, "request-original"))
        assert "Central has no original" in driver.find_element(By.ID, "detail-figure").text
        driver.find_element(By.ID, "request-original").click()
        wait(driver, lambda d: "request from edge" in d.find_element(By.ID, "detail-status").text)
        # the edge uploads it; the page polls the progress and then shows the original
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-figure img"), timeout=40)
        wait(driver, lambda d: d.execute_script("const i = document.querySelector('#detail-figure img');"
                                                "return i && i.complete && i.naturalWidth") == 96)
        assert "original kept" in driver.find_element(By.ID, "detail-fields").text
        assert driver.find_elements(By.ID, "download")
        shot(driver, "original-requested")
        driver.find_element(By.ID, "close").click()

        agent.shutdown()  # clean stop: the retained status says offline
        driver.find_element(By.CSS_SELECTOR, 'nav a[data-view="devices"]').click()
        wait(driver, lambda d: _cells(d, "edge-1").get("_class") == "offline", timeout=30)
        assert _cells(driver, "edge-1")["state"] == "offline"
        shot(driver, "devices-offline")

        driver.find_element(By.CSS_SELECTOR, 'nav a[data-view="latest"]').click()
        wait(driver, lambda d: len(cards(d, "latest")) == 12)
        other = cards(driver, "latest")[1]
        driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{other}"]').click()
        wait(driver, lambda d: d.find_elements(By.ID, "request-original"))
        driver.find_element(By.ID, "request-original").click()
        wait(driver, lambda d: "device_offline" in d.find_element(By.ID, "detail-status").text)
        assert "error" in driver.find_element(By.ID, "detail-status").get_attribute("class")
        shot(driver, "original-request-device-offline")
    finally:
        driver.quit()
