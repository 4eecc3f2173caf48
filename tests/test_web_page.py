"""The built-in page (GET /, /static/, GET /hjcg/stats) of the HTTP front: its stats over plain HTTP, and the
page itself in headless Chromium (Debian's chromium and chromium-driver, which `make browser-deps` installs)
chatting with a live server that has a bearer token."""
from __future__ import annotations

import importlib.util
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess

TOKEN = "page-test-token"
# an answer that stops at max tokens, never at EOS, and is long enough that the page's polls see it running
COUNTING = "Count from 1 to 100, separated by commas."
ANSWER_TOKENS = 40


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_page", ROOT / "scripts" / "screenshot_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def http_server():
    server = ServerProcess(env={"HJCG_AUTH_TOKEN": TOKEN}, http=True).wait_serving()
    yield server
    server.stop()


def fetch(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST of body as JSON."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


# --- /hjcg/stats and the static files over plain HTTP ---------------------------------------------------------


def test_stats_reports_the_server_and_the_latency_histograms(http_server):
    model = json.loads(fetch(f"{http_server.http_url}/v1/models", TOKEN)[2])["data"][0]["id"]
    status, _, body = fetch(f"{http_server.http_url}/v1/chat/completions", TOKEN, {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200, body
    # The answer goes out when its last token is sampled; the engine takes the stream out of the batch at its
    # next step boundary, so a read right after the answer may still count it running: read until it leaves.
    deadline = time.monotonic() + 10
    while True:
        status, kind, body = fetch(f"{http_server.http_url}/hjcg/stats", TOKEN)
        assert status == 200 and kind.startswith("application/json")
        stats = json.loads(body)
        if stats["running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["model"]["name"] == "SmolLM2-135M-Instruct"
    assert stats["model"]["dtype"] == "float32" and stats["model"]["context_length"] == 1024
    assert stats["device"] == "cpu" and stats["mode"] == "eager"
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["batch_bucket"] == 0
    assert stats["max_batch"] == 32 and stats["queue_size"] == 64
    kv = stats["kv"]
    assert kv["block_size"] == 16 and 0 <= kv["blocks_used"] < kv["blocks_total"] and kv["bytes_total"] > 0
    assert stats["graph_cache"] == {}  # no CUDA graphs on the CPU
    assert stats["uptime_s"] > 0
    for name, least in (("ttft", 1), ("inter_token", 3)):  # 4 tokens: a first one and 3 intervals at least
        h = stats[name]
        assert h["le"][-1] is None and h["le"][:-1] == sorted(h["le"][:-1]) and len(h["counts"]) == len(h["le"])
        assert sum(h["counts"]) == h["count"] >= least and h["sum_s"] > 0
    requests = stats["requests"]
    assert requests["by_status"].get("OK", 0) >= 1 and requests["generation_tokens"] >= 4
    assert requests["prompt_tokens"] > 0


def test_stats_need_the_token_and_the_page_does_not(http_server):
    for token in (None, "wrong"):
        status, _, body = fetch(f"{http_server.http_url}/hjcg/stats", token)
        assert status == 401
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, kind, body = fetch(f"{http_server.http_url}/")
    assert status == 200 and kind.startswith("text/html") and b'src="/static/app.js"' in body
    for name, kind_prefix in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, kind, _ = fetch(f"{http_server.http_url}/static/{name}")
        assert status == 200 and kind.startswith(kind_prefix), (name, kind)
    assert fetch(f"{http_server.http_url}/static/../web_page.py")[0] == 404


def test_stats_answer_503_while_the_model_loads():
    from fastapi.testclient import TestClient

    from hjcg_server.metrics import Metrics
    from hjcg_server.openai_api import FrontState, create_app

    response = TestClient(create_app(FrontState(Metrics()))).get("/hjcg/stats")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_loading" and response.json()["error"]["message"]


def test_histogram_counts_each_bucket_alone():
    from hjcg_server.metrics import Metrics
    from hjcg_server.web_page import histogram

    metrics = Metrics()
    for seconds in (0.003, 0.004, 0.05, 200.0):
        metrics.ttft.observe(seconds)
    h = histogram(metrics.ttft)
    assert h["count"] == 4 and h["sum_s"] == pytest.approx(200.057)
    by_bound = dict(zip(h["le"], h["counts"]))
    assert by_bound[0.005] == 2 and by_bound[0.06] == 1 and by_bound[None] == 1
    assert sum(h["counts"]) == 4


# --- the page in a real browser ------------------------------------------------------------------------------


def prompt_tokens(answer) -> int:
    """The prompt's length in tokens, from the line the page writes under an answer (the server's usage)."""
    from selenium.webdriver.common.by import By

    return int(answer.find_element(By.CLASS_NAME, "meta").text.split("prompt ")[1])


def set_field(driver, element_id: str, value) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


@pytest.fixture(scope="module")
def browser():
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: make test installs chromium and chromium-driver "
                        "(make browser-deps)")
        pytest.skip("chromium or chromedriver missing (make browser-deps, or apt-get install chromium "
                    "chromium-driver)")
    page = _screenshot_module()
    driver = page.headless_chrome(1280, 900)
    yield driver, page
    driver.quit()


def test_page_streams_a_chat_and_shows_the_server_live(http_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, page = browser
    driver.get(f"{http_server.http_url}/?refresh=200")  # polls every 0.2 s: short streams are seen running
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    WebDriverWait(driver, 10).until(lambda d: text("live-status") == "token needed")
    token = driver.find_element(By.ID, "token")
    token.send_keys(TOKEN)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
    WebDriverWait(driver, 10).until(lambda d: text("live-status") == "live")
    assert "SmolLM2-135M-Instruct" in text("model-line")

    set_field(driver, "max_tokens", ANSWER_TOKENS)
    answer = page.ask(driver, COUNTING)
    lengths, running_seen, kv_seen = set(), 0, 0
    deadline = time.monotonic() + 90
    while answer.get_attribute("data-state") == "streaming" and time.monotonic() < deadline:
        lengths.add(len(answer.find_element(By.CLASS_NAME, "content").text))
        running = text("live-running")
        running_seen = max(running_seen, int(running) if running.isdigit() else 0)
        kv_seen = max(kv_seen, int(driver.find_element(By.ID, "kv-text").get_attribute("data-used") or 0))
        time.sleep(0.01)
    assert answer.get_attribute("data-state") == "done", answer.text
    final = answer.find_element(By.CLASS_NAME, "content").text
    assert final.startswith("1, 2, 3")
    # (a) streamed: the answer grew over many reads and came in many chunks
    assert len({n for n in lengths if 0 < n < len(final)}) >= 2, lengths
    assert int(answer.get_attribute("data-chunks")) > 10
    assert "length" in answer.find_element(By.CLASS_NAME, "meta").text  # stopped at max tokens, as asked
    # (c) the live view showed the stream running and holding KV blocks, then its latencies
    assert running_seen >= 1 and kv_seen >= 1
    WebDriverWait(driver, 5).until(lambda d: int(d.find_element(By.ID, "itl-plot").get_attribute("data-count")) > 10)
    assert int(driver.find_element(By.ID, "ttft-plot").get_attribute("data-count")) >= 1
    assert driver.find_elements(By.CSS_SELECTOR, "#ttft-plot svg rect")
    assert "OK" in text("requests-text")
    # the conversation is kept: the second question is sent after the first answer (the prompt grows)
    first_prompt = prompt_tokens(answer)
    set_field(driver, "max_tokens", 2)
    answer = page.ask(driver, "Thanks!")
    assert page.wait_answered(driver, answer) == "done"
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert prompt_tokens(answer) > first_prompt + ANSWER_TOKENS


def test_page_stop_button_ends_the_stream(http_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, page = browser
    driver.get(http_server.http_url)  # the token was kept for this tab (sessionStorage)
    set_field(driver, "max_tokens", ANSWER_TOKENS)
    answer = page.ask(driver, COUNTING)
    WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda d: int(answer.get_attribute("data-chunks")) >= 2)
    driver.find_element(By.ID, "stop").click()
    assert page.wait_answered(driver, answer, timeout=10) == "stopped"
    assert driver.find_element(By.ID, "send").is_enabled()
    stopped_at = answer.find_element(By.CLASS_NAME, "content").text
    # the server saw the client go and cancelled the request: nothing runs, and it counts as CANCELLED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = json.loads(fetch(f"{http_server.http_url}/hjcg/stats", TOKEN)[2])
        if stats["running"] == 0 and stats["requests"]["by_status"].get("CANCELLED"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stopped request was not cancelled: {stats}")
    assert answer.find_element(By.CLASS_NAME, "content").text == stopped_at  # nothing more arrived
