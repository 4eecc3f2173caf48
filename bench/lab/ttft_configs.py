"""Lab: is the 0.2-0.4 ms between the run of record's batch-1 TTFT sections an engine setting or engine-to-engine
variance? In bench/results/2026-11-24-h100-5e0f732 the same fp16 engine code gave a 10-token TTFT of 6.40 ms in the
llama2_7b section (HjcgSystem's defaults: max_prompt_tokens 4095, max_new_tokens 4096, max_waiting 64), 6.24 in the
fp8 section and 6.05 in grpc_overhead's in-process half (`hjcg serve`'s limits: 3072, 1024, max_waiting 128).

Here the two settings alternate, each a fresh engine over the same loaded weights (A B A B ...), each measured as
the run of record measures: one warm-up call per length, then `runs` TTFTs at 10 and at 500 tokens.

    python -m bench.lab.ttft_configs OUT.json [rounds]
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from bench.run_all import prompts_for
from bench.systems import HjcgSystem
from hjcg import model_source

SETTINGS = {
    "suite_defaults": {},
    "serve_limits": dict(max_prompt_tokens=3072, max_new_tokens=1024, max_batch=32, max_waiting=128),
}


def main(out_path: str, rounds: int = 2, runs: int = 100) -> None:
    loaded = model_source.load("random:llama2-7b", torch.float16, random_device="cuda")
    prompts = prompts_for(loaded.hf_model.config.vocab_size, lengths=(10, 500))
    out: dict = {"device": torch.cuda.get_device_name(), "runs": runs, "instances": []}
    for r in range(rounds):
        for label, settings in SETTINGS.items():
            system = HjcgSystem(loaded, "hybrid", **settings)
            entry = {"settings": label, "round": r, "kv_blocks": system.engine.blocks.capacity_blocks}
            for n, ids in prompts.items():
                system.ttft(ids)
                samples = [system.ttft(ids) * 1e3 for _ in range(runs)]
                entry[f"ttft{n}_median_ms"] = statistics.median(samples)
                entry[f"ttft{n}_min_ms"] = min(samples)
            system.close()
            del system
            out["instances"].append(entry)
            print(json.dumps(entry), flush=True)
            with open(out_path, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
