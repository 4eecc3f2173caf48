"""Structured output's cost at the protocol's Llama-2-7B shapes (docs/benchmarks.md, "Structured output").

The random-weights model of Llama-2-7B shape (vocab 32000) is served with the SmolLM2 tokenizer (its first
32000 tokens: every byte and the common merges, so JSON can be spelled); the constraint engine cuts the
tokenizer to the model's vocabulary. One stream, then 8 at once, decode a greedy 10-token prompt:
  free          no constraint (EOS ignored), the fused decode graph
  json_schema   a JSON array of 48 short strings (about 200-300 tokens), the forward + masked-sampler graphs
  logprobs      no constraint, logprobs with 5 alternatives on every token
Reported: the intervals between consecutive tokens of each stream (median, p99), and each mode's median
over the free one's (the issue's bar: constrained <= 1.10x).
"""
from __future__ import annotations

import json
import os
import random

from bench.common import now, summary
from bench.systems import HjcgSystem
from hjcg.requests import Constraint, GenerationRequest, TokenOutput

SCHEMA = {"type": "array", "minItems": 48, "maxItems": 48, "items": {"type": "string", "maxLength": 10}}
PROMPT_TOKENS = 10
FREE_TOKENS = 256


def _requests(mode: str, ids: list[int]) -> GenerationRequest:
    if mode == "json_schema":
        return GenerationRequest(prompt_ids=ids, max_new_tokens=600, constraint=Constraint("json_schema", json.dumps(SCHEMA)))
    return GenerationRequest(prompt_ids=ids, max_new_tokens=FREE_TOKENS, ignore_eos=True,
                             logprobs=5 if mode == "logprobs" else None)


def _run(engine, mode: str, prompts: list[list[int]]) -> tuple[list[float], list[str]]:
    """Runs one request per prompt at once; returns every stream's token intervals and texts."""
    stamps: list[list[float]] = [[] for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]

    def sink(i):
        def take(event):
            if isinstance(event, TokenOutput):
                stamps[i].append(now())
                texts[i].append(event.text)
        return take

    for i, ids in enumerate(prompts):
        engine.submit(_requests(mode, ids), sink(i))
    while engine.has_work():
        engine.step()
    intervals = [b - a for s in stamps for a, b in zip(s[1:], s[2:])]  # past the first token (joining)
    return intervals, ["".join(t) for t in texts]


def run(loaded, tokenizer_dir: str | None, quick: bool, log=print) -> dict:
    """The section's figures; `loaded`: the random Llama-2-7B (its tokenizer is swapped for the run)."""
    from transformers import AutoTokenizer

    tokenizer_dir = tokenizer_dir or os.environ.get("HJCG_BENCH_TOKENIZER")
    if not tokenizer_dir:
        return {"error": "no tokenizer: set HJCG_BENCH_TOKENIZER to a SmolLM2 tokenizer directory"}
    word_tokenizer = loaded.tokenizer
    loaded.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        system = HjcgSystem(loaded, "hybrid")
        engine = system.engine
        rng = random.Random(0)
        out: dict = {"model": loaded.name, "tokenizer": tokenizer_dir, "schema": SCHEMA, "streams": {}}
        for streams in (1, 8):
            vocab = engine.vocab_size
            prompts = [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(streams)]
            figures = {}
            for mode in ("free", "json_schema", "logprobs"):
                _run(engine, mode, prompts)  # captures the half-step graphs, warms the matchers' cache
                intervals, texts = [], []
                for _ in range(1 if quick else 3):
                    more, texts = _run(engine, mode, prompts)
                    intervals += more
                valid = None
                if mode == "json_schema":
                    valid = sum(_valid(t) for t in texts)
                figures[mode] = {**summary(intervals), **({"valid_outputs": valid, "outputs": len(texts),
                                                           "example": texts[0][:120]} if valid is not None else {})}
                log(f"structured, {streams} stream(s), {mode}: {figures[mode]['median_ms']:.3f} ms/token "
                    f"(p99 {figures[mode]['p99_ms']:.3f})" + (f", {valid}/{len(texts)} valid" if valid is not None else ""))
            free = figures["free"]["median_ms"]
            for mode in ("json_schema", "logprobs"):
                figures[mode]["over_free"] = figures[mode]["median_ms"] / free
            out["streams"][str(streams)] = figures
        system.close()
        return out
    finally:
        loaded.tokenizer = word_tokenizer


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, list) and len(value) == 48 and all(isinstance(v, str) and len(v) <= 10 for v in value)
