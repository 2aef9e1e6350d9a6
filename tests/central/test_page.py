"""The page in a real headless Chromium (tests/support/browser.py): search, latest frames, the detail, the API docs.

Each test saves screenshots of what it checked (out/test-artifacts/page/, git-ignored). The devices page and
"request from edge" need a running edge: tests/system/test_page_live.py.
"""

from __future__ import annotations

import hashlib

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
from tests.central.conftest import built_set, config_for, make_message, tx
from tests.support.browser import BROWSER_TZ, cards, chrome, login, serving, shot, text_of, texts, wait

T0 = 1_700_000_000_000_000  # 2023-11-14 22:13:20 UTC = 2023-11-15 07:13:20 in Tokyo


def jpeg(value: int, w: int = 96, h: int = 64) -> bytes:
    img = np.full((h, w, 3), value, np.uint8)
    cv2.rectangle(img, (10, 10), (30, 30), (0, 0, 255), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _central(tmp_path):
    """(config, engine) of a central on a fresh SQLite whose originals are kept for 5,000 days."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = make_engine(url)
    upgrade(engine)
    return config_for(tmp_path, url, retention={"originals_days": 5000, "tokens_days": 200000}), engine


def _keep_originals(cfg, engine, msgs) -> None:
    """Store the original jpeg(30 * i) of each message i."""
    blobs = BlobStore(cfg.originals.root)
    for i, m in enumerate(msgs):
        body = jpeg(30 * i)
        with Session(engine) as s:
            store_original(s, blobs, cfg.retention, m.frame_id.hex(), body, hashlib.sha256(body).hexdigest(), 1 << 20)


@pytest.fixture
def site(tmp_path, tiny_manifest, tiny_model_dir):
    """35 frames (30 on line l3, camera c1; 5 on line l4, camera c2) one second apart from T0, 11 originals kept,
    one deleted by retention; a second model with the same name and no frames; viewer and admin tokens."""
    from tests.support.tiny_model import build_tiny_model

    cfg, engine = _central(tmp_path)
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    twin = build_tiny_model(tmp_path / "twin", size=32, patch=8, dim=384, seed=7, name=tiny_manifest.name)
    from tokenline.manifest import Manifest

    tx(engine, store.register_model, Manifest.from_file(twin), twin)
    rng = np.random.default_rng(0)
    center = rng.standard_normal(384).astype(np.float32)
    msgs = [make_message(tiny_manifest, rng, seq=i, ts_us=T0 + i * 1_000_000, line="l3", center=center)
            for i in range(30)]
    msgs += [make_message(tiny_manifest, rng, seq=i, ts_us=T0 + (30 + i) * 1_000_000, line="l4", camera="c2",
                          center=center) for i in range(5)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in msgs])
    blobs = BlobStore(cfg.originals.root)
    for i, m in enumerate(msgs[:12]):
        body = jpeg(20 * i)
        with Session(engine) as s:
            store_original(s, blobs, cfg.retention, m.frame_id.hex(), body, hashlib.sha256(body).hexdigest(), 1 << 20)
    from sql.models import Original

    with Session(engine) as s, s.begin():
        s.get(Original, msgs[11].frame_id.hex()).stored_us -= 5001 * 86400 * 10**6  # past its days: the sweep deletes it
    sweep(engine, blobs, cfg.retention)
    toks = {r: tx(engine, store.create_token, f"qa-{r}", r) for r in ("viewer", "admin")}
    return cfg, engine, msgs, toks


def test_search_view(site, tmp_path):
    """Models told apart, filters as menus, the query beside the results, paging by scrolling, thumbnails and
    matched regions, an error that clears the results, a search by an uploaded image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg, engine, msgs, toks = site
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, toks["viewer"])
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
            labels = texts(driver, "#model option")
            assert labels[0].split(" · ")[0] == labels[1].split(" · ")[0]  # same name ...
            assert labels[0].split(" · ")[1] != labels[1].split(" · ")[1]  # ... told apart by the short hash
            assert "35 frames" in labels[0] and "0 frames" in labels[1]
            assert Select(driver.find_element(By.ID, "model")).first_selected_option.text == labels[0]  # has frames
            assert texts(driver, "#site option") == ["all", "s1"]
            assert texts(driver, "#line option") == ["all", "l3", "l4"]
            Select(driver.find_element(By.ID, "line")).select_by_value("l3")
            assert texts(driver, "#camera option") == ["all", "c1 (30)"]  # cameras of that line

            driver.find_element(By.ID, "like").send_keys(msgs[0].frame_id.hex())
            driver.find_element(By.ID, "go").click()
            wait(driver, lambda d: "results" in text_of(d, "status-search"))
            assert len(cards(driver, "search")) == 24  # the first page
            assert driver.find_element(By.ID, "query-panel").is_displayed()
            assert driver.find_elements(By.CSS_SELECTOR, "#query-view .card img")  # the query frame beside them
            driver.execute_script("document.getElementById('more-search').scrollIntoView()")  # infinite scroll
            wait(driver, lambda d: len(cards(d, "search")) == 29)
            ids = cards(driver, "search")
            assert len(set(ids)) == 29 and msgs[0].frame_id.hex() not in ids
            assert set(ids) <= {m.frame_id.hex() for m in msgs[:30]}  # line l3 only
            assert not driver.find_element(By.ID, "more-search").is_displayed()
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-search .thumb img")) == 10)
            loaded = driver.execute_script("return [...document.querySelectorAll('#results-search .thumb img')]"
                                           ".filter(i => i.complete && i.naturalWidth > 0).length")
            assert loaded == 10
            res = text_of(driver, "results-search")
            assert "original deleted (retention)" in res and "no original at central" in res
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-search .thumb .ring")) >= 10)
            assert "UTC" in driver.find_element(By.CSS_SELECTOR, "#results-search .card time").text
            shot(driver, "search")

            driver.find_element(By.ID, "like").clear()
            driver.find_element(By.ID, "q").send_keys("a scratch")  # this model has no text tower
            driver.find_element(By.ID, "go").click()
            wait(driver, lambda d: "error" in d.find_element(By.ID, "status-search").get_attribute("class"))
            assert "no text tower" in text_of(driver, "status-search")
            assert cards(driver, "search") == []  # the error cleared the stale results
            shot(driver, "search-error")

            driver.find_element(By.ID, "q").clear()
            query = tmp_path / "query.png"
            cv2.imwrite(str(query), np.full((40, 60, 3), 128, np.uint8))
            driver.find_element(By.ID, "image").send_keys(str(query))
            driver.find_element(By.ID, "go").click()
            wait(driver, lambda d: len(cards(d, "search")) == 24)
            assert driver.execute_script("const i = document.getElementById('query-image'); "
                                         "return i && i.complete && i.naturalWidth") == 60
            driver.execute_script("document.getElementById('more-search').scrollIntoView()")
            wait(driver, lambda d: len(cards(d, "search")) == 30)  # an image query pages too (re-sent with cursor)
            shot(driver, "search-image")
        finally:
            driver.quit()


