"""`hjcg serve`: the server's command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from hjcg.config import DEFAULT_GRAPH_CACHE_ENTRIES, DEFAULT_PREFILL_BUCKETS, MODES, EngineConfig
from hjcg_server.app import ServerOptions, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hjcg", description="hjcg: low-latency LLM inference over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve the hjcg.v1 gRPC API")
    s.add_argument("--model", default="smollm2",
                   help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a local Hugging Face checkpoint directory")
    s.add_argument("--listen", action="append", metavar="ADDRESS",
                   help="host:port or unix:/path; repeat for several (default 127.0.0.1:50051)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    s.add_argument("--mode", default="auto", choices=("auto",) + MODES, help="engine mode (auto: hybrid on CUDA)")
    s.add_argument("--max-context", type=int, default=4096, help="KV-cache length in tokens")
    s.add_argument("--max-prompt-tokens", type=int, default=3072)
    s.add_argument("--max-new-tokens", type=int, default=1024)
    s.add_argument("--default-max-new-tokens", type=int, default=256)
    s.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more get RESOURCE_EXHAUSTED")
    s.add_argument("--graph-budget-mib", type=int, default=1024, help="GPU memory for cached prefill graphs")
    s.add_argument("--graph-max-entries", type=int, default=DEFAULT_GRAPH_CACHE_ENTRIES,
                   help=f"graphs the cache may hold (the default set: {len(DEFAULT_PREFILL_BUCKETS)} prefill buckets "
                   "and the decode graph)")
    s.add_argument("--warm", action="store_true", help="capture the default CUDA graphs before serving")
    s.add_argument("--grace", type=float, default=30.0, help="seconds running requests get to finish on SIGTERM")
    s.add_argument("--auth-token-file", help="file holding the bearer token every RPC must present "
                   "(or set HJCG_AUTH_TOKEN)")
    s.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key, serve TLS")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--tls-client-ca", help="PEM CA bundle; clients must then present a certificate it signed")
    s.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (127.0.0.1)")
    s.add_argument("--log-level", default="INFO")
    return parser


def _auth_token(path: str | None) -> str | None:
    if path:
        token = open(path, encoding="utf-8").read().strip()
        if not token:
            raise ValueError(f"{path} is empty")
        return token
    return os.environ.get("HJCG_AUTH_TOKEN") or None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("hjcg: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        engine = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, mode=args.mode, max_context=args.max_context,
            max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
            default_max_new_tokens=args.default_max_new_tokens,
            graph_cache_max_entries=args.graph_max_entries, graph_cache_max_bytes=args.graph_budget_mib << 20)
        options = ServerOptions(
            engine=engine, listen=args.listen or ["127.0.0.1:50051"], queue_size=args.queue_size,
            grace_s=args.grace, warm=args.warm, auth_token=_auth_token(args.auth_token_file),
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            metrics_port=args.metrics_port)
        if options.queue_size < 1:
            raise ValueError("--queue-size must be >= 1")
        return serve(options)
    except (ValueError, OSError) as e:
        print(f"hjcg: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
