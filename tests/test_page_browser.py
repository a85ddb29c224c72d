"""The web page (serving/static/index.html) in headless Chromium, against the real API and the real local Triton.

Uses Debian's chromium and chromium-driver (scripts/install.sh installs them); never downloads a browser.
"""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.triton]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,800"]

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)
selenium = pytest.importorskip("selenium", reason="pip install selenium (the test extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from serving.background import APIThread as APIServer
from serving.triton_server import TritonServer  # noqa: E402


@pytest.fixture(scope="module")
def triton(tiny_artifacts):
    with TritonServer(tiny_artifacts["repo"], ready_timeout=90) as ts:
        yield ts


def _settings(triton, tiny_artifacts, **kw):
    from serving.api import APISettings

    return APISettings(triton_url=triton.grpc_url, repository=str(tiny_artifacts["repo"]), max_images=16, **kw)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or a browser
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        driver.quit()


def _wait(driver, cond, timeout=60, what=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond(d), message=what)


def _status(driver):
    el = driver.find_element(By.ID, "status")
    return el.text, el.get_attribute("class") or ""


def _fill(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def _images(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#images img')).map(i => "
        "({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, src: i.src, alt: i.alt}))")


def _wait_models(driver):
    _wait(driver, lambda d: "tiny" in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "model")).options],
          30, "model list never filled")


def test_page_generates_images_and_shows_errors(triton, tiny_artifacts, browser, tmp_path):
    from PIL import Image

    from serving.engine import ImageEngine

    with APIServer(_settings(triton, tiny_artifacts)) as api:
        browser.get(api.url + "/")
        assert browser.title == "OneStep image generator"
        _wait_models(browser)
        Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
        _wait(browser, lambda d: len(Select(d.find_element(By.ID, "label")).options) == 11, 10,
              "class list not filled for a 10-class model")
        Select(browser.find_element(By.ID, "label")).select_by_value("7")
        _fill(browser, "seed", 5)
        _fill(browser, "n", 4)
        browser.find_element(By.ID, "go").click()

        imgs = _wait(browser, lambda d: (lambda im: im if len(im) == 4 and all(i["complete"] and i["w"] == 32
                                                                               for i in im) else False)(_images(d)),
                     60, "4 decoded 32x32 images never appeared in #images")
        assert all(i["h"] == 32 for i in imgs)
        assert [i["alt"] for i in imgs] == [f"seed {s}, label 7" for s in range(5, 9)]
        text, cls = _status(browser)
        assert re.fullmatch(r"4 images in \d+ ms", text), text
        assert "error" not in cls

        # what the page shows is exactly the in-process student output for those seeds and that class
        ref = ImageEngine(tiny_artifacts["student_onnx"]).generate(list(range(5, 9)), [7] * 4)
        for i, r in zip(imgs, ref):
            assert i["src"].startswith("data:image/png;base64,")
            shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1]))))
            np.testing.assert_array_equal(shown, r[0])

        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0

        # over the API's limit (max_images=16): the server's 400 message must reach #status
        _fill(browser, "n", 100)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: "error" in _status(d)[1], 30, "no error shown for 100 images")
        text, _ = _status(browser)
        assert text.startswith("HTTP 400") and "at most 16 images per request, asked for 100" in text, text
        browser.save_screenshot(str(tmp_path / "page-error.png"))

        # a good request afterwards clears the error
        _fill(browser, "n", 2)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: re.fullmatch(r"2 images in \d+ ms", _status(d)[0]), 60, "recovery failed")
        assert "error" not in _status(browser)[1]
        assert len(_images(browser)) == 2


def test_page_with_api_key(triton, tiny_artifacts, browser, tmp_path):
    """With an API key the model list needs the key: the page says so, then works once the key is typed."""
    with APIServer(_settings(triton, tiny_artifacts, api_key="s3cret")) as api:
        browser.get(api.url + "/")
        _wait(browser, lambda d: "HTTP 401" in _status(d)[0], 30, "no 401 shown without a key")
        assert "error" in _status(browser)[1]
        key = browser.find_element(By.ID, "key")
        key.send_keys("s3cret")
        key.send_keys("\t")
        _wait_models(browser)
        Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
        _fill(browser, "n", 3)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: re.fullmatch(r"3 images in \d+ ms", _status(d)[0]), 60,
              "no images with the API key")
        assert all(i["w"] == 32 for i in _images(browser))
        browser.save_screenshot(str(tmp_path / "page-key.png"))


def test_page_reports_an_unreachable_api(triton, tiny_artifacts, browser):
    api = APIServer(_settings(triton, tiny_artifacts))
    with api:
        browser.get(api.url + "/")
        _wait_models(browser)
    _fill(browser, "n", 1)
    browser.find_element(By.ID, "go").click()  # the API is gone: the page must say so, not hang on "generating..."
    _wait(browser, lambda d: "error" in _status(d)[1], 30, "no error shown with the API down")
    assert _status(browser)[0].startswith("API unreachable"), _status(browser)
    assert browser.find_element(By.ID, "go").is_enabled()
