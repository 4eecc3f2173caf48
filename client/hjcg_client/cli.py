"""`hjcg-client`: generate, status, warm and health from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from hjcg import __version__
from hjcg_client.client import DEFAULT_TARGET, HjcgClient

INT32 = (-2**31, 2**31 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# `hjcg serve --default-max-new-tokens`: what the server generates when a request leaves max_new_tokens at 0
SERVER_DEFAULT_MAX_NEW_TOKENS = 256
EXIT_BROKEN_PIPE = 128 + 13  # what a tool killed by SIGPIPE reports


def _int_in(lo: int, hi: int, what: str = "an integer"):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be {what} in [{lo}, {hi}], got {value}")
        return value
    return parse


def _connection_flags(p: argparse.ArgumentParser, with_defaults: bool) -> None:
    """The flags every command shares. They are accepted before the command and after it; the copies after
    it default to SUPPRESS, so that they override the ones before only when given."""
    def default(value):
        return value if with_defaults else argparse.SUPPRESS
    g = p.add_argument_group("connection (before or after the command)")
    g.add_argument("--target", default=default(os.environ.get("HJCG_TARGET", DEFAULT_TARGET)),
                   help=f"host:port or unix:/path (default $HJCG_TARGET or {DEFAULT_TARGET})")
    g.add_argument("--token-file", default=default(None), help="file with the bearer token (or set HJCG_AUTH_TOKEN)")
    g.add_argument("--tls-ca", default=default(None), help="PEM CA bundle to verify a TLS server")
    g.add_argument("--tls-cert", default=default(None), help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=default(None), help="PEM client key (mutual TLS)")
    g.add_argument("--timeout", type=float, default=default(None), help="deadline in seconds")


GENERATE_HELP = (
    "Streams a completion to stdout. Out of the box decoding is greedy (temperature 0: the most likely token "
    "each step) and the server generates until EOS or its default number of new tokens, which is "
    f"`hjcg serve --default-max-new-tokens` ({SERVER_DEFAULT_MAX_NEW_TOKENS} unless the server was started "
    "with another value).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hjcg-client", description="talk to an hjcg server")
    p.add_argument("--version", action="version", version=f"hjcg-client {__version__}")
    _connection_flags(p, with_defaults=True)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        c = sub.add_parser(name, **kwargs)
        _connection_flags(c, with_defaults=False)
        return c

    g = command("generate", help="stream a completion to stdout", description=GENERATE_HELP)
    g.add_argument("prompt", nargs="?", help="prompt text ('-' or nothing: read stdin)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    g.add_argument("--system", help="system message (needs --chat)")
    g.add_argument("--token-ids", help="comma-separated token ids instead of a prompt")
    g.add_argument("--max-new-tokens", type=_int_in(*UINT32), default=0, metavar="N",
                   help="generate at most N tokens (default 0: the server's default, its --default-max-new-tokens, "
                   f"{SERVER_DEFAULT_MAX_NEW_TOKENS} unless set otherwise)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy; > 0: sample")
    g.add_argument("--top-k", type=_int_in(*INT32), default=0, help="keep the k most likely tokens (0, default: off)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 or 1, default: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0, default: off)")
    g.add_argument("--repetition-penalty", type=float, default=0.0, help="0 or 1 (default): off")
    g.add_argument("--seed", type=_int_in(*UINT64, "an unsigned 64-bit integer"),
                   help="seed of the sampler (the same seed and request give the same tokens)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=_int_in(*INT32), action="append", default=[], help="(repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--request-id", default="")
    g.add_argument("--json", action="store_true", help="one JSON object per response message, every field")
    g.add_argument("--logprobs", type=_int_in(0, 20), metavar="N",
                   help="each token's logprob and its N most likely alternatives (0-20; needs --json to see them)")
    f = g.add_mutually_exclusive_group()
    f.add_argument("--json-object", action="store_true", help="structured output: any JSON object")
    f.add_argument("--json-schema", metavar="FILE", help="structured output: JSON matching the schema in FILE")
    f.add_argument("--regex", help="structured output: text the regular expression matches in full")
    f.add_argument("--grammar", metavar="FILE", help="structured output: text of the Lark grammar in FILE")

    s = command("status", help="model, device, queue and graph cache")
    s.add_argument("--json", action="store_true")
    w = command("warm", help="capture CUDA graphs ahead of traffic")
    w.add_argument("lengths", nargs="*", type=_int_in(*UINT32), help="prompt lengths (none: the default set)")
    w.add_argument("--json", action="store_true")
    command("health", help="the standard health check")
    return p


def _check_generate(p: argparse.ArgumentParser, args) -> None:
    """Refuses flag combinations that would otherwise be silently ignored."""
    if args.system is not None and not args.chat:
        p.error("generate: --system needs --chat (a system message is part of a chat)")
    if args.token_ids is not None:
        if args.prompt is not None:
            p.error("generate: give a prompt or --token-ids, not both")
        if args.chat:
            p.error("generate: --chat renders a text prompt; it does not apply to --token-ids")
        try:
            args.token_ids = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            p.error("generate: --token-ids must be comma-separated integers")
        if not all(INT32[0] <= t <= INT32[1] for t in args.token_ids):
            p.error("generate: --token-ids must each fit in a 32-bit signed integer")
    if args.logprobs is not None and not args.json:
        p.error("generate: --logprobs comes in the response messages: add --json to print them")
    args.response_format = _response_format(p, args)


def _response_format(p: argparse.ArgumentParser, args) -> tuple[str, str] | None:
    """The structured-output flag as the request's (kind, value); a file that cannot be read is a usage error."""
    if args.json_object:
        return ("json_object", "")
    if args.regex is not None:
        return ("regex", args.regex)
    for kind, path in (("json_schema", args.json_schema), ("grammar", args.grammar)):
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    return (kind, f.read())
            except OSError as e:
                p.error(f"generate: cannot read --{kind.replace('_', '-')} file {path}: {e.strerror}")
    return None


