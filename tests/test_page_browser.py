"""The web page (serving/static/) in headless Chromium, against the real API and the real local Triton: the one-step
student and the multi-step teacher side by side on one seed and class, with latencies, class names from the
models' metadata, and the messages for a wrong key, a busy server and an unreachable API.

Uses Debian's chromium and chromium-driver (scripts/install.sh installs them); never downloads a browser. The page
runs under the API's Content-Security-Policy, so a violation shows up as a browser error and fails the test.
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

from conftest import TINY_CLASS_NAMES  # noqa: E402
from serving.background import APIThread as APIServer  # noqa: E402
from serving.triton_server import TritonServer, free_port  # noqa: E402

LATENCY = r"server \d+(\.\d)? ms, round trip \d+(\.\d)? ms"


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


def _results(driver):
    """Both result panels: shown or not, their image (decoded size, source, alt text), caption and timings."""
    return driver.execute_script("""
        const out = {};
        for (const role of ["student", "teacher"]) {
          const fig = document.getElementById(role + "-result"), img = fig.querySelector("img");
          const cap = fig.querySelector("figcaption");
          out[role] = {shown: !fig.hidden, model: fig.dataset.model || null, caption: cap ? cap.innerText : "",
                       serverMs: fig.dataset.serverMs === undefined ? null : Number(fig.dataset.serverMs),
                       roundTripMs: fig.dataset.roundTripMs === undefined ? null : Number(fig.dataset.roundTripMs),
                       img: img && {complete: img.complete, w: img.naturalWidth, h: img.naturalHeight, src: img.src,
                                    alt: img.alt, rect: img.getBoundingClientRect().toJSON()}};
        }
        out.ratio = document.getElementById("ratio").textContent;
        out.dpr = window.devicePixelRatio;
        return out;""")


def _both_shown(driver):
    r = _results(driver)
    done = _status(driver)[0].startswith("done")
    return r if done and all(r[k]["img"] and r[k]["img"]["complete"] and r[k]["img"]["w"] > 0
                             for k in ("student", "teacher")) else False


def _wait_models(driver):
    _wait(driver, lambda d: "tiny" in [o.get_attribute("value")
                                       for o in Select(d.find_element(By.ID, "student")).options],
          30, "model list never filled")


def _shown_pixels(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_page_compares_student_and_teacher(triton, tiny_artifacts, browser, tmp_path):
    from PIL import Image

    from serving.client import APIClient
    from serving.engine import ImageEngine

    with APIServer(_settings(triton, tiny_artifacts)) as api:
        browser.get(api.url + "/")
        assert browser.title == "OneStep image generator"
        _wait_models(browser)
        student = Select(browser.find_element(By.ID, "student"))
        teacher = Select(browser.find_element(By.ID, "teacher"))
        # defaults: the first student and the first teacher the API lists; a teacher is optional
        assert student.first_selected_option.get_attribute("value") == "tiny"
        assert teacher.first_selected_option.get_attribute("value") == "teacher_heun3"
        assert [o.get_attribute("value") for o in teacher.options] == ["teacher_heun3", ""]
        student.select_by_value("tiny")
        teacher.select_by_value("teacher_heun3")

        # the class names are the models' metadata, as GET /v1/models serves it; the default is a real class
        served = {m["name"]: m for m in APIClient(api.url).models()}
        assert served["tiny"]["class_names"] == list(TINY_CLASS_NAMES) == served["teacher_heun3"]["class_names"]
        label = Select(browser.find_element(By.ID, "label"))
        assert [o.text for o in label.options] == list(TINY_CLASS_NAMES)
        assert label.first_selected_option.get_attribute("value") == "0"
        label.select_by_value("7")
        _fill(browser, "seed", 5)
        browser.find_element(By.ID, "go").click()

        r = _wait(browser, _both_shown, 90, "the student and the teacher image never both appeared")
        text, cls = _status(browser)
        assert text == f'done: seed 5, class "{TINY_CLASS_NAMES[7]}"' and "error" not in cls
        for role, name, nfe in (("student", "tiny", 1), ("teacher", "teacher_heun3", 5)):
            got = r[role]
            assert got["shown"] and got["model"] == name
            assert got["img"]["w"] == got["img"]["h"] == 32
            assert got["img"]["alt"] == f"{role} {name}: {TINY_CLASS_NAMES[7]}, seed 5"
            assert re.fullmatch(rf"{name} {role}, {nfe} NFE\n{LATENCY}", got["caption"]), got["caption"]
            # the server's own total (Server-Timing) sits inside the round trip the browser measured
            assert 0 < got["serverMs"] <= got["roundTripMs"] + 0.5, got
        assert re.fullmatch(r"teacher / student: \d+\.\dx server time, \d+\.\dx round trip \(5 vs 1 NFE\)",
                            r["ratio"]), r["ratio"]

        # what the page shows is exactly what each model makes in-process for that seed and class
        engines = {"student": ImageEngine(tiny_artifacts["student_onnx"]),
                   "teacher": ImageEngine(tiny_artifacts["teacher_onnx"], sampler="heun", steps=3)}
        for role, eng in engines.items():
            np.testing.assert_array_equal(_shown_pixels(r[role]["img"]["src"]), eng.generate([5], [7])[0, 0])

        # the screenshot: both images are on it, drawn (not blank) where the page laid them out
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.format == "PNG"
            pixels = np.asarray(im.convert("L"), dtype=np.float32)
        for role in ("student", "teacher"):
            x, y, w, h = (int(r[role]["img"]["rect"][k] * r["dpr"]) for k in ("x", "y", "width", "height"))
            assert w > 0 and h > 0 and x + w <= pixels.shape[1] and y + h <= pixels.shape[0], (role, pixels.shape)
            assert pixels[y:y + h, x:x + w].std() > 1.0, f"the {role} image is blank in the screenshot"

        # the same request again: its latency is measured anew, with a note that a response cache may answer it
        browser.execute_script("document.getElementById('status').textContent = ''")
        browser.find_element(By.ID, "go").click()
        r = _wait(browser, _both_shown, 90, "the repeated request never finished")
        for role, name, nfe in (("student", "tiny", 1), ("teacher", "teacher_heun3", 5)):
            assert re.fullmatch(rf"{name} {role}, {nfe} NFE\n{LATENCY}\nasked before: the server may have answered "
                                r"from its response cache", r[role]["caption"]), r[role]["caption"]

        # a seed above the API's range: the server's message reaches #status and the panels are cleared
        _fill(browser, "seed", 10**20)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: "error" in _status(d)[1], 30, "no error shown for a seed out of range")
        text, _ = _status(browser)
        assert text.startswith("HTTP 422: seed: ") and "less than or equal to" in text, text
        browser.save_screenshot(str(tmp_path / "page-error.png"))

        # a good request afterwards clears the error; seeds beyond 2^53 keep every digit; the teacher is optional
        big = 2**53 + 1
        teacher.select_by_value("")
        _fill(browser, "seed", big)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: _status(d)[0].startswith("done"), 60, "recovery failed")
        assert "error" not in _status(browser)[1]
        r = _results(browser)
        assert r["student"]["img"]["alt"].endswith(f"seed {big}") and not r["teacher"]["shown"] and not r["ratio"]
        np.testing.assert_array_equal(_shown_pixels(r["student"]["img"]["src"]),
                                      engines["student"].generate([big], [7])[0, 0])


def test_page_with_api_key(triton, tiny_artifacts, browser, tmp_path):
    """Without the key, and with a wrong one, the page says so; with the right key it works."""
    with APIServer(_settings(triton, tiny_artifacts, api_key="s3cret")) as api:
        browser.get(api.url + "/")
        _wait(browser, lambda d: _status(d)[0] == "cannot list models: wrong or missing API key", 30,
              "no key message without a key")
        assert "error" in _status(browser)[1]
        key = browser.find_element(By.ID, "key")
        key.send_keys("s3cret")
        key.send_keys("\t")
        _wait_models(browser)
        browser.find_element(By.ID, "go").click()
        _wait(browser, _both_shown, 90, "no images with the API key")
        browser.save_screenshot(str(tmp_path / "page-key.png"))

        _fill(browser, "key", "wrong")
        browser.find_element(By.ID, "key").send_keys("\t")
        _wait(browser, lambda d: _status(d)[0] == "cannot list models: wrong or missing API key", 30,
              "no key message for a wrong key")
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: _status(d)[0].startswith("wrong or missing API key ("), 30,
              "no key message when generating with a wrong key")
        assert _status(browser)[0] == "wrong or missing API key (tiny, HTTP 401)"
        r = _results(browser)
        assert r["student"]["caption"].endswith("no image: wrong or missing API key") and not r["student"]["img"]
        assert browser.find_element(By.ID, "go").is_enabled()


def test_page_says_when_the_server_is_busy(tiny_artifacts, browser, tmp_path):
    """Triton not there: the API answers 503 with Retry-After, and the page tells when to retry."""
    from serving.api import APISettings

    settings = APISettings(triton_url=f"127.0.0.1:{free_port()}", repository=str(tiny_artifacts["repo"]),
                           retry_after_s=7, request_timeout_s=10)
    with APIServer(settings) as api:
        browser.get(api.url + "/")
        _wait_models(browser)
        browser.find_element(By.ID, "go").click()
        _wait(browser, lambda d: "error" in _status(d)[1], 30, "no message for a busy server")
        assert _status(browser)[0] == "server busy, retry in 7 s (tiny, HTTP 503)", _status(browser)
        browser.save_screenshot(str(tmp_path / "page-busy.png"))
        assert browser.find_element(By.ID, "go").is_enabled()


def test_page_reports_an_unreachable_api(triton, tiny_artifacts, browser):
    api = APIServer(_settings(triton, tiny_artifacts))
    with api:
        browser.get(api.url + "/")
        _wait_models(browser)
    browser.find_element(By.ID, "go").click()  # the API is gone: the page must say so, not hang on "generating..."
    _wait(browser, lambda d: "error" in _status(d)[1], 30, "no error shown with the API down")
    assert _status(browser)[0].startswith("API unreachable"), _status(browser)
    assert browser.find_element(By.ID, "go").is_enabled()
