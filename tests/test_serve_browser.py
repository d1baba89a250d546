"""The chat page in a real headless browser (Debian's chromium + chromedriver through selenium): upload the demo's
crowd scene, ask the four workflow questions, and check the page shows the box image, the count and the generated
image, then resume the session from the sidebar. The tools are the default bundle's real ones; the controller is
the rule-based WorkflowController, so the test's time does not hang on the controller. Set TOOLVLM_SCREENSHOT=PATH
to keep a screenshot. docs/serve_screenshot.png shows the default bundle's own controller: `toolvlm serve` driven
the same way (four turns in about 20 s on an idle 2-core CPU)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from toolvlm.demo import QUESTIONS, demo_scene
from toolvlm.serve.app import create_app
from toolvlm.serve.background import BackgroundServer
from toolvlm.serve.config import ServeConfig
from toolvlm.serve.sessions import SharedModels
from toolvlm.serve.workflow import WorkflowController

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1100",
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{missing} not installed: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def loaded(driver, selector: str) -> list:
    """Images matching `selector` that the browser has fully loaded."""
    images = driver.find_elements("css selector", selector)
    return [
        im
        for im in images
        if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
    ]


def test_four_workflow_questions_in_the_browser(browser, tmp_path):
    from toolvlm.agent.profiles import default_profile
    from toolvlm.tools.registry import build_tools

    profile = default_profile()
    models = SharedModels.wrap(
        WorkflowController(generator_steps=4), build_tools(profile.tools), {"max_steps": 4}
    )
    scene, annotations = demo_scene()
    image_path = tmp_path / "crowd.png"
    scene.save(image_path)
    config = ServeConfig(sessions=str(tmp_path / "sessions"), turn_timeout_s=300)
    with BackgroundServer(create_app(config, models)) as srv:
        browser.get(srv.url + "/")
        for i, question in enumerate(QUESTIONS):
            if i == 0:
                browser.find_element("id", "images").send_keys(str(image_path))
                wait_for(lambda: loaded(browser, "#pending img"), 10, "the upload's preview")
            browser.find_element("id", "question").send_keys(question)
            browser.find_element("id", "send").click()
            wait_for(
                lambda n=i + 1: (
                    len(browser.find_elements("css selector", ".turn")) == n
                    and browser.find_element("id", "send").is_enabled()
                ),
                300,  # about 10 s each on an idle 2-core CPU; generous for a machine shared by many jobs
                f"the answer to {question!r}",
            )
            last = browser.find_elements("css selector", ".turn")[-1]
            assert not last.find_elements("css selector", ".error-box"), last.text
            assert last.find_element("css selector", ".answer").text.startswith(("I see img_0", "Done:"))
        # turn 1: the uploaded image with its handle; turn 2: the box image; 3: the count; 4: the new image
        turns = browser.find_elements("css selector", ".turn")
        assert "img_0" in turns[0].find_element("css selector", ".user figcaption").text
        boxes = loaded(browser, 'img[data-tool="grounding"]')
        assert len(boxes) == 1 and "img_1 (grounding)" in turns[1].text
        assert "box(es) [" in turns[1].find_element("css selector", ".fact").text
        count = turns[2].find_element("css selector", '.fact[data-tool="counter"]')
        sid = browser.execute_script("return state.session")
        history = httpx.get(f"{srv.url}/api/sessions/{sid}").json()["turns"]
        counted = history[2]["steps"][0]["artifact"]["count"]
        assert count.get_attribute("data-count") == str(counted) and f"count: {counted} person" in count.text
        assert abs(counted - annotations["counts"]["person"]) <= 0.3 * annotations["counts"]["person"]
        assert len(loaded(browser, 'img[data-tool="generator"]')) == 1
        assert history[3]["steps"][0]["tool"] == "generator" and not history[3]["steps"][0]["error"]
        trace = turns[3].find_element("css selector", "details.trace")
        assert trace.find_element("css selector", "summary").text == "tool trace (1 step)"
        trace.find_element("css selector", "summary").click()  # unfold it for the screenshot
        screenshot = os.environ.get("TOOLVLM_SCREENSHOT")
        if screenshot:
            browser.set_window_size(1280, 1900)  # the whole conversation in one picture
            browser.execute_script("document.querySelector('#log').scrollTop = 0")
            browser.save_screenshot(str(Path(screenshot)))
        # resume: a new session empties the page; the sidebar brings the conversation back
        browser.find_element("id", "new-session").click()
        assert not browser.find_elements("css selector", ".turn")
        browser.find_element("css selector", f'#sessions li[data-session="{sid}"]').click()
        wait_for(lambda: len(browser.find_elements("css selector", ".turn")) == 4, 10, "the resumed session")
        wait_for(lambda: loaded(browser, 'img[data-tool="generator"]'), 10, "the resumed generated image")
        assert browser.execute_script("return state.session") == sid
