"""The OpenAI-compatible HTTP front against live servers (`hjcg serve --http-listen`), through the official
openai client, curl and plain HTTP: endpoints, parameters, errors, disconnects, metrics."""
from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import httpx
import openai
import pytest

from conftest import ServerProcess, free_port

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def api():
    metrics_port = free_port()
    server = ServerProcess("--queue-size", "8", "--metrics-port", str(metrics_port), http=True).wait_serving()
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat(client, model, **kwargs):
    return client.chat.completions.create(model=model, messages=kwargs.pop("messages", PROMPT), **kwargs)


# --- endpoints ------------------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].object == "model"


def test_chat_answers_with_usage(client, model):
    answer = chat(client, model, temperature=0)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"  # hjcg's eos
    u = answer.usage
    assert u.prompt_tokens > 10 and u.completion_tokens > 3
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert answer.model == model and answer.object == "chat.completion"


def test_chat_stream_matches_the_answer_and_ends_with_usage(client, model):
    whole = chat(client, model, temperature=0).choices[0].message.content
    chunks = list(chat(client, model, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 3
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_length_and_stream(client, model):
    answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 4 and answer.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_takes_token_ids(client, model):
    by_text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0)
    ids = client.completions.create(model=model, prompt=[[1]], max_tokens=1, temperature=0)  # a list of one prompt
    assert ids.usage.prompt_tokens == 1
    again = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert again.choices[0].text == by_text.choices[0].text


# --- parameters -----------------------------------------------------------------------------------------------

def test_max_completion_tokens_and_max_tokens(client, model):
    assert chat(client, model, max_completion_tokens=3).usage.completion_tokens == 3
    assert chat(client, model, max_tokens=2).choices[0].finish_reason == "length"


def test_same_seed_same_text(client, model):
    texts = {chat(client, model, temperature=1.0, seed=1234, max_tokens=8).choices[0].message.content
             for _ in range(2)}
    assert len(texts) == 1


def test_top_p_and_top_k_narrow_to_the_greedy_token(client, model):
    greedy = chat(client, model, temperature=0, max_tokens=6).choices[0].message.content
    assert chat(client, model, temperature=1.5, top_p=1e-9, max_tokens=6).choices[0].message.content == greedy
    assert chat(client, model, temperature=1.5, max_tokens=6,
                extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0}).choices[0].message.content == greedy


def test_stop_string_ends_the_text(client, model):
    answer = chat(client, model, temperature=0, stop=[" Paris", "zzz"])
    assert answer.choices[0].message.content == "The capital of France is"
    assert answer.choices[0].finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens(client, model):
    answer = chat(client, model, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"


def test_n_choices(client, model):
    answer = chat(client, model, n=2, seed=5, max_tokens=4)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 8
    chunks = list(chat(client, model, n=2, seed=5, max_tokens=4, stream=True))
    for i, choice in enumerate(answer.choices):
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert streamed == choice.message.content  # choice i has seed 5 + i, streamed or not


def test_chat_logprobs(client, model):
    answer = chat(client, model, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the most likely token
        assert bytes(t.bytes).decode() == t.token


def test_completion_logprobs(client, model):
    answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0,
                                       logprobs=2)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == answer.choices[0].text
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                            lp.token_logprobs))


def test_json_object_output_parses(client, model):
    answer = chat(client, model, messages=[{"role": "user", "content": "Describe Paris as JSON."}], temperature=0,
                  max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_json_schema_output_validates(client, model):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    answer = chat(client, model, messages=[{"role": "user", "content": "Name a city and its population."}],
                  temperature=0, max_tokens=60,
                  response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"city", "population"}
    assert isinstance(value["city"], str) and isinstance(value["population"], int)


def test_regex_extension(client, model):
    answer = chat(client, model, temperature=0, max_tokens=10, response_format={"type": "regex", "regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", answer.choices[0].message.content)


def test_grammar_extension(client, model):
    answer = chat(client, model, temperature=1.0, seed=3, max_tokens=10,
                  response_format={"type": "grammar", "grammar": 'start: "yes" | "no"'})
    assert answer.choices[0].message.content in ("yes", "no")


# --- errors -----------------------------------------------------------------------------------------------------

def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "gpt-4o")
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize("kwargs, param", [
    (dict(top_p=7), "top_p"),
    (dict(temperature="hot"), "temperature"),             # pydantic's complaint, as a 400 not a 422
    (dict(max_tokens=100000), "max_tokens"),
    (dict(presence_penalty=0.5), "presence_penalty"),     # OpenAI semantics hjcg does not implement
    (dict(logit_bias={"1": 5}), "logit_bias"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(n=99), "n"),
    (dict(top_logprobs=30, logprobs=True), "top_logprobs"),
    (dict(response_format={"type": "xml"}), "response_format.type"),
    (dict(response_format={"type": "regex", "regex": "("}), "response_format"),       # the engine's compiler
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}), "ignore_eos"),
    (dict(extra_body={"top_k": -1}), "top_k"),
    (dict(extra_body={"bogus": 1}), "bogus"),              # unknown fields are refused, not ignored
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
])
def test_bad_parameters_are_400_naming_the_parameter(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_harmless_fields_are_accepted(client, model):
    answer = chat(client, model, max_tokens=2, user="u1", store=False, metadata={"k": "v"}, presence_penalty=0)
    assert answer.usage.completion_tokens == 2


def test_several_prompts_are_refused(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=["a", "b"], max_tokens=2)
    assert "one request per prompt" in e.value.body["message"]


# --- curl -----------------------------------------------------------------------------------------------------------

def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "120", *args], capture_output=True, text=True, timeout=130)