def _message_json(message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True))


def _generate(client: HjcgClient, args) -> int:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
                  request_id=args.request_id, logprobs=args.logprobs, response_format=args.response_format)
    if args.token_ids is not None:
        kwargs["token_ids"] = args.token_ids
    else:
        prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
        if args.chat:
            kwargs["chat"] = ([("system", args.system)] if args.system is not None else []) + [("user", prompt)]
        else:
            kwargs["text"] = prompt
    call = client.generate_stream(client.request(**kwargs), timeout=args.timeout)
    try:
        for response in call:
            if args.json:
                print(_message_json(response), flush=True)
            elif response.HasField("token"):
                sys.stdout.write(response.token.text)
                sys.stdout.flush()
            else:
                sys.stdout.write(response.finish.text + "\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        call.cancel()
        print("\nhjcg-client: cancelled", file=sys.stderr)
        return 130
    except BaseException:
        call.cancel()  # e.g. the reader of stdout went away: stop the generation on the server too
        raise
    return 0


def _status(client: HjcgClient, args) -> int:
    status = client.status(timeout=args.timeout or 10.0)
    if args.json:
        print(_message_json(status))
        return 0
    m, g = status.model, status.graph_cache
    weights = f", weights {m.weights}" if m.weights and m.weights != m.dtype else ""  # older servers send none
    print(f"model:   {m.name} ({m.architecture}, {m.dtype}{weights}, context {m.context_length}, vocab {m.vocab_size})")
    print(f"device:  {status.device}, mode {status.engine_mode}")
    print(f"queue:   {status.queue_depth} waiting, {status.running} running")
    print(f"uptime:  {status.uptime_s:.0f} s, version {status.version}")
    print(f"graphs:  {g.entries} cached, {g.bytes / 2**20:.1f} of {g.budget_bytes / 2**20:.0f} MiB, "
          f"{g.hits} hits, {g.misses} misses, {g.captures} captures, {g.evictions} evictions")
    return 0


def _warm(client: HjcgClient, args) -> int:
    report = client.warm(args.lengths, timeout=args.timeout)
    if args.json:
        print(_message_json(report))
        return 0
    if not report.available:
        print(report.message)
        return 0
    for g in report.graphs:
        print(f"{g.phase:14s} {g.length:6d}  {g.capture_ms:8.1f} ms  {g.bytes / 2**20:8.1f} MiB"
              f"{'  (cached)' if g.cached else ''}")
    print(f"total {report.total_ms:.0f} ms, {report.graph_bytes / 2**20:.1f} MiB held by graphs")
    return 0


def _rpc_error(e: grpc.RpcError, target: str) -> str:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        # The server's own UNAVAILABLE answers say why (hjcg_server.servicer / worker); anything else with this
        # code is the channel's: the server could not be reached, or the connection broke.
        if "shut down" in details or "shutting down" in details:
            return f"hjcg-client: the server at {target} shut down: {details} (UNAVAILABLE: the request may be retried)"
        if "loading" in details:
            return f"hjcg-client: the server at {target} is not ready: {details} (UNAVAILABLE)"
        return f"hjcg-client: cannot reach an hjcg server at {target}: {details}"
    return f"hjcg-client: {code.name}: {details}"


def _run(args) -> int:
    token = None
    if args.token_file:
        token = open(args.token_file, encoding="utf-8").read().strip()
    token = token or os.environ.get("HJCG_AUTH_TOKEN") or None
    with HjcgClient(args.target, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                    tls_key=args.tls_key) as client:
        if args.command == "generate":
            return _generate(client, args)
        if args.command == "status":
            return _status(client, args)
        if args.command == "warm":
            return _warm(client, args)
        print(client.health(timeout=args.timeout or 5.0))
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        _check_generate(parser, args)
    try:
        rc = _run(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The reader of stdout went away (`hjcg-client generate ... | head`): stop quietly, as a tool killed by
        # SIGPIPE does. Output still buffered goes to /dev/null instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except grpc.RpcError as e:
        print(_rpc_error(e, args.target), file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"hjcg-client: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
