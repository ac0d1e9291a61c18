"""The web page of `carbrand serve` in headless Chromium: pick a cars5 photo, read the predicted brand off the page
and see the Grad-CAM overlay load.

The screenshot serve_page.png goes to the test's tmp folder, or to CARBRAND_SCREENSHOT_DIR for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

from carbrand.inference.predict import Predictor
from tests.helpers.browser import headless_chromium

ANSWER_TIMEOUT_S = 60


def screenshot_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CARBRAND_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_shows_the_predicted_brand_of_a_picked_photo(cars5_server, cars5_dir, fitted_cars5_export, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = sorted((cars5_dir / "test" / "ferrari").glob("*.jpg"))[0]
    expected = Predictor.from_checkpoint(fitted_cars5_export, device="cpu").predict([photo], topk=5)[0]
    with headless_chromium() as browser:
        browser.get(cars5_server.url + "/")
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(lambda b: "resnet18" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file-input").send_keys(str(photo))
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            browser.find_element(By.ID, "error").text
        gradcam = browser.find_element(By.ID, "gradcam")  # the Grad-CAM overlay under the answer, once decoded
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(lambda b: b.execute_script("return arguments[0].complete", gradcam))
        overlay_width = browser.execute_script("return arguments[0].naturalWidth", gradcam)
        browser.execute_script("arguments[0].scrollIntoView()", gradcam)
        browser.save_screenshot(str(screenshot_folder(tmp_path) / "serve_page.png"))
        shown_brand = browser.find_element(By.ID, "top-brand").text.lower()
        rows = browser.find_elements(By.CSS_SELECTOR, "#results .bar-row")
        bars = [(row.get_attribute("data-brand"), row.find_element(By.CLASS_NAME, "fill").get_attribute("style")) for row in rows]
        model_line = browser.find_element(By.ID, "model").text
    assert shown_brand == expected.brand
    assert [brand for brand, _ in bars] == [b.brand for b in expected.topk], "one bar per brand, most probable first"
    assert f"width: {100 * expected.probability:.1f}%" in bars[0][1]
    assert "test accuracy 61.0% on 100 photos" in model_line
    assert overlay_width > 0, "the Grad-CAM overlay did not load"
