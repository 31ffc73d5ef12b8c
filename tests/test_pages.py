"""The dashboard and the self-service page, driven in Debian's headless Chromium (selenium + chromedriver).

Set RELAY_UPDATE_SCREENSHOTS=1 to write the screenshots into docs/ (shown by docs/operations.md and the README).
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
from harness import ROOT, wait_until

from relay.state.apikeys import digest

ALICE, BOB, ADMIN = "sk-alice-pages-7", "sk-bob-pages-7", "sk-root-pages-7"
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium and chromedriver, installed here if missing; skipped (visibly) if impossible."""
    if not (CHROMIUM.exists() and DRIVER.exists()) and shutil.which("apt-get"):
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("SKIPPED: Debian's chromium/chromium-driver are not installed and could not be installed")
    pytest.importorskip("selenium")
    return CHROMIUM


@pytest.fixture()
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def team(relay_factory, tmp_path_factory):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [
        {"name": "alice", "key_sha256": digest(ALICE), "rpm": 30, "tokens_per_day": 5000, "max_concurrent": 2,
         "models": ["sonnet", "haiku"]},
        {"name": "bob", "key": BOB, "tokens_per_day": 20000},
        {"name": "root", "key_sha256": digest(ADMIN), "admin": True},
    ]}
    path = tmp_path_factory.mktemp("pages") / "config.json"
    path.write_text(json.dumps(cfg))
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    for key, text, model in ((ALICE, "alice asks", "sonnet"), (ALICE, "alice again MOCK:usage=40,0,900,25", "haiku"),
                             (ALICE, "alice third", "sonnet"), (BOB, "bob-secret-topic asks", "sonnet"),
                             (BOB, "bob-secret-topic MOCK:usage=300,100,0,80", "opus"), (ADMIN, "root asks", "sonnet")):
        r = requests.post(srv.url + "/v1/chat/completions", headers=auth(key), timeout=120,
                          json={"model": model, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
    assert requests.post(srv.url + "/v1/chat/completions", headers=auth(BOB),
                         json={"model": "sonnet", "n": 3, "messages": [{"role": "user", "content": "x"}]}).status_code == 400
    assert requests.post(srv.url + "/v1/chat/completions", headers=auth(ALICE),
                         json={"model": "opus", "messages": [{"role": "user", "content": "x"}]}).status_code == 403
    assert wait_until(lambda: requests.get(srv.url + "/v1/usage", headers=auth(ADMIN)).json()["total"]["requests"] == 8)
    return srv


# -- driving the browser ---------------------------------------------------------------------------------
def network(driver):
    """(requested URLs, {url: status}) from Chromium's DevTools log since the last call."""
    urls, statuses = [], {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.responseReceived":
            statuses[msg["params"]["response"]["url"]] = msg["params"]["response"]["status"]
    return urls, statuses


def settled(driver, want=None):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.state || ''")
                                    in ((want,) if want else ("loaded", "denied")))
    return driver.execute_script("return document.body.dataset.state")


def use_key(driver, key):
    driver.execute_script("delete document.body.dataset.state")
    driver.find_element("id", "key").send_keys(key)
    driver.find_element("id", "use-key").click()
    return settled(driver)


def text(driver, element_id):
    return driver.find_element("id", element_id).get_attribute("textContent")


def cells(driver, row_selector):
    row = driver.find_element("css selector", row_selector)
    return [td.get_attribute("textContent") for td in row.find_elements("tag name", "td")]


def shows_nothing(driver):
    content = driver.find_element("id", "content")
    return not content.is_displayed() and not content.find_elements("css selector", "tbody tr") and \
        not content.find_elements("css selector", "svg") and text(driver, "total-requests") == ""


def screenshot(driver, tmp_path, name):
    import base64

    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1400, "height": min(4000, height), "scale": 1}})
    png = tmp_path / name
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.stat().st_size > 10000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("RELAY_UPDATE_SCREENSHOTS"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(png, ROOT / "docs" / name)


def only_the_relay(team, urls):
    """Every request that could leave the browser went to the relay (chrome:// and data: URLs never do)."""
    outside = [u for u in urls if u.split(":", 1)[0].lower() not in ("chrome", "chrome-untrusted", "about", "data")]
    assert any(u == team.url + "/me/data" or u == team.url + "/dashboard/data" for u in outside)
    assert all(u.startswith(team.url + "/") for u in outside), [u for u in outside if not u.startswith(team.url)]


def no_csp_violations(driver):
    bad = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]
           or e["level"] == "SEVERE" and "/data" not in e["message"]]
    assert not bad


