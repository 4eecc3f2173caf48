"""Many callers against one on the CPU: the embedded model served by `hjcg serve` over loopback gRPC, N callers
released together against 1 caller, each a 10-token prompt and the same number of new tokens (greedy, EOS
ignored). Prints each round and writes the best round of each level as JSON. Not a timed test: a measurement
for a closing note or a README, on whatever machine runs it.

    python -m bench.cpu_callers --out bench/results/cpu-callers.json   # 8 callers against 1, best of 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.callers import ClientPool, stream_figures
from bench.common import environment
from bench.many_callers import Plan, concurrency
from bench.server_proc import ServerProcess

PROMPT_TOKENS = 10


def measure(callers: int, tokens: int, rounds: int, model: str = "smollm2", seed: int = 0) -> dict:
    """{"1": figures, str(callers): figures, "ratio": tokens/s of N over 1}, each level its best round: the GPU
    suite's concurrency section (bench.many_callers.concurrency) at levels 1 and N against a CPU server."""
    plan = Plan(model=model, device="cpu", levels=(1, callers), prompt_tokens=PROMPT_TOKENS, new_tokens=tokens,
                warm_tokens=4, rounds=rounds, seed=seed)
    with ServerProcess(model, "cpu", warm=False) as server:
        plan.vocab = _vocab(server.target)
        with ClientPool(server.target, callers, levels=plan.levels) as pool:
            levels = concurrency(plan, pool)["levels"]
    best = {}
    for n in plan.levels:
        figures = [stream_figures(r) for r in levels[str(n)]["rounds"]]
        for f in figures:
            print(f"{n} caller(s): {f['tokens_per_s']:.1f} tokens/s, inter-token median {f['itl_median_ms']:.1f} ms",
                  flush=True)
            if f["errors"]:
                raise RuntimeError(f"{n} callers: errors {f['errors']}")
        best[n] = max(figures, key=lambda f: f["tokens_per_s"])
    return {"1": best[1], str(callers): best[callers], "ratio": best[callers]["tokens_per_s"] / best[1]["tokens_per_s"]}


def _vocab(target: str) -> int:
    from hjcg_client import HjcgClient

    with HjcgClient(target) as client:
        return client.status().model.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per caller")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level; the best one counts")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, help="where the JSON goes (else stdout only)")
    args = parser.parse_args()
    if args.callers < 2 or args.tokens < 2 or args.rounds < 1:
        parser.error("--callers and --tokens must be at least 2, --rounds at least 1")
    figures = measure(args.callers, args.tokens, args.rounds, args.model)
    result = {"environment": environment(), "model": args.model, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": args.tokens, "rounds": args.rounds, "levels": figures}
    print(f"best of {args.rounds}: 1 caller {figures['1']['tokens_per_s']:.1f} tokens/s, {args.callers} callers "
          f"{figures[str(args.callers)]['tokens_per_s']:.1f} tokens/s, {figures['ratio']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
