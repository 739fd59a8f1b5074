"""End to end: the live web view (GET /view on the gateway's HTTP port) in a real browser —
Debian's chromium through its chromedriver, headless — on the whole running stack, while a client
streams vtest.avi through the SDK at about real time with a standing instruction. The page is
used as an operator would: the API key typed into its box, the stream picked from the list; the
timeline fills with the decided seconds, a question typed into the box is answered (its text
appears, its second is marked on the timeline).

A screenshot of the page goes to ``$SH_SCREENSHOT_DIR/web-view.png`` when that is set (the one in
docs/images is made with ``SH_SCREENSHOT_DIR=docs/images pytest tests/e2e/test_web_view.py``),
else under the test's tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import httpx
import pytest

from streamharness.auth import add_api_key, new_api_key
from streamharness.devinfra.common import free_port
from streamharness.devinfra.stack import LocalStack
from streamharness.media import read_video, sample_path

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STREAM = "lobby-cam"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (make system-deps)")
    work = tmp_path_factory.mktemp("stack")
    key = new_api_key()
    add_api_key(work / "api-keys.json", "lobby", key)
    port = free_port()
    with LocalStack(work, extra_env={"SH_GATEWAY_HTTP_PORT": str(port), "SH_GATEWAY_API_KEYS_FILE": str(work / "api-keys.json"),
                                     "SH_GENERATION_MAX_NEW_TOKENS": "16", "SH_DECISION_REFRACTORY_S": "20"}) as s:
        s.api_key, s.http = key, f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # the HTTP API starts with the gateway's stage, after its gRPC port serves
            try:
                if httpx.get(f"{s.http}/view", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no HTTP API on {s.http}:\n{s.proc('gateway-1').log_tail()}"
            time.sleep(0.3)
        yield s


class Camera(threading.Thread):
    """vtest.avi through the SDK at real time (2 frames per media second), until stopped."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(daemon=True, name="camera")
        self.stack, self.stop, self.error = stack, threading.Event(), None
        self.jpegs = [(f.media_ts_ms, cv2.imencode(".jpg", cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
                      for f in read_video(sample_path("vtest.avi"), fps=2.0)]
        self.session_id = ""

    def run(self) -> None:
        try:
            asyncio.run(self._stream())
        except BaseException as err:  # noqa: BLE001 - the test reads it
            self.error = err

    async def _stream(self) -> None:
        from streamharness.client import Session

        async with Session(self.stack.gateway_addresses[0], stream_id=STREAM, api_key=self.stack.api_key,
                           instructions={"people": "tell me when someone walks in"}) as s:
            self.session_id = s.session_id
            drain = asyncio.create_task(self._drain(s))
            started = time.monotonic()
            for ts, jpeg in self.jpegs:
                if self.stop.is_set():
                    break
                await asyncio.sleep(max(0.0, started + ts / 1000 - time.monotonic()))
                await s.send_frame(ts, jpeg)
            while not self.stop.is_set():
                await asyncio.sleep(0.2)
            await s.end()
            await drain

    @staticmethod
    async def _drain(s) -> None:
        async for _ in s:
            pass


def browser(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1440,1100",
                f"--user-data-dir={tmp / 'chromium-profile'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log")), options=options)


def print_page_state(driver) -> None:
    from selenium.webdriver.common.by import By

    print("status:", driver.find_element(By.ID, "status").text)
    for what, selector in (("cell", "#timeline .cell.decided"), ("response", "#responses .response")):
        for line in driver.execute_script(f"return [...document.querySelectorAll('{selector}')].map("
                                          "e => e.className + ' ' + JSON.stringify(e.dataset) + ' ' + (e.getAttribute('aria-label') || e.textContent))"):
            print(f"{what}: {line}")
    for entry in driver.get_log("browser"):
        print("console:", entry)


def test_the_web_view_shows_decisions_and_answers_a_question(stack, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    camera = Camera(stack)
    camera.start()
    driver = browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 60, poll_frequency=0.25)
        driver.get(f"{stack.http}/view")
        wait.until(lambda d: "enter an API key" in d.find_element(By.ID, "stream").text)  # without one: 401, said so
        driver.find_element(By.ID, "api-key").send_keys(stack.api_key)
        driver.find_element(By.CSS_SELECTOR, "#auth-form button").click()
        # the camera's stream is listed for this key's tenant; pick it
        wait.until(lambda d: STREAM in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "stream")).options])
        Select(driver.find_element(By.ID, "stream")).select_by_value(STREAM)
        assert driver.execute_script("return sessionStorage.getItem('streamharness.apiKey')") == stack.api_key
        wait.until(lambda d: d.find_element(By.ID, "status").text == "live")
        wait.until(lambda d: d.find_element(By.ID, "frame").get_attribute("src").startswith("blob:"))

        # the timeline fills: one cell per decided second, silent ones too
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline .cell.decided")) >= 5)
        decided = driver.find_elements(By.CSS_SELECTOR, "#timeline .cell.decided")
        assert all(c.get_attribute("aria-label") for c in decided), "a decided second without its reason"

        question = driver.find_element(By.ID, "question")
        question.send_keys("How many people are walking?")
        driver.find_element(By.CSS_SELECTOR, "#ask-form button").click()
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#responses .response.question[data-question-id]"))[0]
        qid = card.get_attribute("data-question-id")
        answer = f'#responses .response.final[data-question-id="{qid}"] .text'
        WebDriverWait(driver, 90, poll_frequency=0.25).until(lambda d: d.find_elements(By.CSS_SELECTOR, answer)
                                                             and d.find_element(By.CSS_SELECTOR, answer).text.strip())
        assert card.find_element(By.CSS_SELECTOR, ".prompt").text == "How many people are walking?"
        # the second that answered it is on the timeline, marked as the question's and answered
        cell = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#timeline .cell.respond.question[data-question-id="{qid}"]'))[0]
        wait.until(lambda d: "answered" in cell.get_attribute("class"))
        assert "How many people are walking?" in cell.get_attribute("aria-label")

        shots = Path(os.environ.get("SH_SCREENSHOT_DIR") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        if shots != tmp_path:  # the picture for the docs: a fuller timeline, and an alert if one comes within a minute
            with contextlib.suppress(TimeoutException):
                WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline .cell.decided")) >= 45
                                                and d.find_elements(By.CSS_SELECTOR, "#responses .response.instruction.final"))
        driver.save_screenshot(str(tmp_path / "web-view.png"))
        if shots != tmp_path:
            shutil.copyfile(tmp_path / "web-view.png", shots / "web-view.png")
        assert (tmp_path / "web-view.png").stat().st_size > 10_000
    except BaseException:
        print_page_state(driver)  # what the page showed, for the failure's report
        raise
    finally:
        driver.quit()
        camera.stop.set()
        camera.join(90)
    assert camera.error is None, camera.error
