"""fp8 weights beside fp16 in one run (docs/benchmarks.md, "Weight formats").

speed(loaded):  the protocol's Llama-2-7B workload (random weights, quantized at load for fp8) through the
                hybrid engine in both formats: decode intervals (10-token prompt, 397 new tokens), TTFT at
                10, 100 and 500 tokens, the bytes of weights a decode step reads.
quality():      the embedded SmolLM2-135M-Instruct's real weights on the GPU: perplexity on the reference
                text (hjcg.perplexity) in float32 (torch path), float16 and fp8 (the served path: fused
                kernels), and greedy answers to a few chat questions in float16 and fp8. Needs the embedded
                model's package (see the README's Benchmarks section for carrying it to the GPU machine).
"""
from __future__ import annotations

import gc

import torch

from bench.common import summary
from bench.systems import HjcgSystem

TTFT_LENGTHS = (10, 100, 500)
DECODE_TOKENS = 397
FORMATS = {"fp16": "dtype", "fp8": "fp8"}  # summary label -> EngineConfig.weights ("fp16": the --dtype run, fp16 on the GPU)
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 7?",
    "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?",
    "What gas do plants take in from the air?",
)


def speed(loaded, quick: bool, log=print, lengths=TTFT_LENGTHS, decode_tokens: int = DECODE_TOKENS,
          mode: str = "hybrid", **engine) -> dict:
    """The figures of each format (see the module docstring); `engine`: more EngineConfig settings."""
    import random

    rng = random.Random(0)
    vocab = loaded.hf_model.config.vocab_size
    prompts = {n: [rng.randrange(3, vocab) for _ in range(n)] for n in lengths}
    runs = 20 if quick else 100
    out: dict = {"model": loaded.name, "decode_tokens": decode_tokens}
    for label, weights in FORMATS.items():
        try:
            system = HjcgSystem(loaded, mode, weights=weights, **engine)
            for ids in prompts.values():
                system.ttft(ids)
            ttft = {n: [system.ttft(ids) for _ in range(runs)] for n, ids in prompts.items()}
            first = prompts[lengths[0]]
            system.decode(first, 8)
            decode = [x for _ in range(1 if quick else 3) for x in system.decode(first, decode_tokens)]
            model = system.engine.model
            out[label] = {"ttft": ttft, "decode": decode, "weight_bytes": model.weight_bytes(),
                          "weights": model.weight_format, "setup_s": system.setup_s}
            system.close()
            log(f"fp8 section, {label}: TTFT({lengths[0]}) {summary(ttft[lengths[0]])['median_ms']:.2f} ms, "
                f"decode {summary(decode)['median_ms']:.2f} ms/token, {model.weight_bytes() / 1e9:.2f} GB of weights")
        except Exception as e:  # one failing format must not sink the run; the error is in the results
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            log(f"fp8 section, {label}: FAILED {type(e).__name__}: {e}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def quality(log=print) -> dict:
    """Perplexity and greedy chat answers on the embedded model's real weights (see the module docstring)."""
    from hjcg import model_source
    from hjcg.config import EngineConfig
    from hjcg.engine import Engine, TokenOutput
    from hjcg.perplexity import DEFAULT_WINDOW, perplexity, reference_token_ids
    from hjcg.llama import FastLlama
    from hjcg.requests import GenerationRequest

    loaded = model_source.load(model_source.DEFAULT_MODEL, torch.float32)
    ids = reference_token_ids(loaded.tokenizer)
    reference = FastLlama(loaded.hf_model, torch.device("cuda"), torch.float32, DEFAULT_WINDOW)
    out: dict = {"model": loaded.name, "tokens": len(ids), "window": DEFAULT_WINDOW,
                 "perplexity": {"fp32": perplexity(reference, ids)}, "answers": {}}
    del reference
    for label, weights in FORMATS.items():
        engine = Engine(EngineConfig(model=loaded.name, device="cuda", dtype="float16", mode="hybrid",
                                     weights=weights), loaded)
        out["perplexity"][label] = perplexity(engine.model, ids, ops=engine.runner.ops)
        answers = {}
        for question in CHAT_QUESTIONS:
            text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                        add_generation_prompt=True, tokenize=False)
            prompt = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens = [e.id for e in engine.generate(GenerationRequest(list(prompt), 40))
                      if isinstance(e, TokenOutput)]
            answers[question] = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        out["answers"][label] = answers
        log(f"fp8 quality, {label}: perplexity {out['perplexity'][label]:.4f}")
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    log(f"fp8 quality: fp32 perplexity {out['perplexity']['fp32']:.4f} over {len(ids)} tokens")
    return out


def fp8_summary(speed_raw: dict | None, quality_raw: dict | None) -> dict:
    """summary.json's "fp8": the issue's keys for fp8, the same figures for fp16 beside them."""
    out: dict = {}
    if speed_raw:
        out["model"] = speed_raw.get("model")
        for label in FORMATS:
            r = speed_raw.get(label, {})
            if "error" in r or not r:
                out[label] = {"error": r.get("error", "not measured")}
                continue
            d = summary(r["decode"])
            out[label] = {"decode_median_ms": d["median_ms"], "decode_p99_ms": d["p99_ms"],
                          "ttft_median_ms": {str(n): summary(v)["median_ms"] for n, v in r["ttft"].items()},
                          "ttft_p99_ms": {str(n): summary(v)["p99_ms"] for n, v in r["ttft"].items()},
                          "weight_bytes": r["weight_bytes"], "weights": r["weights"]}
        out.update(out.get("fp8", {}))  # the issue reads the fp8 figures at the top
        if "weight_bytes" in out.get("fp16", {}) and "weight_bytes" in out.get("fp8", {}):
            out["weight_bytes_ratio"] = out["fp8"]["weight_bytes"] / out["fp16"]["weight_bytes"]
    if quality_raw:
        if "error" in quality_raw:
            out["quality_error"] = quality_raw["error"]
        else:
            out["perplexity"] = quality_raw["perplexity"]
            out["perplexity_text"] = {"model": quality_raw["model"], "tokens": quality_raw["tokens"],
                                      "window": quality_raw["window"]}
            out["answers"] = quality_raw["answers"]
    return out