def test_latest_view_and_one_time_zone(site):
    """The latest frames, newest first, with the filters; every time shown and entered in one zone, named."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg, engine, msgs, toks = site
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, toks["viewer"], view="latest")
            wait(driver, lambda d: len(cards(d, "latest")) == 35)  # 48 per page: all of them
            # the token field's change event again with the same token (as when it loses focus after the entry)
            # does not start the page over: that rebuilt the filter menus under a test picking from them
            assert driver.execute_script("""
                let calls = 0;
                const f = window.fetch;
                window.fetch = (...a) => { if (String(a[0]).includes('/v1/me')) calls++; return f(...a); };
                document.getElementById('token').dispatchEvent(new Event('change'));
                window.fetch = f;
                return calls""") == 0
            assert cards(driver, "latest") == [m.frame_id.hex() for m in reversed(msgs)]
            first = driver.find_element(By.CSS_SELECTOR, "#results-latest .card time").text
            assert first == "2023-11-14 22:13:54.000 UTC"  # T0 + 34 s
            assert text_of(driver, "tzname") == "UTC"
            # a new listing keeps the shown cards (marked busy) until its first page replaces them: no empty grid
            # in between, although every request now takes 300 ms more
            driver.execute_script("""
                const g = document.getElementById('results-latest');
                window.seen = {least: g.children.length, busy: false};
                new MutationObserver(() => {
                  window.seen.least = Math.min(window.seen.least, g.children.length);
                  window.seen.busy = window.seen.busy || g.getAttribute('aria-busy') === 'true';
                }).observe(g, {childList: true, attributes: true});
                window.plainFetch = window.fetch;
                window.fetch = (...a) => new Promise((r) => setTimeout(r, 300)).then(() => window.plainFetch(...a));""")
            Select(driver.find_element(By.ID, "camera")).select_by_value("c2")
            wait(driver, lambda d: len(cards(d, "latest")) == 5)
            assert driver.execute_script("window.fetch = window.plainFetch; return window.seen") == \
                {"least": 5, "busy": True}
            assert driver.find_element(By.ID, "results-latest").get_attribute("aria-busy") is None
            Select(driver.find_element(By.ID, "camera")).select_by_value("")
            wait(driver, lambda d: len(cards(d, "latest")) == 35)
            # From 22:13:40 UTC: the 15 frames from T0 + 20 s
            driver.execute_script("const e = document.getElementById('since'); e.value = '2023-11-14T22:13:40';"
                                  "e.dispatchEvent(new Event('change', {bubbles: true}))")
            wait(driver, lambda d: len(cards(d, "latest")) == 15)
            shot(driver, "latest-utc")
            Select(driver.find_element(By.ID, "tz")).select_by_value("local")
            assert text_of(driver, "tzname") == BROWSER_TZ
            assert driver.find_element(By.ID, "since").get_attribute("value") == "2023-11-15T07:13:40"  # same instant
            assert driver.find_element(By.CSS_SELECTOR, "#results-latest .card time").text == \
                f"2023-11-15 07:13:54.000 {BROWSER_TZ}"
            driver.execute_script("document.getElementById('filters').dispatchEvent(new Event('change'))")
            wait(driver, lambda d: "15 frames" in text_of(d, "status-latest"))
            assert len(cards(driver, "latest")) == 15  # the same filter, entered in Tokyo time
            shot(driver, "latest-local-time")
            driver.execute_script("const e = document.getElementById('until'); e.value = '2023-11-15T07:13:00';"
                                  "e.dispatchEvent(new Event('change', {bubbles: true}))")  # before From
            wait(driver, lambda d: "error" in d.find_element(By.ID, "status-latest").get_attribute("class"))
            assert "until_us" in text_of(driver, "status-latest") and cards(driver, "latest") == []
        finally:
            driver.quit()


def test_detail_view(site, tmp_path):
    """Every field, the original with the matched regions, download, legal hold (admins), find frames like this."""
    from selenium.webdriver.common.by import By

    cfg, engine, msgs, toks = site
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with serving(create_app(cfg, engine)) as base:
        driver = chrome(downloads)
        try:
            login(driver, base, toks["admin"])
            driver.find_element(By.ID, "like").send_keys(msgs[5].frame_id.hex())
            driver.find_element(By.ID, "go").click()
            wait(driver, lambda d: len(cards(d, "search")) == 24)
            target = msgs[3].frame_id.hex()
            wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f'#results-search .card[data-frame-id="{target}"] img'))
            driver.find_element(By.CSS_SELECTOR, f'#results-search .card[data-frame-id="{target}"]').click()
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-figure img"))
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detail-figure .ring")) == 3)
            fields = text_of(driver, "detail-fields")
            for want in (f"frame id {target}", "site s1", "line l3", "camera c1", "device d1", "seq 3",
                         "token_dtype int8", "captured 2023-11-14 22:13:23.000 UTC", "legal hold no",
                         "original kept", "score ", "match: token"):
                assert want in fields, want
            assert driver.execute_script("return document.querySelector('#detail-figure img').naturalWidth") == 96
            shot(driver, "detail")
            driver.find_element(By.ID, "download").click()
            name = f"s1_l3_c1_20231114T221323000000Z_{target}.jpg"
            wait(driver, lambda d: (downloads / name).exists() and (downloads / name).stat().st_size > 0)
            assert (downloads / name).read_bytes() == jpeg(60)
            driver.find_element(By.ID, "hold").click()
            wait(driver, lambda d: text_of(d, "hold") == "Release legal hold")
            assert "legal hold held" in text_of(driver, "detail-fields")
            assert tx(engine, store.frame_place, target)[3] is True
            driver.find_element(By.ID, "find-like").click()
            wait(driver, lambda d: d.find_element(By.ID, "like").get_attribute("value") == target)
            wait(driver, lambda d: len(cards(d, "search")) == 24 and target not in cards(d, "search"))
        finally:
            driver.quit()


def test_api_docs_work_offline(site):
    """Swagger UI and ReDoc render from central's own assets, and their pages may load nothing from elsewhere
    (a Content-Security-Policy of 'self': ReDoc's sidebar logo on its CDN is refused, never fetched)."""
    from selenium.webdriver.common.by import By

    cfg, engine, msgs, toks = site
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            driver.get(f"{base}/docs")
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
            assert "tokenline central" in driver.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .btn.authorize"))  # the bearer scheme
            shot(driver, "docs-swagger")
            driver.get(f"{base}/redoc")
            wait(driver, lambda d: "/v1/search" in d.find_element(By.TAG_NAME, "body").text, timeout=30)
            shot(driver, "docs-redoc")
            entries = driver.execute_script("return performance.getEntriesByType('resource')"
                                            ".map(e => [e.name, e.responseStatus, e.transferSize])")
            assert any(u == f"{base}/static/docs/redoc.standalone.js" and st == 200 for u, st, _ in entries), entries
            outside = [u for u, _, _ in entries if not u.startswith(base)]
            assert all(st == 0 and size == 0 for u, st, size in entries if u in outside), entries
            refused = " ".join(e["message"] for e in driver.get_log("browser"))
            assert all(u in refused and "Content Security Policy" in refused for u in outside), refused
        finally:
            driver.quit()


# -- anomaly views ---------------------------------------------------------------------------------------------
def _input_to_frame(x: float, y: float, w: int, h: int, tw: int = 32, th: int = 32) -> tuple:
    """A letterboxed model input's (x, y) in [0, 1] -> the frame's (tokenline/preprocess.py, letterbox)."""
    s = min(th / h, tw / w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    ox, oy = (tw - nw) // 2, (th - nh) // 2
    return (x * tw - ox) / nw, (y * th - oy) / nh


@pytest.fixture
def flagged_site(tmp_path):
    """A letterbox model; camera s1/l1/c1 with a reference set of 20 normal frames, 3 normal and 3 odd frames after
    it (scored by backfill; the newest odd one less odd); camera s1/l1/c2 without a set, with a frame that shows the
    first odd frame's defect (its token 3). Originals of the frames after the set; viewer token."""
    from central.anomaly import refsets
    from central.anomaly.scoring import backfill
    from tests.support.anomaly_frames import frame_message, unit, vocabulary
    from tests.support.tiny_model import build_tiny_model
    from tokenline.manifest import Manifest

    cfg, engine = _central(tmp_path)
    mdir = build_tiny_model(tmp_path / "model", size=32, patch=8, dim=384, resize="letterbox")
    man = Manifest.from_file(mdir)
    model = tx(engine, store.register_model, man, mdir)
    rng = np.random.default_rng(5)
    ts = lambda i: T0 + i * 1_000_000  # noqa: E731
    good = [frame_message(man, rng, ts(i), seq=i) for i in range(20)]
    normal = [frame_message(man, rng, ts(20 + i), seq=20 + i) for i in range(3)]
    odd = [frame_message(man, rng, ts(23 + i), seq=23 + i, odd=j) for i, j in enumerate((5, 10, 6))]
    odd[2].summary.tokens[6] = unit(vocabulary()[3] + 0.6 * unit(rng.standard_normal(384)))  # flagged, less odd
    twin = frame_message(man, rng, ts(30), seq=30, camera="c2")
    twin.summary.tokens[3] = unit(odd[0].summary.tokens[5] + 0.05 * unit(rng.standard_normal(384)))
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in good + normal + odd + [twin]])
    built_set(engine, cfg.anomaly, refsets.create_set, name="good", frame_ids=[m.frame_id.hex() for m in good],
              quantile=1.0)
    assert backfill(engine).scored == 26  # the set's camera only
    _keep_originals(cfg, engine, normal + odd + [twin])
    return cfg, engine, {"good": good, "normal": normal, "odd": odd, "twin": twin}, tx(engine, store.create_token, "v", "viewer")


