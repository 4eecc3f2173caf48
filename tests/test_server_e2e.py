"""A real `hjcg serve` process on a loopback port and a unix socket, driven by the client and the CLI."""
import json
import os
import stat
import time

import grpc
import pytest
import torch

from conftest import ServerProcess, cli
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_client import HjcgClient

QUESTION = [("user", "What is the capital of France?")]


def test_chat_answer_streams_over_tcp_and_unix_socket(server):
    for target in (server.tcp, server.unix):
        with HjcgClient(target) as client:
            responses = list(client.generate(chat=QUESTION, max_new_tokens=30))
        tokens = [r.token for r in responses if r.HasField("token")]
        assert len(tokens) > 3 and [t.index for t in tokens] == list(range(len(tokens)))
        assert "Paris" in "".join(t.text for t in tokens)
        finish = responses[-1].finish
        assert finish.reason == pb.FINISH_REASON_EOS
        assert finish.usage.completion_tokens == len(tokens) + 1  # the EOS token counts, unstreamed
        assert finish.usage.prompt_tokens > 0 and finish.usage.total_ms >= finish.usage.ttft_ms > 0
        assert responses[0].request_id == responses[-1].request_id != ""


def test_greedy_output_identical_to_transformers(server, hf_model):
    ids = hf_model.tokenizer("The history of Rome", add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        expected = hf_model.hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    with HjcgClient(server.tcp) as client:
        responses = list(client.generate(token_ids=ids, max_new_tokens=24, ignore_eos=True))
    got = [r.token.id for r in responses if r.HasField("token")]
    assert got == expected.tolist()


def test_seeded_sampling_reproducible_over_the_wire(client):
    kwargs = dict(text="A poem about the sea:", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    first, _ = client.complete(**kwargs)
    again, _ = client.complete(**kwargs)
    assert first == again


def test_stop_string(client):
    text, finish = client.complete(chat=QUESTION, max_new_tokens=30, stop=["France"])
    assert finish.reason == pb.FINISH_REASON_STOP and text == "The capital of "


def test_request_id_is_echoed(client):
    responses = list(client.generate(text="Hi", max_new_tokens=2, request_id="abc-123"))
    assert {r.request_id for r in responses} == {"abc-123"}


def test_default_max_new_tokens_applies(client):
    _, finish = client.complete(text="Count to a hundred:", ignore_eos=True)
    assert finish.reason == pb.FINISH_REASON_LENGTH and finish.usage.completion_tokens == 16


BAD_REQUESTS = [
    (pb.GenerateRequest(), "one of text, chat or token_ids"),
    (pb.GenerateRequest(text=""), "text is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-5])), "outside the vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 769)), "at most 768"),
    (pb.GenerateRequest(text="x", max_new_tokens=129), "max_new_tokens"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages is empty"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])), "role"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=-0.5)), "temperature"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_k=-1)), "top_k"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(min_p=float("nan"))), "finite"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(repetition_penalty=-1)), "repetition_penalty"),
    (pb.GenerateRequest(text="x", stop=[""]), "stop[0]"),
    (pb.GenerateRequest(text="x", stop=["s"] * 17), "stop strings"),
    (pb.GenerateRequest(text="x", stop_token_ids=[10**6]), "stop token id"),
    (pb.GenerateRequest(text="x", request_id="r" * 129), "request_id"),
    (pb.GenerateRequest(text="x", request_id="bad\nid"), "request_id"),
]


@pytest.mark.parametrize("request_,message", BAD_REQUESTS)
def test_bad_input_is_invalid_argument_with_a_message(client, request_, message):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream(request_))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_cancel_mid_stream_frees_the_worker(server, client):
    call = client.generate_stream(client.request(text="Write a very long essay.", max_new_tokens=128,
                                                 ignore_eos=True))
    received = 0
    for response in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while client.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.status().running == 0
    assert "status=CANCELLED finish=cancelled" in server.log_text()
    _, finish = client.complete(text="Hi", max_new_tokens=2)  # the server still answers
    assert finish.usage.completion_tokens >= 1


def _wait_until_idle(client, timeout_s: float = 10.0) -> pb.StatusResponse:
    deadline = time.monotonic() + timeout_s
    status = client.status()
    while (status.running or status.kv_cache.blocks_used) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = client.status()
    return status


