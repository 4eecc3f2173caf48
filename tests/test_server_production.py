"""The server under load, faults, hostile input and with TLS and metrics, each against a real process."""
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, free_port
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_client import HjcgClient

DOCUMENTED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def busy_server():
    s = ServerProcess("--queue-size", "64", "--max-new-tokens", "8").wait_serving()
    yield s
    s.stop()


def test_64_concurrent_streaming_clients_each_get_every_token(busy_server):
    per_client, tokens = 3, 4
    results, errors = [], []

    def client_loop(i):
        try:
            with HjcgClient(busy_server.tcp if i % 2 else busy_server.unix) as client:
                for j in range(per_client):
                    responses = list(client.generate(token_ids=[1 + i, 2 + j, 3], max_new_tokens=tokens,
                                                     ignore_eos=True, request_id=f"c{i}-r{j}"))
                    streamed = [r for r in responses if r.HasField("token")]
                    results.append((f"c{i}-r{j}", len(streamed), responses[-1].finish.usage.completion_tokens,
                                    {r.request_id for r in responses}))
        except Exception as e:  # collected: a failing thread must fail the test, not vanish
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(results) == 64 * per_client
    assert len({r[0] for r in results}) == 64 * per_client  # none lost, none answered twice
    assert all(n == tokens and usage == tokens and ids == {rid} for rid, n, usage, ids in results)


def test_clients_that_vanish_mid_stream_free_their_slots(busy_server):
    for _ in range(5):
        channel = grpc.insecure_channel(busy_server.tcp)
        from hjcg.v1 import hjcg_pb2_grpc

        call = hjcg_pb2_grpc.HjcgStub(channel).Generate(
            pb.GenerateRequest(text="Tell me everything.", max_new_tokens=8, ignore_eos=True))
        next(call)
        channel.close()  # gone without a word
    with HjcgClient(busy_server.tcp) as client:
        deadline = time.monotonic() + 30
        while (client.status().running or client.status().queue_depth) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = client.status()
        assert status.running == 0 and status.queue_depth == 0
        assert client.health() == "SERVING"


def test_flood_past_the_queue(busy_server):
    s = ServerProcess("--queue-size", "2", "--max-new-tokens", "30").wait_serving()
    try:
        outcomes = []

        def one():
            try:
                with HjcgClient(s.tcp) as client:
                    _, finish = client.complete(text="Flood", max_new_tokens=30, ignore_eos=True)
                    outcomes.append(("ok", finish.usage.completion_tokens))
            except grpc.RpcError as e:
                outcomes.append((e.code(), e.details()))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        ok = [o for o in outcomes if o[0] == "ok"]
        rejected = [o for o in outcomes if o[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(ok) + len(rejected) == 12 and ok and rejected
        assert all(n == 30 for _, n in ok)
        assert all("queue is full" in d for _, d in rejected)
    finally:
        s.stop()


requests = st.builds(
    pb.GenerateRequest,
    text=st.one_of(st.none(), st.text(max_size=40)),
    max_new_tokens=st.integers(0, 2**32 - 1),
    sampling=st.builds(pb.SamplingParams, temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
                       top_k=st.integers(-2**31, 2**31 - 1), top_p=st.floats(width=32),
                       min_p=st.floats(width=32), repetition_penalty=st.floats(width=32),
                       seed=st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    stop=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(st.integers(-2**31, 2**31 - 1), max_size=70),
    ignore_eos=st.booleans(),
    request_id=st.text(max_size=150),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, ids=st.one_of(st.none(), st.lists(st.integers(-2**31, 2**31 - 1), max_size=20)),
       chat=st.one_of(st.none(), st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "x", ""]),
                                                   st.text(max_size=30)), max_size=4)))
def test_fuzzed_requests_get_only_documented_codes(busy_server, request, ids, chat):
    if ids is not None:
        request.token_ids.ids.extend(ids)
    elif chat is not None:
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in chat)
    with HjcgClient(busy_server.tcp) as client:
        try:
            responses = list(client.generate_stream(request, timeout=60))
            assert responses[-1].HasField("finish")
        except grpc.RpcError as e:
            assert e.code() in DOCUMENTED_CODES, (e.code(), e.details())
            assert e.details()


