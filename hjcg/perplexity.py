"""Perplexity of a FastLlama on a fixed text: how much a change of number format (fp8 weights, fp8
activations) costs in quality, measured on real weights.

The text is cut into non-overlapping windows, each run as one prompt from position 0 over a fresh cache
(teacher forcing: one forward per window); every token but a window's first is scored, given the tokens
before it in its window. Non-overlapping rather than strided: one forward per token, and the figure is
only ever compared with another format's over the same windows.

The reference text is Debian's GPL-3 (/usr/share/common-licenses/GPL-3, on every Debian machine): 35 KB
of English, 7658 tokens with the SmolLM2 tokenizer, taken whole.

    python -m hjcg.perplexity [--model smollm2] [--window 1024]   # the figures of every weight format

Measured (SmolLM2-135M-Instruct, CPU, float32 activations, the whole text, windows of 1024):
    float32                                                 19.0292
    fp8 layers, lm head in float32 (what the engine serves) 19.1037  (+0.39%)
    fp8 layers and lm head                                  19.3302  (+1.58%)
    fp8 layers, lm head in float32, fp8 activations (W8A8)  19.2261  (+1.03%; W8A8ReferenceOps)
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from hjcg.llama import FastLlama, LayerOps, W8A8ReferenceOps, causal_self_attention

REFERENCE_TEXT = Path("/usr/share/common-licenses/GPL-3")
DEFAULT_WINDOW = 1024
_BLOCK = 16  # the cache's block size: any; block 0 is the trash block, so the window's slots start at one block


def load_reference_text() -> str:
    """The text perplexity is measured on (REFERENCE_TEXT, whole)."""
    if not REFERENCE_TEXT.is_file():
        raise FileNotFoundError(f"{REFERENCE_TEXT} is missing: the perplexity figures are measured on Debian's "
                                "GPL-3 text (package base-files)")
    return REFERENCE_TEXT.read_text(encoding="utf-8")


def reference_token_ids(tokenizer) -> list[int]:
    """The reference text's tokens, as the engine encodes a text prompt."""
    return list(tokenizer(load_reference_text(), add_special_tokens=True)["input_ids"])


@torch.inference_mode()
def perplexity(model: FastLlama, token_ids: list[int] | torch.Tensor, window: int = DEFAULT_WINDOW,
               ops: LayerOps | None = None) -> float:
    """exp(mean negative log-likelihood) over the non-overlapping windows of `window` tokens (see the module
    docstring); `ops` as FastLlama.forward takes them (None: the torch reference)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).to(model.device).reshape(-1)
    if window < 2 or ids.numel() < 2:
        raise ValueError("perplexity needs a window of at least 2 tokens and at least 2 tokens")
    cache = model.new_cache(num_blocks=1 + -(-window // _BLOCK), block_size=_BLOCK)
    total, scored = 0.0, 0
    for start in range(0, ids.numel() - 1, window):  # a last window of one token has nothing to score
        chunk = ids[start:start + window]
        positions = torch.arange(chunk.numel(), device=model.device)
        logits = model.forward(chunk, positions, positions + _BLOCK, cache, causal_self_attention(), None, ops)
        total += float(F.cross_entropy(logits[:-1], chunk[1:], reduction="sum"))
        scored += chunk.numel() - 1
    return math.exp(total / scored)


def measure_formats(hf_model, token_ids: list[int], dtype: torch.dtype = torch.float32,
                    device: str = "cpu", window: int = DEFAULT_WINDOW) -> dict[str, float]:
    """The perplexity of `hf_model` in `dtype`, then with fp8 layers (lm head in `dtype`: what the engine
    serves), fp8 layers and lm head, and fp8 layers with fp8 activations too (W8A8ReferenceOps)."""
    def build(fp8: bool, lm_head: bool = False) -> FastLlama:
        model = FastLlama(hf_model, torch.device(device), dtype, window)
        if fp8:
            model.quantize_weights(lm_head=lm_head)
        return model

    name = str(dtype).removeprefix("torch.")
    served = build(True)
    return {
        name: perplexity(build(False), token_ids, window),
        f"fp8, lm head {name}": perplexity(served, token_ids, window),
        "fp8, lm head fp8": perplexity(build(True, lm_head=True), token_ids, window),
        f"fp8 W8A8 (per-token activations), lm head {name}": perplexity(served, token_ids, window,
                                                                         W8A8ReferenceOps()),
    }


def main(argv: list[str] | None = None) -> None:
    from hjcg import model_source
    from hjcg.config import DTYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=model_source.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    loaded = model_source.load(args.model, torch.float32)
    ids = reference_token_ids(loaded.tokenizer)
    hf_model = loaded.hf_model.to(dtype)
    figures = measure_formats(hf_model, ids, dtype, args.device, args.window)
    print(f"{loaded.name}: {len(ids)} tokens of {REFERENCE_TEXT}, windows of {args.window}")
    base = next(iter(figures.values()))
    for name, value in figures.items():
        print(f"  {name:52s} {value:9.4f}  ({100 * (value / base - 1):+.2f}%)")


if __name__ == "__main__":
    main()