def test_deadline_exceeded(client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(text="Write a long story.", max_new_tokens=128, ignore_eos=True, timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status = _wait_until_idle(client)  # the late stream left the batch and gave its KV blocks back
    assert status.running == 0 and status.batch_bucket == 0 and status.kv_cache.blocks_used == 0


def test_status_reports_running_streams_their_batch_bucket_and_kv_cache_use(client):
    assert _wait_until_idle(client).running == 0
    calls = [client.generate_stream(client.request(text=f"Story {i}: once upon a time", max_new_tokens=128,
                                                   ignore_eos=True)) for i in range(3)]
    try:
        for call in calls:
            next(call)  # each stream has joined the batch and holds its prompt's blocks
        status = client.status()
        assert status.running == 3 and status.batch_bucket == 4  # the smallest decode bucket that holds 3 rows
        kv = status.kv_cache
        assert 3 <= kv.blocks_used <= kv.blocks_total and kv.block_size > 0 and kv.bytes_total > 0
    finally:
        for call in calls:
            call.cancel()
    status = _wait_until_idle(client)
    assert status.running == 0 and status.batch_bucket == 0 and status.kv_cache.blocks_used == 0


def test_status_and_warm_graphs_on_the_cpu(client):
    status = client.status()
    assert status.model.name == "SmolLM2-135M-Instruct" and status.model.vocab_size == 49152
    assert status.model.context_length == 1024 and status.device == "cpu" and status.engine_mode == "eager"
    assert status.version and status.uptime_s > 0 and status.graph_cache.entries == 0
    assert status.max_prompt_tokens == 768 and status.max_new_tokens == 128
    report = client.warm([16, 32])
    assert report.available is False and "not available" in report.message and not report.graphs
    with pytest.raises(grpc.RpcError) as info:
        client.warm([0])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(server, client):
    assert client.health() == "SERVING"
    assert client.health("hjcg.v1.Hjcg") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"hjcg.v1.Hjcg", "grpc.health.v1.Health"} <= names


def test_unix_socket_is_owner_only(server):
    mode = stat.S_IMODE(os.stat(server.unix[len("unix:"):]).st_mode)
    assert mode == 0o600


def test_cli_generate_streams_text_and_json(server):
    result = cli("generate", "--chat", "What is the capital of France?", target=server.unix)
    assert result.returncode == 0 and "Paris" in result.stdout
    result = cli("generate", "Hello", "--max-new-tokens", "3", "--ignore-eos", "--json", target=server.tcp)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(lines) == 4 and "token" in lines[0]
    assert lines[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"


def test_cli_status_warm_health(server):
    assert "SmolLM2-135M-Instruct" in cli("status", target=server.tcp).stdout
    assert json.loads(cli("status", "--json", target=server.tcp).stdout)["engine_mode"] == "eager"
    assert "not available" in cli("warm", target=server.tcp).stdout
    assert cli("health", target=server.tcp).stdout.strip() == "SERVING"


def test_cli_reports_errors_with_non_zero_exit(server):
    bad = cli("generate", "x", "--temperature", "-1", target=server.tcp)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "temperature" in bad.stderr
    down = cli("status", target="127.0.0.1:1")
    assert down.returncode == 1 and "cannot reach an hjcg server" in down.stderr


def test_queue_full_is_resource_exhausted():
    # one row in the batch and room for one request waiting for it: the third request is refused
    s = ServerProcess("--queue-size", "1", "--max-batch", "1").wait_serving()
    try:
        with HjcgClient(s.tcp) as client:
            long = dict(text="Tell a long story.", max_new_tokens=60, ignore_eos=True)
            running = client.generate(**long)
            next(running)                       # the first request is running
            waiting = client.generate(**long)   # fills the queue of one
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as info:
                list(client.generate(**long))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
            assert sum(1 for r in running if r.HasField("token")) == 59
            assert sum(1 for r in waiting if r.HasField("token")) == 60
    finally:
        s.stop()


def test_bearer_token_required_and_sigterm_drains(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    s = ServerProcess("--auth-token-file", str(token_file), "--grace", "20").wait_serving()
    try:
        with HjcgClient(s.tcp) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.status()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(anonymous.generate(text="x", max_new_tokens=1))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with HjcgClient(s.tcp, token="wrong") as wrong:
            with pytest.raises(grpc.RpcError):
                wrong.status()
        with HjcgClient(s.tcp, token="s3cret") as client:
            assert client.status().model.name == "SmolLM2-135M-Instruct"
            # SIGTERM while a request runs: it finishes, then the process exits 0
            call = client.generate(text="Tell a story.", max_new_tokens=40, ignore_eos=True)
            next(call)
            s.proc.terminate()
            rest = list(call)
            assert rest[-1].finish.usage.completion_tokens == 40
        assert s.proc.wait(timeout=30) == 0
        assert "shutting down" in s.log_text()
    finally:
        s.stop()
