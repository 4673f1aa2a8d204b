"""The playground page of `megabyte serve` in a real browser (headless Chromium).

Starts `megabyte serve` on a tiny checkpoint trained for a few seconds, loads `/`, enters a
prompt with greedy sampling, runs it and waits for the stream to finish: the text the page
shows must equal the greedy completion the API returns; then the same with seeded top-k
sampling (a barely trained model's greedy text is mostly spaces). Saves a screenshot to
docs/playground.png.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`)
and selenium; the binary is $MEGABYTE_BIN (default target/release/megabyte).
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PROMPT = "<page>\n  <title>"
BYTES = 120


def binary():
    path = Path(os.environ.get("MEGABYTE_BIN", REPO / "target" / "release" / "megabyte"))
    if not path.is_absolute():
        path = REPO / path
    assert path.exists(), f"{path} not found: build it with `cargo build --release` or set MEGABYTE_BIN"
    return str(path)


@pytest.fixture(scope="module")
def server():
    work = Path(tempfile.mkdtemp(prefix="megabyte-playground-"))
    run = work / "playground-run"
    train = subprocess.run(
        [binary(), "train", "--out", str(run), "--steps", "150", "--batch-size", "4", "--sample-bytes", "0", "--eval-every", "1000"],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr
    proc = subprocess.Popen([binary(), "serve", "--checkpoint", str(run), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://" in line, f"no address in {line!r}"
        url = line[line.index("http://") :].split()[0]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0, "serve did not exit 0 on SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(work, ignore_errors=True)


def api_completion(url, prompt, n, **sampling):
    body = json.dumps({"prompt": prompt, "max_tokens": n, **sampling}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.load(resp)["choices"][0]["text"]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="megabyte-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,860",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_in_page(browser, rule, seed=0, top_k=40):
    """Fills the form, runs it, waits for the stream's end; returns the text shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "playground-run" in d.find_element(By.ID, "model").text)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    # send_keys types a newline as Enter, which the textarea takes as a newline.
    prompt.send_keys(PROMPT)
    Select(browser.find_element(By.ID, "rule")).select_by_value(rule)
    for field, value in [("max_tokens", BYTES), ("seed", seed), ("top_k", top_k), ("temperature", 1)]:
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    assert "(length)" in status.text, status.text
    assert browser.find_element(By.ID, "prompt").get_property("value") == PROMPT
    return browser.find_element(By.ID, "generated").get_property("textContent")


def test_playground_streams_the_api_completion(server, browser):
    browser.get(server + "/")
    assert run_in_page(browser, "greedy") == api_completion(server, PROMPT, BYTES, temperature=0)
    sampled = api_completion(server, PROMPT, BYTES, temperature=1, top_k=40, seed=7)
    assert sampled.strip(), "the sampled completion is not all whitespace"
    assert run_in_page(browser, "top_k", seed=7, top_k=40) == sampled
    (REPO / "docs").mkdir(exist_ok=True)
    browser.save_screenshot(str(REPO / "docs" / "playground.png"))