def _scores(engine) -> dict:
    from central.anomaly import queries

    return {a.frame_id: a.public(mask=True) for a in tx(engine, lambda s: queries.list_scores(s, limit=1000))}


def _rect(driver, css: str) -> list:
    """[x, y, width, height] of the first SVG rect matching ``css`` ([] while absent)."""
    return driver.execute_script("const r = document.querySelector(arguments[0]);"
                                 "return r ? ['x', 'y', 'width', 'height'].map(a => +r.getAttribute(a)) : []", css)


def _frame_box(box: list, w: int = 96, h: int = 64) -> list:
    """[x, y, width, height] in the frame of a model-input box, cut to the frame (a letterbox's bars are not in it)."""
    x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in (*_input_to_frame(box[0], box[1], w, h),
                                                       *_input_to_frame(box[2], box[3], w, h)))
    return [x0, y0, x1 - x0, y1 - y0]


def test_flagged_view(flagged_site):
    """The Flagged nav (a reference set exists), each camera's latest flagged frames newest first with score and
    threshold, the anomalous region over the thumbnail mapped from the letterboxed model input, sort by score, the
    filter bar, no normal frame."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg, engine, f, viewer = flagged_site
    scores = _scores(engine)
    odd = [m.frame_id.hex() for m in f["odd"]]
    assert all(scores[i]["flagged"] for i in odd)
    assert not any(scores[m.frame_id.hex()]["flagged"] for m in f["good"] + f["normal"])
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, viewer)
            wait(driver, lambda d: d.find_element(By.ID, "nav-flagged").is_displayed())
            driver.find_element(By.ID, "nav-flagged").click()
            wait(driver, lambda d: "flagged frames" in text_of(d, "status-flagged"))
            # a view may be listed again meanwhile (a filter change, or the page's start showing the view it opens
            # on): every read below takes what one wait saw, never a second look that could fall between two listings
            assert wait(driver, lambda d: cards(d, "flagged")) == odd[::-1]  # newest first, the odd frames only
            badges = wait(driver, lambda d: texts(d, "#results-flagged .card .ascore.anomaly"))
            assert badges == [f"anomaly {scores[i]['score']:.3f} > {scores[i]['threshold']:.3f}" for i in odd[::-1]]
            for i in odd:
                css = f'#results-flagged .card[data-frame-id="{i}"] .thumb rect.anomaly.box'
                rect = wait(driver, lambda d: _rect(d, css))
                assert rect == pytest.approx(_frame_box(scores[i]["region"]["box"]), abs=2e-3)
            assert rect[1] != pytest.approx(scores[i]["region"]["box"][1], abs=0.02)  # letterbox mapped
            shot(driver, "flagged")
            Select(driver.find_element(By.ID, "flagged-sort")).select_by_value("score")
            by_score = sorted(odd, key=lambda i: -scores[i]["score"])
            assert by_score != odd[::-1]  # the newest is the least odd: the two orders differ
            wait(driver, lambda d: cards(d, "flagged") == by_score)
            Select(driver.find_element(By.ID, "camera")).select_by_value("c2")  # a camera without a set
            wait(driver, lambda d: "no camera with a reference set" in text_of(d, "status-flagged"))
            assert cards(driver, "flagged") == []
        finally:
            driver.quit()


def test_scores_on_results_and_region_search_from_the_detail(flagged_site):
    """Scores on the latest frames' cards (flag style over the threshold, none for unscored frames); a flagged
    frame's detail with its score and region over the original; "find frames like this region" lists the frame
    that shows the same defect first, with its matching region drawn."""
    from selenium.webdriver.common.by import By

    cfg, engine, f, viewer = flagged_site
    scores = _scores(engine)
    first, twin = f["odd"][0].frame_id.hex(), f["twin"].frame_id.hex()
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, viewer, view="latest")
            wait(driver, lambda d: len(cards(d, "latest")) == 27)
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-latest .ascore")) == 26)
            got = driver.execute_script("return Object.fromEntries([...document.querySelectorAll('#results-latest .card')]"
                                        ".map(c => { const b = c.querySelector('.ascore');"
                                        "return [c.dataset.frameId, b ? [+b.dataset.score, b.classList.contains('anomaly')] : null]; }))")
            assert got[twin] is None  # camera c2 has no set: not scored
            for fid, a in scores.items():
                assert got[fid] == [pytest.approx(a["score"]), a["flagged"]], fid
            shot(driver, "latest-scores")

            driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{first}"]').click()
            wait(driver, lambda d: _rect(d, "#detail-figure rect.anomaly.box"))
            assert _rect(driver, "#detail-figure rect.anomaly.box") == \
                pytest.approx(_frame_box(scores[first]["region"]["box"]), abs=2e-3)
            assert len(driver.find_elements(By.CSS_SELECTOR, "#detail-figure rect.anomaly")) == 1  # no footprint: no cells
            fields = text_of(driver, "detail-fields")
            assert f"anomaly score {scores[first]['score']:.4f}, threshold {scores[first]['threshold']:.4f}: flagged" \
                in fields and "anomalous region token 5" in fields
            shot(driver, "detail-anomaly")
            driver.find_element(By.ID, "find-region").click()
            wait(driver, lambda d: "frames like this region" in text_of(d, "status-search"))
            hits = cards(driver, "search")
            assert hits[0] == twin and first not in hits and len(hits) == 26  # every other frame of the model
            assert "anomalous region (token 5)" in text_of(driver, "query-text")
            css = f'#results-search .card[data-frame-id="{twin}"] rect.match'
            rect = wait(driver, lambda d: _rect(d, css))
            box = f["twin"].summary.centroids[3]
            assert rect == pytest.approx(_frame_box([box[0] - .125, box[1] - .125, box[0] + .125,
                                                                   box[1] + .125]), abs=5e-3)
            shot(driver, "region-search")
        finally:
            driver.quit()


def test_detail_draws_the_footprint_cells_of_the_anomalous_region(tmp_path):
    """A slic model's frames carry a footprint: the detail draws the anomalous token's cells (an L of three) and
    their bounding box, each mapped from the letterboxed model input."""
    from selenium.webdriver.common.by import By

    from central.anomaly import refsets
    from central.anomaly.scoring import backfill
    from tests.support.anomaly_frames import unit, vocabulary
    from tests.support.tiny_model import build_tiny_model
    from tokenline.frame_id import new_frame_id
    from tokenline.manifest import Manifest
    from tokenline.summary import Summary, boxes_from_footprint
    from tokenline.wire import TokenMessage

    cfg, engine = _central(tmp_path)
    mdir = build_tiny_model(tmp_path / "model", size=32, patch=8, dim=384, head="slic", token_dim=96,
                            resize="letterbox")
    man = Manifest.from_file(mdir)
    model = tx(engine, store.register_model, man, mdir)
    assert tuple(man.summary.footprint_grid) == (4, 4)
    rng, vocab = np.random.default_rng(9), vocabulary(96)
    fp = np.arange(16, dtype=np.uint8).reshape(4, 4)
    fp[1, 2] = fp[2, 1] = 5  # token 5: cells (1, 1), (1, 2), (2, 1); tokens 6 and 9 stand for nothing

    def message(i: int, odd: bool) -> TokenMessage:
        tokens = unit(vocab[rng.integers(0, len(vocab), 16)] + 0.03 * unit(rng.standard_normal((16, 96))))
        if odd:
            tokens[5] = unit(rng.standard_normal(96))
        sizes, cent = boxes_from_footprint(fp, 16)
        return TokenMessage(frame_id=new_frame_id(T0 + i), device="d1", site="s1", line="l1", camera="c1",
                            capture_ts_us=T0 + i, seq=i, manifest_hash=man.hash_bytes(), token_dtype="int8",
                            summary=Summary(unit(rng.standard_normal(384)), tokens, sizes, cent, fp))

    msgs = [message(i, i == 10) for i in range(11)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in msgs])
    built_set(engine, cfg.anomaly, refsets.create_set, name="good", frame_ids=[m.frame_id.hex() for m in msgs[:10]],
              quantile=1.0)
    backfill(engine)
    _keep_originals(cfg, engine, msgs[10:])
    odd = msgs[10].frame_id.hex()
    a = _scores(engine)[odd]
    assert a["flagged"] and a["token"] == 5 and a["region"]["mask"]["rows"] == ["0000", "0110", "0100", "0000"]
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, tx(engine, store.create_token, "v", "viewer"), view="latest")
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{odd}"] img'))
            driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{odd}"]').click()
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detail-figure rect.anomaly.cell")) == 3)
            cells = driver.execute_script("return [...document.querySelectorAll('#detail-figure rect.anomaly.cell')]"
                                          ".map(r => ['x', 'y', 'width', 'height'].map(k => +r.getAttribute(k)))")
            want = [_frame_box([x / 4, y / 4, (x + 1) / 4, (y + 1) / 4]) for y, x in ((1, 1), (1, 2), (2, 1))]
            assert cells == [pytest.approx(w, abs=2e-3) for w in want]
            assert _rect(driver, "#detail-figure rect.anomaly.box") == pytest.approx(_frame_box([.25, .25, .75, .75]),
                                                                                      abs=2e-3)
            shot(driver, "detail-anomaly-footprint")
        finally:
            driver.quit()


def test_marking_good_frames_makes_reference_sets(site):
    """An admin ticks result cards as good (ticking never opens the detail) and marks them: a new set for their
    camera, then frames added to it (one from its detail too); a camera whose frames cannot make a set shows its error and keeps its ticks
    while the others go through; the filter bar's camera and time range marked as good; the Reference sets view
    lists the sets and deletes one; the Flagged view appears once a set exists. A viewer gets neither ticks nor
    actions."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from central.anomaly import refsets

    cfg, engine, msgs, toks = site
    ids = [m.frame_id.hex() for m in msgs]  # 0-29 on s1/l3/c1, 30-34 on s1/l4/c2

    def sets() -> dict:
        return {(s.line, s.camera): (s, sorted(refsets.set_frame_ids(sess, s.id)))
                for sess in [Session(engine)] for s in refsets.list_sets(sess)}

    def tick(driver, i: int) -> None:
        driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{ids[i]}"] input.good').click()

    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, toks["admin"], view="latest")
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-latest .card input.good")) == 35)
            assert not driver.find_element(By.ID, "nav-flagged").is_displayed()  # no set yet
            for i in (29, 28, 27):
                tick(driver, i)
            assert not driver.find_element(By.ID, "detail").get_attribute("open")  # a tick is not a card click
            assert "3 frame(s) ticked" in text_of(driver, "selection")
            driver.find_element(By.ID, "sel-good").click()
            wait(driver, lambda d: "new set" in text_of(d, "sel-status"))
            (s, frames), = sets().values()
            assert (s.site, s.line, s.camera, s.frame_count, s.version) == ("s1", "l3", "c1", 3, 1)
            assert frames == sorted(ids[27:30])
            assert not driver.find_element(By.ID, "selection").find_element(By.ID, "sel-good").is_displayed()
            wait(driver, lambda d: d.find_element(By.ID, "nav-flagged").is_displayed())
            assert driver.execute_script("return document.querySelectorAll('input.good:checked').length") == 0
            shot(driver, "marked-good")

            driver.find_element(By.CSS_SELECTOR, f'#results-latest .card[data-frame-id="{ids[25]}"] .meta').click()
            wait(driver, lambda d: d.find_elements(By.ID, "mark-good"))[0].click()  # one frame, from its detail
            wait(driver, lambda d: "this frame added to set" in text_of(d, "detail-fields"))
            assert sets()[("l3", "c1")][1] == sorted([ids[25], *ids[27:30]])
            driver.find_element(By.ID, "close").click()

            tick(driver, 26)  # c1: added to its set
            tick(driver, 34)  # c2: a single frame cannot make a set
            driver.find_element(By.ID, "sel-good").click()
            wait(driver, lambda d: "added to set" in text_of(d, "sel-status"))
            status = text_of(driver, "sel-status")
            assert "s1/l4/c2: a reference set needs at least two stored frames" in status
            assert "error" in driver.find_element(By.ID, "sel-status").get_attribute("class")
            assert "1 frame(s) ticked" in text_of(driver, "selection")  # the failed camera's tick stays
            assert driver.execute_script("return [...document.querySelectorAll('input.good:checked')]"
                                         ".map(b => b.closest('.card').dataset.frameId)") == [ids[34]]
            got = sets()
            assert list(got) == [("l3", "c1")]
            s, frames = got[("l3", "c1")]
            assert (s.frame_count, s.version, frames) == (5, 3, sorted(ids[25:30]))
            driver.find_element(By.ID, "sel-clear").click()
            assert driver.execute_script("return document.querySelectorAll('input.good:checked').length") == 0

            driver.find_element(By.ID, "nav-sets").click()
            wait(driver, lambda d: "1 reference set" in text_of(d, "status-sets"))
            row = texts(driver, "#sets tbody tr")
            assert len(row) == 1 and "s1/l3/c1" in row[0] and "l3/c1 good" in row[0] and "v3" in row[0]
            assert driver.find_element(By.ID, "range-good").get_attribute("disabled")  # no camera or range yet
            assert texts(driver, "#camera option") == ["all", "c1 (30)", "c2 (5)"]
            Select(driver.find_element(By.ID, "camera")).select_by_value("c2")  # its site and line say "all"
            for field, value in (("since", "2023-11-14T22:13:50"), ("until", "2023-11-14T22:13:55")):
                driver.execute_script(f"const e = document.getElementById('{field}'); e.value = '{value}';"
                                      "e.dispatchEvent(new Event('change', {bubbles: true}))")
            wait(driver, lambda d: not d.find_element(By.ID, "range-good").get_attribute("disabled"))
            assert "s1/l4/c2, 2023-11-14 22:13:50.000 UTC to 2023-11-14 22:13:55.000 UTC" in text_of(driver,
                                                                                                   "range-what")
            driver.find_element(By.ID, "range-good").click()
            wait(driver, lambda d: "new set" in text_of(d, "status-sets"))
            s, frames = sets()[("l4", "c2")]
            assert (s.frame_count, frames) == (5, sorted(ids[30:35]))
            wait(driver, lambda d: len(texts(d, "#sets tbody tr")) == 2)
            shot(driver, "reference-sets")
            driver.find_element(By.CSS_SELECTOR, f'#sets tr[data-set-id="{s.id}"] button.delete-set').click()
            driver.switch_to.alert.accept()
            wait(driver, lambda d: "deleted reference set" in text_of(d, "status-sets"))
            assert len(texts(driver, "#sets tbody tr")) == 1 and list(sets()) == [("l3", "c1")]

            driver.quit()
            driver = chrome()  # the viewer in a browser of its own (no admin token in its storage)
            login(driver, base, toks["viewer"], view="latest")
            wait(driver, lambda d: len(cards(d, "latest")) == 35)
            assert driver.find_elements(By.CSS_SELECTOR, "input.good") == []
            driver.find_element(By.ID, "nav-sets").click()
            wait(driver, lambda d: "1 reference set" in text_of(d, "status-sets"))
            assert driver.find_elements(By.CSS_SELECTOR, "#sets button") == []
            assert not driver.find_element(By.ID, "range-form").is_displayed()
        finally:
            driver.quit()