def test_curl_chat(api, model):
    body = json.dumps({"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": 8})
    out = curl(f"{api.http_url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body)
    assert "Paris" in json.loads(out.stdout)["choices"][0]["message"]["content"]


def test_curl_stream(api, model):
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 3, "stream": True})
    out = curl("-N", f"{api.http_url}/v1/completions", "-H", "Content-Type: application/json", "-d", body)
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_curl_errors_have_openai_shape(api):
    out = curl("-w", "\n%{http_code}", f"{api.http_url}/v1/nowhere")
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "404" and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    out = curl("-w", "\n%{http_code}", f"{api.http_url}/v1/chat/completions", "-H", "Content-Type: application/json",
               "-d", "{not json")
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "400" and json.loads(body)["error"]["code"] == "invalid_json"


# --- disconnects and metrics ---------------------------------------------------------------------------------------

def _cancelled_line(api, request_id: str, timeout: float = 15.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"request={re.escape(request_id)} http=499 status=CANCELLED finish=cancelled "
                          r"prompt_tokens=\d+ completion_tokens=(\d+)", api.log_text())
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no cancelled line for {request_id}:\n{api.log_text()[-3000:]}")


def test_streamed_client_that_disconnects_stops_its_generation(client, model, api):
    stream = chat(client, model, max_tokens=128, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    stream.close()
    found = _cancelled_line(api, first.id)
    assert int(found.group(1)) < 128


def test_non_streamed_client_that_disconnects_stops_its_generation(api, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 128, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{api.http_url}/v1/completions", json=body, timeout=httpx.Timeout(120, read=2.0))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "http=499 status=CANCELLED finish=cancelled" not in _cmpl_lines(api):
        time.sleep(0.1)
    line = _cmpl_lines(api)
    assert "http=499 status=CANCELLED finish=cancelled" in line
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 128


def _cmpl_lines(api) -> str:
    return "\n".join(line for line in api.log_text().splitlines() if "request=cmpl-" in line and "http=499" in line)


def test_metrics_count_http_requests(client, model, api):
    def scrape() -> str:
        return urllib.request.urlopen(api.metrics_url, timeout=10).read().decode()

    def value(text: str, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = scrape()
    answer = chat(client, model, max_tokens=3)
    time.sleep(0.3)  # the engine thread records the job's end just after the last token
    after = scrape()
    assert value(after, "hjcg_generation_tokens_total") - value(before, "hjcg_generation_tokens_total") == 3
    assert value(after, 'hjcg_requests_by_status_total{code="OK"}') - \
        value(before, 'hjcg_requests_by_status_total{code="OK"}') == 1
    assert answer.usage.completion_tokens == 3


# --- a server with a token, a queue of one and one row ----------------------------------------------------------

@pytest.fixture(scope="module")
def guarded():
    server = ServerProcess("--queue-size", "1", "--max-batch", "1", env={"HJCG_AUTH_TOKEN": TOKEN}, http=True)
    server.first_answer = _first_http_answer(server.http_url + "/v1/models")
    yield server.wait_serving()
    server.stop()


def _first_http_answer(url: str) -> tuple[int, dict]:
    """The first answer the HTTP front gives: it listens before the model has loaded."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            return r.status_code, r.json()
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(url)


def test_503_while_the_model_loads(guarded):
    status, body = guarded.first_answer
    assert status == 503 and body["error"]["code"] == "model_loading"


@pytest.mark.parametrize("key", [None, "wrong"])
def test_401_without_the_token(guarded, key):
    bad = openai.OpenAI(base_url=f"{guarded.http_url}/v1", api_key=key or "x", max_retries=0,
                        default_headers={} if key else {"Authorization": ""})
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_429_when_the_queue_is_full(guarded):
    good = openai.OpenAI(base_url=f"{guarded.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    model = good.models.list().data[0].id

    def one(_):
        try:
            return good.completions.create(model=model, prompt="Once upon a time", max_tokens=24,
                                           extra_body={"ignore_eos": True}).usage.completion_tokens
        except openai.RateLimitError as e:
            return e.body["code"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    # one row and a queue of one: at most two of four are admitted
    assert results.count("queue_full") >= 2 and 24 in results


def test_shutdown_lets_running_requests_finish_and_refuses_new_ones(guarded):
    """Last in the module: it stops the guarded server."""
    good = openai.OpenAI(base_url=f"{guarded.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    model = good.models.list().data[0].id
    stream = good.completions.create(model=model, prompt="Once upon a time", max_tokens=24, stream=True,
                                     extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    guarded.proc.terminate()
    deadline = time.monotonic() + 10
    while "shutting down" not in guarded.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as e:
        good.models.list()
    assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in [first, *rest])
    assert guarded.proc.wait(timeout=60) == 0


# --- the command line ---------------------------------------------------------------------------------------------

def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hjcg_server.cli", "serve", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=60)


def test_malformed_http_address_is_a_usage_error():
    out = serve("--http-listen", "localhost")
    assert out.returncode == 2 and "--http-listen" in out.stderr and "host:port" in out.stderr


def test_busy_http_port_fails_the_start():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = serve("--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} (--http-listen): address already in use" in out.stderr
