"""Issue #11, item 5: the engine never waits on a client. A client that stops reading is buffered (gRPC's
flow-control window, then the job's queue) while other streams go on; once it has taken no message for
--unread-timeout seconds while tokens wait, its request is cancelled (its batch row goes to others) and it gets
RESOURCE_EXHAUSTED when it reads again; one that never reads again has its RPC cancelled.

The slow client's channel turns off gRPC's window growth (BDP probing) and announces a 4 KiB window, so that
the server's sends block after a few token messages, as they would for any client once its window is full."""
import threading
import time

import grpc
import pytest

from conftest import ServerProcess
from hjcg.requests import GenerationRequest, TokenOutput
from hjcg.v1 import hjcg_pb2 as pb
from hjcg.v1 import hjcg_pb2_grpc as pb_grpc
from hjcg_client import HjcgClient
from hjcg_server.worker import Job
from test_server_hardening import wait_for_line

UNREAD_TIMEOUT_S = 2.0
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--unread-timeout", str(UNREAD_TIMEOUT_S), "--max-batch", "4").wait_serving()
    yield s
    s.stop()


def big_messages(request_id: str, tokens: int = 128) -> pb.GenerateRequest:
    """A request whose token messages carry 20 alternatives each (a few hundred bytes)."""
    return pb.GenerateRequest(text="Tell me a long story about the sea.", max_new_tokens=tokens, ignore_eos=True,
                              logprobs=True, top_logprobs=20, request_id=request_id)


def test_a_client_that_stops_reading_is_cancelled_and_told_why_while_others_stream_on(server):
    with grpc.insecure_channel(server.tcp, options=SMALL_WINDOW) as channel:
        slow = iter(pb_grpc.HjcgStub(channel).Generate(big_messages("slow-1")))
        assert next(slow).HasField("token")
        # another client streams its whole answer meanwhile, its tokens unaffected by the stalled one
        finished = {}

        def other() -> None:
            with HjcgClient(server.tcp) as client:
                finished["finish"] = client.complete(text="Hello", max_new_tokens=24, ignore_eos=True)[1]

        thread = threading.Thread(target=other)
        thread.start()
        wait_for_line(server, r"request slow-1: its client took no message for 2\.0 s")
        received = 1
        with pytest.raises(grpc.RpcError) as info:  # read at once: the server waits another timeout for that
            for response in slow:
                received += response.HasField("token")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "read too slowly" in info.value.details() and "2 s" in info.value.details()
        assert received < 128  # cancelled, not run to its end
        thread.join(timeout=120)
    assert finished["finish"].reason == pb.FINISH_REASON_LENGTH and finished["finish"].usage.completion_tokens == 24
    assert "status=RESOURCE_EXHAUSTED finish=cancelled" in wait_for_line(server, r"request=slow-1 ")


def test_a_client_that_never_reads_again_has_its_rpc_cancelled(server):
    with grpc.insecure_channel(server.tcp, options=SMALL_WINDOW) as channel:
        call = pb_grpc.HjcgStub(channel).Generate(big_messages("gone-1"))
        assert next(iter(call)).HasField("token")
        # cancelled as a slow reader after 2 s, then the RPC itself after another 2 s
        line = wait_for_line(server, r"request=gone-1 ", timeout=30)
        assert "status=CANCELLED finish=cancelled" in line
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED


def test_a_reader_that_keeps_up_is_never_cancelled(server):
    """Tokens a reader takes as they come never count against it, however long the stream runs."""
    with grpc.insecure_channel(server.tcp, options=SMALL_WINDOW) as channel:
        responses = list(pb_grpc.HjcgStub(channel).Generate(big_messages("steady-1", tokens=100)))
    assert sum(r.HasField("token") for r in responses) == 100
    assert responses[-1].finish.reason == pb.FINISH_REASON_LENGTH


# --- the clock: what counts as a reader that stopped reading (the job's two ends, no server) -------------------

def a_job(limit_s: float) -> Job:
    return Job(GenerationRequest(prompt_ids=[1, 2, 3], max_new_tokens=8), "clock", unread_timeout_s=limit_s)


def token(index: int) -> TokenOutput:
    return TokenOutput(id=index, text="x", index=index)


def test_a_quiet_spell_before_the_tokens_does_not_count_against_a_waiting_reader():
    """Queued, prefilling or behind a warm-up, a job has nothing to read for a while; its reader waits. Two tokens
    that then land before the reader thread runs are not a stalled reader."""
    job = a_job(0.2)
    time.sleep(0.3)
    job.put(token(0))
    job.put(token(1))
    assert not job.reader_stalled()


def test_a_token_left_unread_past_the_limit_is_a_stalled_reader():
    job = a_job(0.2)
    job.put(token(0))
    time.sleep(0.3)
    job.put(token(1))
    assert job.reader_stalled()


def test_taking_tokens_restarts_the_clock():
    job = a_job(0.2)
    job.put(token(0))
    time.sleep(0.3)
    assert job.take(timeout=1).index == 0
    job.put(token(1))
    job.put(token(2))
    assert not job.reader_stalled()