# -- the tests -------------------------------------------------------------------------------------------
def test_dashboard_shows_what_v1_usage_says_to_an_admin_only(team, browser, tmp_path):
    browser.get(team.url + "/dashboard")
    assert settled(browser) == "denied" and shows_nothing(browser)   # no key yet
    assert use_key(browser, "sk-not-a-key") == "denied" and shows_nothing(browser)
    assert use_key(browser, BOB) == "denied" and shows_nothing(browser)  # a valid key, but not an admin's
    assert "alice" not in browser.page_source and "403" in text(browser, "status")
    urls, statuses = network(browser)
    assert statuses[team.url + "/dashboard/data"] == 403
    assert use_key(browser, ADMIN) == "loaded"
    usage = requests.get(team.url + "/v1/usage", headers=auth(ADMIN)).json()
    t = usage["total"]
    assert text(browser, "total-requests") == str(t["requests"]) == "8"
    assert text(browser, "total-successful") == str(t["successful"])
    assert text(browser, "total-errors") == str(t["errors"]) == "2"
    assert text(browser, "total-tokens") == str(t["total_tokens"])
    assert text(browser, "total-io") == f"{t['input_tokens']} / {t['output_tokens']}"
    for name in ("alice", "bob", "root"):
        k = usage["keys"][name]
        assert cells(browser, f'#per-key tr[data-key="{name}"]')[:5] == \
            [name, str(k["requests"]), str(k["successful"]), str(k["errors"]), str(k["total_tokens"])]
    assert cells(browser, '#per-key tr[data-key="alice"]')[6:9] == ["30", "5000", "2"]
    for model, m in usage["models"].items():
        assert cells(browser, f'#per-model tr[data-model="{model}"]')[:4] == \
            [model, str(m["requests"]), str(m["input_tokens"]), str(m["output_tokens"])]
    assert len(browser.find_elements("css selector", "#charts svg")) == 6
    assert len(browser.find_elements("css selector", "#recent tbody tr")) == 8
    assert len(browser.find_elements("css selector", "#recent tbody tr.err")) == 2
    statuses = {c.get_attribute("textContent") for c in browser.find_elements("css selector", "#err-status td:first-child")}
    assert statuses == {"200", "400", "403"}
    assert text(browser, "active-runs") == "0 / 4"
    urls, _ = network(browser)
    only_the_relay(team, urls)
    for u in urls:
        assert ADMIN not in u and BOB not in u
    assert browser.current_url == team.url + "/dashboard"
    no_csp_violations(browser)
    screenshot(browser, tmp_path, "dashboard.png")
    log = team.log()
    assert ADMIN not in log and BOB not in log and "sk-not-a-key" not in log


def test_usage_page_shows_only_the_pasted_keys_own_data(team, browser, tmp_path):
    browser.get(team.url + "/me")
    assert settled(browser) == "denied" and shows_nothing(browser)
    assert use_key(browser, "sk-wrong-0000") == "denied" and shows_nothing(browser)
    assert use_key(browser, ALICE) == "loaded"
    mine = requests.get(team.url + "/v1/usage", headers=auth(ALICE)).json()
    t = mine["total"]
    assert text(browser, "key-name") == "alice"
    assert text(browser, "total-requests") == str(t["requests"]) == "4"
    assert text(browser, "total-successful") == str(t["successful"]) == "3"
    assert text(browser, "total-errors") == str(t["errors"])
    assert text(browser, "total-tokens") == str(t["total_tokens"])
    assert text(browser, "tokens-today") == str(t["total_tokens"])
    assert text(browser, "tokens-left") == str(5000 - t["total_tokens"])
    for day, d in mine["days"].items():
        assert cells(browser, f'#per-day tr[data-day="{day}"]') == \
            [day, str(d["requests"]), str(d["successful"]), str(d["errors"]), str(d["total_tokens"])]
    limits = [cells(browser, f"#limits tr:nth-child({i})") for i in range(1, 5)]
    assert limits == [["requests per minute", "30"], ["tokens per day", "5000"], ["requests at once", "2"],
                      ["models", "sonnet, haiku"]]
    keys_shown = {c.get_attribute("textContent") for c in browser.find_elements("css selector", "#recent td:nth-child(2)")}
    assert keys_shown == {"alice"}
    page = browser.page_source
    assert "bob" not in page and "root" not in page and "bob-secret-topic" not in page
    assert len(browser.find_elements("css selector", "#charts svg")) == 2
    urls, _ = network(browser)
    only_the_relay(team, urls)
    assert all(ALICE not in u for u in urls) and browser.current_url == team.url + "/me"
    no_csp_violations(browser)
    screenshot(browser, tmp_path, "usage-page.png")
    assert browser.execute_script("return sessionStorage.getItem('relay-own-key')") == ALICE
    browser.find_element("id", "forget").click()
    assert shows_nothing(browser) and browser.execute_script("return sessionStorage.length") == 0
    assert ALICE not in team.log()


def test_without_the_right_key_every_page_and_metrics_answer_401_or_403_and_show_nothing(team):
    data = {"/dashboard/data": 403, "/metrics": 403, "/me/data": None}
    for path, for_plain_key in data.items():
        for headers, want in (({}, 401), (auth("sk-wrong"), 401), ({"x-api-key": "sk-wrong"}, 401),
                              (auth(BOB), for_plain_key)):
            if want is None:
                continue
            r = requests.get(team.url + path, headers=headers)
            assert r.status_code == want, (path, headers)
            assert set(r.json()) == {"error"} and "alice" not in r.text and "relay_requests" not in r.text
    mine = requests.get(team.url + "/me/data", headers=auth(BOB)).json()
    assert mine["key"] == "bob" and "alice" not in json.dumps(mine)
    for page in ("/dashboard", "/me"):
        shells = {requests.get(team.url + page, headers=h).text for h in ({}, auth(ADMIN), auth(BOB))}
        assert len(shells) == 1  # the shell is the same for everyone: it holds no data
        shell = shells.pop()
        assert "alice" not in shell and "<script>" not in shell and "http" not in shell.replace("http-equiv", "")
        r = requests.get(team.url + page)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    for method in ("post", "put", "delete"):  # read-only
        assert getattr(requests, method)(team.url + "/dashboard/data", headers=auth(ADMIN)).status_code == 405
