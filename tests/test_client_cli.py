"""`hjcg-client`'s command line: flags in either place, refused combinations, JSON with every field, help that
states the defaults, quiet exit into a closed pipe, and the wording of UNAVAILABLE."""
import json
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import ROOT, ServerProcess
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_client.cli import main

CLI = [sys.executable, "-m", "hjcg_client.cli"]
UNREACHABLE = "127.0.0.1:1"


def run_main(capsys, *argv):
    """main() as the console script runs it: (exit code, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_connection_flags_work_after_the_command(server, capsys):
    rc, out, err = run_main(capsys, "status", "--target", server.tcp, "--timeout", "30")
    assert rc == 0 and "SmolLM2-135M-Instruct" in out, err
    # given twice, the one after the command wins
    rc, out, err = run_main(capsys, "--target", UNREACHABLE, "generate", "--target", server.tcp,
                            "--token-ids", "1,2,3", "--max-new-tokens", "2", "--ignore-eos", "--json")
    assert rc == 0 and len(out.splitlines()) == 3, err
    # and the one before it still counts when the command does not repeat it
    rc, _, err = run_main(capsys, "--target", UNREACHABLE, "health", "--timeout", "2")
    assert rc == 1 and "cannot reach an hjcg server at 127.0.0.1:1" in err


def test_version_flag(capsys):
    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0 and out.strip() == f"hjcg-client {version('hjcg')}"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--system", "Be brief.", "Hi"], "--system needs --chat"),
    (["generate", "--token-ids", "1,2", "Hi"], "a prompt or --token-ids, not both"),
    (["generate", "--token-ids", "1,2", "--chat"], "--chat"),
    (["generate", "--token-ids", "1,x"], "--token-ids must be comma-separated integers"),
    (["generate", "--token-ids", f"1,{2**31}"], "--token-ids must each fit"),
])
def test_ignored_flag_combinations_are_refused(capsys, argv, message):
    rc, _, err = run_main(capsys, "--target", UNREACHABLE, *argv)
    assert rc == 2 and message in err and "cannot reach" not in err


@pytest.mark.parametrize("flag, value", [
    ("--max-new-tokens", "-1"), ("--max-new-tokens", str(2**32)), ("--seed", "-1"), ("--top-k", str(2**31)),
    ("--stop-token-id", str(-2**31 - 1)),
])
def test_out_of_range_values_name_their_flag(capsys, flag, value):
    rc, _, err = run_main(capsys, "--target", UNREACHABLE, "generate", "Hi", flag, value)
    assert rc == 2 and f"argument {flag}: must be" in err and value in err and "Value out of range" not in err


def _assert_every_field(message_dict: dict, descriptor) -> None:
    """Every field of the message is in its JSON, but for unset oneof members and unset optional fields."""
    for field in descriptor.fields:
        has_presence = field.containing_oneof is not None or field.has_presence and field.message_type is None
        if has_presence and field.name not in message_dict:
            continue
        assert field.name in message_dict, f"{descriptor.name}.{field.name} missing from {message_dict}"
        if field.message_type is not None and not field.is_repeated:
            _assert_every_field(message_dict[field.name], field.message_type)


def test_json_prints_zero_and_empty_fields(server, capsys):
    argv = ["--target", server.tcp, "generate", "--token-ids", "1,2,3", "--max-new-tokens", "3", "--ignore-eos",
            "--json"]
    rc, out, err = run_main(capsys, *argv)
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(lines) == 4, err
    assert [line["token"]["index"] for line in lines[:3]] == [0, 1, 2]
    for line in lines:
        _assert_every_field(line, pb.GenerateResponse.DESCRIPTOR)
    # a stop token ends the stream with an empty text, still printed
    rc, out, err = run_main(capsys, *argv, "--stop-token-id", str(lines[0]["token"]["id"]))
    assert rc == 0 and len(out.splitlines()) == 1, err
    finish = json.loads(out)["finish"]
    assert finish["reason"] == "FINISH_REASON_STOP" and finish["text"] == ""
    rc, out, err = run_main(capsys, "--target", server.tcp, "status", "--json")
    status = json.loads(out)
    _assert_every_field(status, pb.StatusResponse.DESCRIPTOR)
    assert status["graph_cache"]["entries"] == 0 and status["queue_depth"] == 0


def test_generate_help_states_greedy_and_the_default_length(capsys):
    from hjcg_server.cli import _parser as server_parser

    rc, out, _ = run_main(capsys, "generate", "--help")
    text = " ".join(out.split())
    assert rc == 0 and "greedy" in text and "--default-max-new-tokens" in text
    stated = {int(n) for n in re.findall(r"(\d+) unless", text)}
    assert stated == {server_parser().parse_args(["serve"]).default_max_new_tokens}


def test_closed_pipe_ends_the_client_quietly(server):
    command = (f"set -o pipefail; {sys.executable} -m hjcg_client.cli --target {server.tcp} generate --json "
               "--token-ids 1,2,3 --max-new-tokens 100 --ignore-eos | head -n 1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "token" in json.loads(result.stdout)
    assert result.stderr == "" and result.returncode == 141


def test_unavailable_at_shutdown_says_the_server_shut_down():
    s = ServerProcess("--grace", "1").wait_serving()
    try:
        client = subprocess.Popen([*CLI, "--target", s.tcp, "generate", "--token-ids", "1,2,3", "--max-new-tokens",
                                   "128", "--ignore-eos", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT)
        assert "token" in json.loads(client.stdout.readline())  # it runs
        s.proc.terminate()
        _, err = client.communicate(timeout=60)
        assert client.returncode == 1
        assert f"the server at {s.tcp} shut down" in err and "may be retried" in err and "cannot reach" not in err
    finally:
        s.stop()
