"""Issue #10 (hardening): statuses in logs and metrics, refused requests, listen addresses and sockets, the
open-network warning, malformed protobuf, CPU threads, --help, and the server's log from start to stop.

Each check goes through a public interface: a real `hjcg serve` process, the hjcg_client library, raw gRPC
calls, or the CLI's main()."""
import os
import re
import socket
import time
import urllib.request

import grpc
import pytest

from conftest import ServerProcess, cli, free_port
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_client import HjcgClient
from hjcg_server.cli import main

TOKEN = "h4rden"
LONG = dict(text="Tell me a very long story.", ignore_eos=True)


def wait_for_line(server: ServerProcess, pattern: str, timeout: float = 20.0) -> str:
    """The first log line matching pattern (a request's line is written once both of its ends are in)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in server.log_text().splitlines():
            if re.search(pattern, line):
                return line
        assert time.monotonic() < deadline, f"no log line matches {pattern!r}:\n{server.log_text()[-3000:]}"
        time.sleep(0.1)


def lines_with(server: ServerProcess, text: str) -> list[str]:
    return [line for line in server.log_text().splitlines() if text in line]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def by_status(code: str) -> str:
    return f'hjcg_requests_by_status_total{{code="{code}"}}'


# --- 1, 2: every request's one log line carries the status its client received (session server) -----------

def test_a_request_that_finishes_is_logged_ok_not_cancelled(server, client):
    _, finish = client.complete(text="Hello", max_new_tokens=2, ignore_eos=True, request_id="hard-ok-1")
    assert finish.reason == pb.FINISH_REASON_LENGTH
    line = wait_for_line(server, r"request=hard-ok-1 ")
    assert "status=OK finish=length" in line
    time.sleep(0.3)
    assert len(lines_with(server, "request=hard-ok-1 ")) == 1


def test_a_deadline_is_logged_deadline_exceeded(server, client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(max_new_tokens=128, request_id="hard-deadline-1", timeout=0.5, **LONG))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "status=DEADLINE_EXCEEDED finish=cancelled" in wait_for_line(server, r"request=hard-deadline-1 ")


def test_an_invalid_request_gets_one_log_line(server, client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(text="x", temperature=-1, request_id="hard-invalid-1"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    line = wait_for_line(server, r"request=hard-invalid-1 ")
    assert "status=INVALID_ARGUMENT" in line and "temperature" in line
    assert len(lines_with(server, "request=hard-invalid-1 ")) == 1


# --- 8: malformed protobuf is INVALID_ARGUMENT with one log line, no traceback ------------------------------

def test_malformed_protobuf_is_invalid_argument_without_traceback(server):
    before = len(server.log_text())
    with grpc.insecure_channel(server.tcp) as channel:
        generate = channel.unary_stream("/hjcg.v1.Hjcg/Generate")  # no serializer: the bytes go as they are
        with pytest.raises(grpc.RpcError) as info:
            list(generate(b"\x0a\x02\xff\xfe", timeout=10))  # field 1 (text): two bytes that are not UTF-8
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid hjcg.v1.GenerateRequest" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/hjcg.v1.Hjcg/Status")(b"\xff", timeout=10)  # a truncated tag
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.3)
    new = server.log_text()[before:]
    assert "Traceback" not in new and "Exception deserializing" not in new
    assert len([line for line in new.splitlines() if "not a valid" in line]) == 2, new
    with HjcgClient(server.tcp) as client:  # valid requests still work
        assert client.status().model.name == "SmolLM2-135M-Instruct"


def test_reflection_still_describes_the_service(client):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="hjcg.v1.Hjcg")
    answer = next(stub.ServerReflectionInfo(iter([request])))
    assert b"GenerateRequest" in answer.file_descriptor_response.file_descriptor_proto[0]


# --- 14: torch threads ---------------------------------------------------------------------------------------

def test_default_threads_are_the_cpus_this_process_may_use(server):
    affinity = len(os.sched_getaffinity(0))  # the server inherited this process's mask
    assert f"torch CPU threads: {affinity} (the CPUs this process may use)" in server.log_text()


@pytest.mark.parametrize("argv,message", [
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--threads", "two"], "--threads: expected a whole number"),
    (["--metrics-port", "99999"], "--metrics-port: a port is 1 to 65535"),
])
def test_threads_and_metrics_port_are_checked(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["serve", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


# --- 6: the open-network warning (none on loopback) --------------------------------------------------------

def test_no_open_network_warning_on_loopback(server):
    assert "without authentication" not in server.log_text()


# --- 15: hjcg --version ----------------------------------------------------------------------------------------

def test_hjcg_version_prints_the_package_version(capsys):
    from hjcg import __version__
    from hjcg_server.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hjcg {__version__}"


# --- 17: --help -----------------------------------------------------------------------------------------------

def test_serve_help_shows_defaults_and_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "random:<shape>" in text and "llama2-7b" in text and "smollm2-135m" in text
    body = text.split("options:")[1]
    starts = list(re.finditer(r"(?<!\S)(--[a-z-]+)(?: [A-Z{][A-Za-z_,{}]*)? ", body))
    helps = {m.group(1): body[m.end():n.start() if n else len(body)] for m, n in zip(starts, starts[1:] + [None])}
    assert {"--model", "--listen", "--threads", "--max-context", "--grace", "--log-level"} <= set(helps)
    for option, help_text in helps.items():
        if option not in ("--help", "--warm"):  # a flag's default is "off"
            assert "default:" in help_text, (option, help_text)
    assert "--log-level {DEBUG,INFO,WARNING,ERROR} least severe log messages shown (default: INFO)" in text
    assert "(default: 4096)" in text and "(default: 127.0.0.1:50051)" in text


# --- 5: listen addresses are checked before anything else ---------------------------------------------------

@pytest.mark.timeout(60)  # the unchecked server would bind a random port and serve forever
@pytest.mark.parametrize("address,message", [
    ("notanaddress", "expected host:port"),
    ("127.0.0.1:99999", "the port must be 1 to 65535"),
    ("127.0.0.1:-1", "the port must be"),
    ("127.0.0.1:http", "the port must be"),
    (":50051", "expected host:port"),
    ("[::1:50051", "not a bracketed IPv6 address"),
    ("::1:50051", "not an IPv4 address or host name"),
    ("unix:", "give the socket's path"),
])
def test_bad_listen_addresses_exit_2_with_a_message(capsys, address, message):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--device", "cpu", "--listen", address])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


# --- 3, 4: a live server's socket or port is never taken over ----------------------------------------------

@pytest.mark.timeout(60)  # a takeover would serve forever
def test_a_live_servers_unix_socket_is_refused(server, capsys):
    assert main(["serve", "--device", "cpu", "--listen", server.unix]) == 2
    assert "a server is already listening there" in capsys.readouterr().err
    with HjcgClient(server.unix) as client:  # the first server keeps its socket
        assert client.health() == "SERVING"


@pytest.mark.timeout(60)
def test_a_path_that_is_not_a_socket_is_refused(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["serve", "--device", "cpu", "--listen", f"unix:{precious}"]) == 2
    assert "exists and is not a socket" in capsys.readouterr().err
    assert precious.read_text() == "keep me"


@pytest.mark.timeout(60)  # with SO_REUSEPORT the second server would bind and serve forever
def test_a_busy_tcp_port_is_address_already_in_use(server, capsys):
    assert main(["serve", "--device", "cpu", "--listen", server.tcp]) == 2
    assert "address already in use" in capsys.readouterr().err


# --- A server with a token, a queue of 1, --threads 1, port 0, metrics and fp8 weights: refusals, counts, shutdown

@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    metrics_port = free_port()
    s = ServerProcess("--auth-token-file", str(token_file), "--queue-size", "1", "--threads", "1",
                      "--metrics-port", str(metrics_port), "--listen", "127.0.0.1:0", "--grace", "3",
                      "--max-new-tokens", "900", "--weights", "fp8").wait_serving()
    s.metrics_port = metrics_port
    yield s
    s.stop()


def test_threads_flag_is_honoured(guarded):
    assert "torch CPU threads: 1 (--threads)" in guarded.log_text()


def test_weights_flag_is_reported_by_status(guarded):
    with HjcgClient(guarded.tcp, token=TOKEN) as client:
        model = client.status().model
        assert (model.dtype, model.weights) == ("float32", "fp8_e4m3")
    status = cli("status", target=guarded.tcp, env={**os.environ, "HJCG_AUTH_TOKEN": TOKEN})
    assert "float32, weights fp8_e4m3" in status.stdout, status.stderr


def test_an_unknown_weight_format_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--weights", "int4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--weights" in err and "'fp8'" in err


def test_port_0_is_logged_as_the_port_bound(guarded):
    line = wait_for_line(guarded, r"listening on ")
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
    assert ":0," not in line and ":0 " not in line and len(ports) == 2
    bound = next(p for p in ports if p != guarded.port)
    with HjcgClient(f"127.0.0.1:{bound}") as client:
        assert client.health() == "SERVING"


def test_refusals_and_finishes_are_logged_and_counted_by_the_status_sent(guarded):
    with HjcgClient(guarded.tcp) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            list(anonymous.generate(text="x", max_new_tokens=1))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            anonymous.status()  # logged, but not a Generate request: not counted
    with HjcgClient(guarded.tcp, token=TOKEN) as client:
        for i in range(2):
            client.complete(text="Hi", max_new_tokens=2, ignore_eos=True, request_id=f"guarded-ok-{i}")
        with pytest.raises(grpc.RpcError):
            list(client.generate(text="x", top_p=2.0, request_id="guarded-invalid"))
        running = client.generate(max_new_tokens=400, request_id="guarded-running", **LONG)
        waiting = None
        try:
            next(running)  # running: the next one waits in the queue of one
            waiting = client.generate(max_new_tokens=400, request_id="guarded-waiting", **LONG)
            deadline = time.monotonic() + 10
            while client.status().queue_depth < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:
                list(client.generate(max_new_tokens=4, request_id="guarded-full", **LONG))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:  # the queue must be empty for the next test
            for call in (running, waiting):
                if call is not None:
                    call.cancel()
    expected = {"guarded-ok-0": "status=OK finish=length", "guarded-ok-1": "status=OK finish=length",
                "guarded-invalid": "status=INVALID_ARGUMENT error=", "guarded-full": "status=RESOURCE_EXHAUSTED",
                "guarded-running": "status=CANCELLED finish=cancelled",
                "guarded-waiting": "status=CANCELLED finish=cancelled"}
    for request_id, text in expected.items():
        assert text in wait_for_line(guarded, rf"request={request_id} "), request_id
        assert len(lines_with(guarded, f"request={request_id} ")) == 1
    assert len(lines_with(guarded, "status=UNAUTHENTICATED")) == 2  # the Generate and the Status call
    counts = {code: metric(guarded.metrics_port, by_status(code))
              for code in ("OK", "CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED")}
    assert counts == {"OK": 2, "CANCELLED": 2, "INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1,
                      "UNAUTHENTICATED": 1}


def test_shutdown_past_the_grace_period_is_logged_unavailable_then_stopped(guarded):
    """Last of the guarded tests: it stops the server."""
    with HjcgClient(guarded.tcp, token=TOKEN) as client:
        call = client.generate(max_new_tokens=900, request_id="guarded-cut", **LONG)
        next(call)
        guarded.proc.terminate()
        wait_for_line(guarded, "shutting down: draining 1 request")
        with pytest.raises(grpc.RpcError) as late:
            list(client.generate(text="x", max_new_tokens=1, request_id="guarded-late"))
        with pytest.raises(grpc.RpcError) as cut:
            list(call)
    assert late.value.code() == cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert guarded.proc.wait(timeout=60) == 0
    assert "status=UNAVAILABLE finish=cancelled" in wait_for_line(guarded, "request=guarded-cut ")
    assert "status=UNAVAILABLE error=" in wait_for_line(guarded, "request=guarded-late ")
    log = guarded.log_text()
    assert "\r" not in log and "Traceback" not in log  # 18: no progress bars in a log file
    assert "stopped (exit code 0)" in log.splitlines()[-1]


# --- 3, 18: a stale socket is replaced; an idle server stops without "draining" and says "stopped" ---------

def test_stale_socket_is_replaced_and_an_idle_stop_logs_stopped(tmp_path):
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # its server is gone: the file stays, nobody accepts
    s = ServerProcess("--listen", f"unix:{stale}").wait_serving()
    try:
        with HjcgClient(f"unix:{stale}") as client:
            assert client.health() == "SERVING"
    finally:
        assert s.stop() == 0
    log = s.log_text()
    assert "shutting down" in log and "draining" not in log
    assert "\r" not in log and "Loading weights" not in log
    assert "stopped (exit code 0)" in log.splitlines()[-1]
    assert not stale.exists()


# --- 6, 18: the open-network warning; a failed load stops without "draining" -------------------------------

def test_open_address_warns_and_a_failed_load_stops_cleanly(tmp_path):
    s = ServerProcess("--listen", "0.0.0.0:0", "--model", str(tmp_path / "no-such-model"))
    try:
        assert s.proc.wait(timeout=120) == 1
    finally:
        s.stop()
    log = s.log_text()
    warning = next(line for line in log.splitlines() if "without authentication" in line)
    assert " WARNING " in warning and "open to the network" in warning and "0.0.0.0:" in warning
    assert "0.0.0.0:0" not in warning  # the port bound, not 0
    assert "cannot load the model" in log and "draining" not in log and "Traceback" not in log
    assert "stopped (exit code 1)" in log.splitlines()[-1]
