"""`hjcg-client`: generate, status, warm and health from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from hjcg_client.client import HjcgClient


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hjcg-client", description="talk to an hjcg server")
    p.add_argument("--target", default=os.environ.get("HJCG_TARGET", "127.0.0.1:50051"),
                   help="host:port or unix:/path (default $HJCG_TARGET or 127.0.0.1:50051)")
    p.add_argument("--token-file", help="file with the bearer token (or set HJCG_AUTH_TOKEN)")
    p.add_argument("--tls-ca", help="PEM CA bundle to verify a TLS server")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion to stdout")
    g.add_argument("prompt", nargs="?", help="prompt text ('-' or nothing: read stdin)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--token-ids", help="comma-separated token ids instead of text")
    g.add_argument("--max-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--request-id", default="")
    g.add_argument("--json", action="store_true", help="one JSON object per response message")

    s = sub.add_parser("status", help="model, device, queue and graph cache")
    s.add_argument("--json", action="store_true")
    w = sub.add_parser("warm", help="capture CUDA graphs ahead of traffic")
    w.add_argument("lengths", nargs="*", type=int, help="prompt lengths (none: the default set)")
    w.add_argument("--json", action="store_true")
    sub.add_parser("health", help="the standard health check")
    return p


def _message_json(message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _generate(client: HjcgClient, args) -> int:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
                  request_id=args.request_id)
    if args.token_ids:
        try:
            kwargs["token_ids"] = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit("hjcg-client: --token-ids must be comma-separated integers")
    else:
        prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
        if args.chat:
            chat = ([("system", args.system)] if args.system else []) + [("user", prompt)]
            kwargs["chat"] = chat
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
    return 0


def _status(client: HjcgClient, args) -> int:
    status = client.status(timeout=args.timeout or 10.0)
    if args.json:
        print(_message_json(status))
        return 0
    m, g = status.model, status.graph_cache
    print(f"model:   {m.name} ({m.architecture}, {m.dtype}, context {m.context_length}, vocab {m.vocab_size})")
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
        print(f"{g.phase:8s} {g.length:6d}  {g.capture_ms:8.1f} ms  {g.bytes / 2**20:8.1f} MiB"
              f"{'  (cached)' if g.cached else ''}")
    print(f"total {report.total_ms:.0f} ms, {report.graph_bytes / 2**20:.1f} MiB held by graphs")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = None
    if args.token_file:
        token = open(args.token_file, encoding="utf-8").read().strip()
    token = token or os.environ.get("HJCG_AUTH_TOKEN") or None
    try:
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
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in (e.details() or "") \
                and "loading" not in (e.details() or ""):
            print(f"hjcg-client: cannot reach an hjcg server at {args.target}: {e.details()}", file=sys.stderr)
        else:
            print(f"hjcg-client: {code.name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"hjcg-client: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
