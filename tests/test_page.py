"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.files import caption_paths
from decapflow.decoder.checkpoint import current_meta

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def chromium(*flags: str):
    """Debian's headless Chromium driven by Selenium, with ``flags`` added (skipped here, failed in CI, when it is
    not installed)."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def test_page_captions_an_uploaded_image(home: Path, images: Path, serve_app, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = sorted(images.iterdir())[1]
    expected = caption_paths(Captioner.for_bank("shapes", Options(strategy="nnd")), [image])[0][0]
    url = serve_app()
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bank option"))
    assert Select(browser.find_element(By.ID, "bank")).first_selected_option.get_attribute("value") == "shapes"
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#banks td")]
    assert cells[:2] == ["shapes", "8"] and current_meta("shapes")["id"] in cells

    Select(browser.find_element(By.ID, "strategy")).select_by_value("nnd")
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", upload)
    upload.send_keys(str(image))
    wait.until(lambda d: d.find_element(By.ID, "caption").text not in ("", "…")
               or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.ID, "caption").text == expected.caption
    assert browser.find_element(By.ID, "preview").is_displayed()
    support = browser.find_elements(By.CSS_SELECTOR, "#support .support .t")
    assert [s.text for s in support] == [t for t, _ in expected.support]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#support .bar")) == len(expected.support)
    assert "nnd" in browser.find_element(By.ID, "meta").text

    upload.send_keys(str(Path(__file__)))  # not an image: the page shows the server's message
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "not an image" in browser.find_element(By.ID, "error").text
