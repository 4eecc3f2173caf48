"""`hjcg serve`: the server's command line."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from hjcg import __version__
from hjcg.config import DEFAULT_DECODE_LOOKAHEAD, DEFAULT_GRAPH_CACHE_ENTRIES, DEFAULT_GRAPH_CACHE_MIB, DEFAULT_PREFILL_BUCKETS, MODES, WEIGHTS, EngineConfig
from hjcg_server.app import ServerOptions, default_threads, parse_listen_address, serve
from hjcg_server.servicer import DEFAULT_UNREAD_TIMEOUT_S

DEFAULT_LISTEN = "127.0.0.1:50051"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _listen_address(text: str) -> str:
    try:
        parse_listen_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port_number(text: str) -> int:
    value = _at_least_one(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hjcg", description="hjcg: low-latency LLM inference over gRPC")
    parser.add_argument("--version", action="version", version=f"hjcg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve the hjcg.v1 gRPC API",
                       description="Load a model and serve the hjcg.v1 gRPC API.")
    s.add_argument("--model", default="smollm2",
                   help="'smollm2' (the embedded SmolLM2-135M-Instruct), a local Hugging Face checkpoint "
                   "directory, or 'random:<shape>' (random weights at the shape of llama2-7b or smollm2-135m, "
                   "for benchmarks) (default: %(default)s)")
    s.add_argument("--listen", action="append", metavar="ADDRESS", type=_listen_address,
                   help="host:port, [ipv6]:port or unix:/path to listen on; port 0 takes any free port; repeat "
                   f"for several (default: {DEFAULT_LISTEN})")
    s.add_argument("--http-listen", metavar="ADDRESS", type=_listen_address,
                   help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                   "/v1/chat/completions) and the built-in page on host:port, [ipv6]:port or unix:/path, in the same "
                   "process and with the same model, limits and token (default: none, gRPC only)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    s.add_argument("--dtype", default="auto",
                   help="auto (float32 on the CPU, float16 on CUDA), float32, float16 or bfloat16 "
                   "(default: %(default)s)")
    s.add_argument("--weights", default="dtype", choices=WEIGHTS,
                   help="how the weight matrices are stored: dtype (as --dtype) or fp8 (e4m3 with a float32 scale "
                   "per output row, quantized at load: half the bytes of float16 per decode step; embeddings and "
                   "norms stay in --dtype) (default: %(default)s)")
    s.add_argument("--mode", default="auto", choices=("auto",) + MODES,
                   help="engine mode; auto: eager on the CPU, hybrid on CUDA (default: %(default)s)")
    s.add_argument("--threads", type=_at_least_one, metavar="N",
                   help="torch CPU threads (default: the CPUs this process may use, "
                   f"{default_threads()} here)")
    s.add_argument("--max-context", type=int, default=4096, help="KV-cache length in tokens (default: %(default)s)")
    s.add_argument("--max-prompt-tokens", type=int, default=3072,
                   help="longest prompt accepted, in tokens (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=1024,
                   help="most tokens a request may ask to generate (default: %(default)s)")
    s.add_argument("--default-max-new-tokens", type=int, default=256,
                   help="tokens generated when a request does not say (default: %(default)s)")
    s.add_argument("--queue-size", type=int, default=64,
                   help="requests that may wait; more get RESOURCE_EXHAUSTED (default: %(default)s)")
    s.add_argument("--max-batch", type=_at_least_one, default=32, metavar="N",
                   help="streams decoded together at most; decode graphs are captured for batch sizes 1, 2, 4, ... "
                   "up to N (default: %(default)s)")
    s.add_argument("--kv-cache-gib", type=float, default=0.0, metavar="GIB",
                   help="KV-cache pool size in GiB (default: 0, meaning a share of the GPU memory free after loading "
                   "the weights, see the next flag; 1 GiB on the CPU)")
    s.add_argument("--kv-cache-fraction", type=float, default=0.5, metavar="F",
                   help="share of the GPU memory free after loading the weights that the KV cache takes when no size in GiB "
                   "is given (default: %(default)s)")
    s.add_argument("--kv-block-size", type=_at_least_one, default=16, metavar="TOKENS",
                   help="tokens per KV-cache block (default: %(default)s)")
    s.add_argument("--graph-budget-mib", type=int, default=DEFAULT_GRAPH_CACHE_MIB,
                   help="GPU memory for cached prefill graphs (default: %(default)s)")
    s.add_argument("--graph-max-entries", type=int, default=DEFAULT_GRAPH_CACHE_ENTRIES,
                   help=f"graphs the cache may hold (the default set: {len(DEFAULT_PREFILL_BUCKETS)} prefill buckets, "
                   "each for one prompt and for prompts packed together, and per batch bucket a decode graph) "
                   "(default: %(default)s)")
    s.add_argument("--decode-lookahead", type=int, default=DEFAULT_DECODE_LOOKAHEAD, metavar="STEPS",
                   help="decode steps queued on the GPU ahead of the host (0-3; more hides host hiccups, and a "
                   "finished stream holds its row that many steps longer) (default: %(default)s)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="one arithmetic for a stream at any batch size up to 16 streams: decode always on the "
                   "tensor-core GEMV, joining prompts prefilled one by one (batch-1 decode about 5%% slower) "
                   "(default: off, the fastest GEMV for each batch size)")
    s.add_argument("--no-pdl", action="store_true",
                   help="launch the decode step's kernels without programmatic dependent launch, each only once the "
                   "one before it has finished (for measuring; the arithmetic is the same) (default: with it, on "
                   "Hopper GPUs and newer)")
    s.add_argument("--unread-timeout", type=float, default=DEFAULT_UNREAD_TIMEOUT_S, metavar="SECONDS",
                   help="a stream whose client takes no message for this long while tokens wait is cancelled, and "
                   "its client gets RESOURCE_EXHAUSTED: its batch row goes to others (default: %(default)s)")
    s.add_argument("--warm", action="store_true", help="capture the default CUDA graphs before serving")
    s.add_argument("--grace", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM (default: %(default)s)")
    s.add_argument("--auth-token-file", help="file holding the bearer token every RPC must present "
                   "(or set HJCG_AUTH_TOKEN) (default: none, no authentication)")
    s.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key, serve TLS (default: none, plaintext)")
    s.add_argument("--tls-key", help="PEM private key (default: none)")
    s.add_argument("--tls-client-ca",
                   help="PEM CA bundle; clients must then present a certificate it signed (default: none)")
    s.add_argument("--metrics-port", type=_port_number, metavar="PORT",
                   help="serve Prometheus metrics on this port of 127.0.0.1 (default: none, no metrics endpoint)")
    s.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="least severe log messages shown (default: %(default)s)")
    return parser


def _auth_token(path: str | None) -> str | None:
    if path:
        token = open(path, encoding="utf-8").read().strip()
        if not token:
            raise ValueError(f"{path} is empty")
        return token
    return os.environ.get("HJCG_AUTH_TOKEN") or None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings of parsed `serve` arguments (ValueError for an invalid combination)."""
    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, weights=args.weights, mode=args.mode,
        max_context=args.max_context,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        graph_cache_max_entries=args.graph_max_entries, graph_cache_max_bytes=args.graph_budget_mib << 20,
        max_batch=args.max_batch, max_waiting=max(1, args.queue_size), kv_cache_gib=args.kv_cache_gib,
        kv_cache_fraction=args.kv_cache_fraction, kv_block_size=args.kv_block_size,
        decode_lookahead=args.decode_lookahead, batch_invariant=args.batch_invariant, pdl=not args.no_pdl)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("hjcg: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        engine = engine_config(args)
        options = ServerOptions(
            engine=engine, listen=args.listen or [DEFAULT_LISTEN], queue_size=args.queue_size,
            grace_s=args.grace, warm=args.warm, auth_token=_auth_token(args.auth_token_file),
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            metrics_port=args.metrics_port, threads=args.threads, http_listen=args.http_listen,
            unread_timeout_s=args.unread_timeout)
        if options.queue_size < 1:
            raise ValueError("--queue-size must be >= 1")
        if not (0 < options.unread_timeout_s < math.inf):
            raise ValueError(f"--unread-timeout must be a positive number of seconds, got {args.unread_timeout}")
        return serve(options)
    except (ValueError, OSError) as e:
        print(f"hjcg: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