def test_server_healthy_after_fuzzing(busy_server):
    with HjcgClient(busy_server.tcp) as client:
        assert client.health() == "SERVING"
        _, finish = client.complete(text="Still here?", max_new_tokens=2)
        assert finish.usage.completion_tokens >= 1


def test_metrics_endpoint_counts_requests(tmp_path):
    port = free_port()
    s = ServerProcess("--metrics-port", str(port)).wait_serving()
    try:
        with HjcgClient(s.tcp) as client:
            client.complete(text="Hello", max_new_tokens=3, ignore_eos=True)
            with pytest.raises(grpc.RpcError):
                list(client.generate(text="", max_new_tokens=1))
        text = _scrape(port)
        for name in ("hjcg_time_to_first_token_seconds_count 1.0", "hjcg_generation_tokens_total 3.0",
                     'hjcg_request_success_total{finished_reason="length"} 1.0',
                     'hjcg_requests_by_status_total{code="INVALID_ARGUMENT"} 1.0',
                     "hjcg_inter_token_latency_seconds_count 2.0", "hjcg_num_requests_waiting 0.0",
                     "hjcg_num_requests_running 0.0", "hjcg_graph_cache_bytes 0.0"):
            assert name in text, name
        with HjcgClient(s.tcp) as client:
            call = client.generate_stream(client.request(text="Tell me a long story.", max_new_tokens=64,
                                                         ignore_eos=True))
            next(call)  # the stream runs: one row of the smallest batch bucket, its blocks in use
            try:
                running = _scrape(port)
            finally:
                call.cancel()
        for name in ("hjcg_num_requests_running 1.0", "hjcg_batch_bucket 1.0"):
            assert name in running, name
        usage = float(next(line.split()[1] for line in running.splitlines()
                           if line.startswith("hjcg_kv_cache_usage_ratio ")))
        assert 0.0 < usage < 1.0
    finally:
        s.stop()


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_tls_and_mutual_tls(tmp_path):
    def make_cert(name, cn):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={cn}",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(tmp_path / f"{name}.key"),
                        "-out", str(tmp_path / f"{name}.pem")], check=True, capture_output=True)
        return str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")

    cert, key = make_cert("server", "localhost")
    client_cert, client_key = make_cert("client", "hjcg-client")
    s = ServerProcess("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", client_cert)
    try:
        deadline = time.monotonic() + 120
        target = f"localhost:{s.port}"
        while True:
            try:
                with HjcgClient(target, tls_ca=cert, tls_cert=client_cert, tls_key=client_key) as client:
                    if client.health(timeout=1.0) == "SERVING":
                        break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline and s.proc.poll() is None, s.log_text()
            time.sleep(0.3)
        with HjcgClient(target, tls_ca=cert, tls_cert=client_cert, tls_key=client_key) as client:
            assert "Paris" in client.complete(chat=[("user", "What is the capital of France?")],
                                              max_new_tokens=12)[0]
        with HjcgClient(target, tls_ca=cert) as no_client_cert:  # mutual TLS: refused
            with pytest.raises(grpc.RpcError) as info:
                no_client_cert.status(timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with HjcgClient(s.tcp) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.status(timeout=5)
    finally:
        s.stop()


def test_sigterm_past_the_grace_period_ends_running_requests_with_unavailable():
    s = ServerProcess("--grace", "1", "--max-new-tokens", "128").wait_serving()
    try:
        with HjcgClient(s.tcp) as client:
            call = client.generate(text="A very long story:", max_new_tokens=128, ignore_eos=True)
            next(call)
            s.proc.terminate()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shut down" in info.value.details()
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()


def test_health_is_not_serving_while_the_model_loads_and_generate_is_unavailable():
    s = ServerProcess()
    try:
        seen = []
        deadline = time.monotonic() + 120
        with HjcgClient(s.tcp) as client:
            while time.monotonic() < deadline:
                try:
                    state = client.health(timeout=1.0)
                except grpc.RpcError:
                    time.sleep(0.05)
                    continue
                if not seen or seen[-1] != state:
                    seen.append(state)
                if state == "NOT_SERVING":
                    try:
                        list(client.generate(text="early", max_new_tokens=1))
                    except grpc.RpcError as e:  # (the load may finish between the two calls)
                        assert e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.details()
                if state == "SERVING":
                    break
                time.sleep(0.05)
        assert seen[0] == "NOT_SERVING" and seen[-1] == "SERVING"
    finally:
        s.stop()
