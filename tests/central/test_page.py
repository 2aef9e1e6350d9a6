"""The search page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time

import cv2
import numpy as np
import pytest
from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.blobs import BlobStore
from central.originals import store_original
from central.retention import sweep
from sql.db import make_engine
from sql.migrate import upgrade
from tests.central.conftest import config_for, make_message, tx
from tests.support.broker import free_port


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("page test needs Debian's chromium and chromium-driver (`make system-deps` installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("page test needs selenium (dev extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_page_searches_and_shows_results(tmp_path, tiny_manifest, tiny_model_dir):
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = make_engine(url)
    upgrade(engine)
    cfg = config_for(tmp_path, url, retention={"originals_days": 1, "tokens_days": 10})
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(0)
    now = store.now_us()
    msgs = [make_message(tiny_manifest, rng, seq=i, ts_us=now - i, line="l3") for i in range(12)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, now) for m in msgs])
    blobs = BlobStore(cfg.originals.root)
    for i, m in enumerate(msgs[:11]):
        body = cv2.imencode(".jpg", np.full((64, 64, 3), 20 * i, np.uint8))[1].tobytes()
        with Session(engine) as s:
            store_original(s, blobs, cfg.retention, m.frame_id.hex(), body, hashlib.sha256(body).hexdigest(), 1 << 20)
    # one original expired by policy -> the page must say so
    from sql.models import Original

    with Session(engine) as s, s.begin():
        s.get(Original, msgs[10].frame_id.hex()).stored_us = now - 3 * 86_400_000_000
    sweep(engine, blobs, cfg.retention)
    token = tx(engine, store.create_token, "qa", "viewer")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, engine), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    driver = _chrome()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
        wait = WebDriverWait(driver, 15)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 1)
        driver.find_element(By.ID, "like").send_keys(msgs[0].frame_id.hex())
        driver.find_element(By.ID, "line").send_keys("l3")
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("11")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "results in" in d.find_element(By.ID, "status").text)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == 11  # every other frame of the line
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".thumb img")) == 9)  # 9 originals kept
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('.thumb img')].filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == 9
        assert "original deleted" in driver.find_element(By.ID, "results").text  # the expired one
        assert "no original kept" in driver.find_element(By.ID, "results").text  # msgs[11] never uploaded
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card .dot")) == 3 * 11  # matched-token centroids
        ids = [c.get_attribute("data-frame-id") for c in cards]
        assert msgs[0].frame_id.hex() not in ids and set(ids) <= {m.frame_id.hex() for m in msgs}
    finally:
        driver.quit()
        server.should_exit = True
        th.join(10)