def test_a_set_whose_build_failed_shows_why_and_builds_again(site):
    """The Reference sets view shows a failed build's reason; once its cause is gone (the frames are back),
    "Build again" builds the bank and the row turns ready."""
    from selenium.webdriver.common.by import By
    from sqlalchemy import delete

    from central.anomaly import refsets
    from central.errors import Invalid
    from sql.models import Frame

    cfg, engine, msgs, toks = site
    c2 = msgs[30:35]
    set_id = tx(engine, refsets.create_set, cfg.anomaly, name="c2", frame_ids=[m.frame_id.hex() for m in c2]).id
    with Session(engine) as s, s.begin():
        s.execute(delete(Frame).where(Frame.frame_id.in_([m.frame_id.hex() for m in c2[1:]])))
    with pytest.raises(Invalid):
        refsets.build_set(engine, cfg.anomaly, set_id)
    with serving(create_app(cfg, engine)) as base:
        driver = chrome()
        try:
            login(driver, base, toks["admin"], view="sets")
            row = f'#sets tr[data-set-id="{set_id}"]'
            wait(driver, lambda d: texts(d, row))
            assert "failed: a reference set needs at least two stored frames, 1 found" in texts(driver, row)[0]
            shot(driver, "reference-set-failed")
            with Session(engine) as s, s.begin():  # the frames are back
                store.insert_frames(s, [store.frame_row(m, 1, store.now_us()) for m in c2[1:]])
            driver.find_element(By.CSS_SELECTOR, f"{row} button.build-set").click()
            wait(driver, lambda d: "bank of 80 tokens built" in text_of(d, "status-sets"))
            assert "\tready\t" in texts(driver, row)[0]
            assert not driver.find_elements(By.CSS_SELECTOR, f"{row} button.build-set")
        finally:
            driver.quit()
    info = tx(engine, refsets.get_set, set_id)
    assert (info.state, info.bank_version, info.frame_count) == ("ready", 1, 5)  # the same version, built
