"""Takes docs/page.png: the built-in page after a chat, in headless Chromium (Debian's chromium and
chromium-driver; nothing is downloaded).

    python scripts/screenshot_page.py                       # starts hjcg serve on free ports, then stops it
    python scripts/screenshot_page.py --url http://127.0.0.1:8000 --token-file token.txt

The browser helpers here (headless_chrome, ask) are also what tests/test_web_page.py drives the page with.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUESTION = "Name three primary colors."
STREAMING = "Write a short poem about the sea."


def headless_chrome(width: int = 1280, height: int = 900) -> WebDriver:
    """Debian's Chromium, headless; --no-sandbox because CI runs as root, where the sandbox refuses to start."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # --window-size counts the window's frame; this sets the page's own viewport, so pictures are width x height
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def ask(driver: WebDriver, text: str) -> WebElement:
    """Types text into the page's chat and sends it; returns the answer's element (its data-state is
    "streaming" until the stream ends, then "done", "stopped" or "error")."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def wait_answered(driver: WebDriver, answer: WebElement, timeout: float = 120) -> str:
    """Waits for the stream to end; returns the answer's final state."""
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: answer.get_attribute("data-state") != "streaming")
    return answer.get_attribute("data-state")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, token: str | None, timeout: float = 180, proc: subprocess.Popen | None = None) -> dict:
    """Polls GET {url}/hjcg/stats until the model is loaded; returns the stats."""
    request = urllib.request.Request(f"{url}/hjcg/stats", headers={"Authorization": f"Bearer {token}"} if token else {})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            if e.code != 503:  # 503: the model is loading; anything else will not change by waiting
                raise RuntimeError(f"{url}/hjcg/stats answered {e.code}: {e.read().decode(errors='replace')}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/hjcg/stats did not answer within {timeout:.0f} s")


@contextmanager
def local_server() -> Iterator[str]:
    """hjcg serve on the CPU with the embedded model, on free ports; yields the HTTP front's URL."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="hjcg-screenshot-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "server"), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "hjcg_server.cli", "serve", "--device", "cpu",
                             "--listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, None, proc=proc)
        yield url
    except BaseException:
        print(Path(log.name).read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def screenshot(url: str, out: Path, token: str | None) -> None:
    driver = headless_chrome(1280, 860)
    try:
        driver.get(url)
        if token:
            field = driver.find_element(By.ID, "token")
            field.send_keys(token)
            driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
        # a fixed seed: the same picture on every run of the same model
        seed = driver.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("7")
        for question in ("What is the capital of France?", QUESTION):
            state = wait_answered(driver, ask(driver, question))
            if state != "done":
                raise RuntimeError(f"the chat ended {state}")
        # the picture is taken while a third answer streams, so the live view shows it running
        answer = ask(driver, STREAMING)
        WebDriverWait(driver, 120, poll_frequency=0.05).until(
            lambda d: int(answer.get_attribute("data-chunks")) >= 24
            and d.find_element(By.ID, "live-running").text not in ("0", "–"))
        driver.save_screenshot(str(out))
        driver.find_element(By.ID, "stop").click()
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running HTTP front (default: start hjcg serve for the picture)")
    parser.add_argument("--token-file", help="the server's bearer token, if it has one")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    args = parser.parse_args()
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    if args.url:
        wait_http(args.url.rstrip("/"), token)
        screenshot(args.url.rstrip("/"), args.out, token)
    else:
        with local_server() as url:
            screenshot(url, args.out, None)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
