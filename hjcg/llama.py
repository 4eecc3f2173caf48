"""The fast forward of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2; GQA; RoPE as the config says).

Weights come from transformers' own model, rearranged once: Q, K and V fused into one matrix, gate and
up into another, so a layer is four matrix products, each through `linear` (a matrix may also be e4m3
with per-row scales, hjcg.fp8, once FastLlama.quantize_weights has run). The KV cache is paged
(hjcg.kv_cache): a step's tokens write their K/V at given slots, and its attention reads what it needs
through block tables, so the shapes of a step never depend on where its streams' tokens live and the
forward can be captured into a CUDA graph. The rows of a step are either one prompt chunk or one token of
each stream of a batch. The lm head runs only on the rows that are sampled.

Shapes: S = tokens (rows) in the step, H = hidden size, Hq/Hkv = query/KV heads, D = head dim.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hjcg.fp8 import Fp8Weight, linear_reference, quantize_weight
from hjcg.kv_cache import PagedKVCache

# attention(layer, q [R, Hq, D], k, v [S, Hkv, D] (the step's own, already in the cache), rows [R] | None)
# -> [R, Hq, D]. rows: which of the step's S rows q holds (None: all, R = S).
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# A decode step's attention that applies RoPE itself: (layer, qkv [R, (Hq + 2 Hkv) D]) -> [R, Hq, D], each row's newest
# position (seq_len - 1) rotated and its K/V stored into the cache in the same kernel (hjcg.fused_ops).
QkvAttention = Callable[[int, torch.Tensor], torch.Tensor]
# A weight matrix [N, K]: in the model's dtype, or e4m3 with per-row scales (FastLlama.quantize_weights)
Weight = torch.Tensor | Fp8Weight


@dataclass(slots=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config) -> "LlamaShape":
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
        )


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor    # [H]
    qkv: Weight                 # [(Hq + 2 Hkv) D, H]
    o: Weight                   # [H, Hq D]
    post_norm: torch.Tensor     # [H]
    gate_up: Weight             # [2 F, H]
    down: Weight                # [H, F]

    def matrices(self) -> tuple[Weight, ...]:
        return self.qkv, self.o, self.gate_up, self.down


def linear(x: torch.Tensor, weight: Weight, quantize_input: bool = False) -> torch.Tensor:
    """x [S, K] @ weight.T -> [S, N] in x's dtype. An Fp8Weight goes through hjcg.fp8's reference product
    (quantize_input: x rounded to e4m3 with one scale per row first, as an fp8 GEMM would take it); a plain
    tensor ignores quantize_input."""
    if isinstance(weight, Fp8Weight):
        return linear_reference(x, weight, quantize_input)
    return x @ weight.t()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers computes it: normalise in float32, scale in the model's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastLlama:
    """Llama-family forward over a static KV cache; see the module docstring."""

    def __init__(self, hf_model: torch.nn.Module, device: torch.device, dtype: torch.dtype, max_positions: int):
        config = hf_model.config
        self.shape = LlamaShape.from_config(config)
        self.device, self.dtype = device, dtype
        self._check_supported(config, hf_model)
        inner = hf_model.model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.embed = w(inner.embed_tokens.weight)
        self.layers = [
            LayerWeights(
                input_norm=w(layer.input_layernorm.weight),
                qkv=w(torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                 layer.self_attn.v_proj.weight])),
                o=w(layer.self_attn.o_proj.weight),
                post_norm=w(layer.post_attention_layernorm.weight),
                gate_up=w(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])),
                down=w(layer.mlp.down_proj.weight),
            )
            for layer in inner.layers
        ]
        self.norm = w(inner.norm.weight)
        lm_head = hf_model.get_output_embeddings().weight
        self.lm_head = self.embed if lm_head is inner.embed_tokens.weight else w(lm_head)
        self.cos, self.sin = self._rope_tables(inner.rotary_emb, max_positions)

    @staticmethod
    def _check_supported(config, hf_model) -> None:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type == "dynamic":
            raise ValueError("dynamic RoPE scaling changes with the sequence length and is not supported")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("attention or MLP biases are not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (silu only)")
        if getattr(config, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported")

    def _rope_tables(self, rotary, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' rotary module already holds inv_freq and the scaling its config asks for.
        inv_freq = rotary.inv_freq.detach().float().cpu()
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = (emb.cos() * scale).to(device=self.device, dtype=self.dtype)
        sin = (emb.sin() * scale).to(device=self.device, dtype=self.dtype)
        return cos, sin

    def fold_norm_weights(self) -> None:
        """Folds each RMSNorm's weight into the columns of the matrix that follows it (W' = W diag(g)), so
        the fused decode GEMV applies the norm as one scale; the norms keep unit weights. New tensors:
        the transformers model's own weights stay untouched."""
        if getattr(self, "norms_folded", False):
            return
        for layer in self.layers:
            layer.qkv = (layer.qkv * layer.input_norm[None, :]).contiguous()
            layer.gate_up = (layer.gate_up * layer.post_norm[None, :]).contiguous()
            layer.input_norm = torch.ones_like(layer.input_norm)
            layer.post_norm = torch.ones_like(layer.post_norm)
        self.lm_head = (self.lm_head * self.norm[None, :]).contiguous()
        self.norm = torch.ones_like(self.norm)
        self.norms_folded = True

    def quantize_weights(self, lm_head: bool = False) -> None:
        """Replaces each layer's four matrices (and the lm head where `lm_head`: the engine does not, see
        hjcg.config.WEIGHTS) by e4m3 weights with per-row scales (hjcg.fp8.quantize_weight); the embedding
        rows and the norms keep the model's dtype. The norms are folded first, so every path (this torch
        forward and the fused CUDA one) reads the same quantized matrices."""
        if self.weights_quantized:
            return
        self.fold_norm_weights()
        for layer in self.layers:
            layer.qkv, layer.o, layer.gate_up, layer.down = (quantize_weight(w) for w in layer.matrices())
        if lm_head:
            self.lm_head = quantize_weight(self.lm_head)

    @property
    def weights_quantized(self) -> bool:
        return isinstance(self.layers[0].qkv, Fp8Weight)

    @property
    def weight_format(self) -> str:
        """How the layers' matrices are stored: "fp8_e4m3" or the model's dtype ("float16", ...)."""
        return "fp8_e4m3" if self.weights_quantized else str(self.dtype).removeprefix("torch.")

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: every layer's matrices and the lm head (with the fp8 scales),
        not the embedding table (a step reads one row of it) nor the norm vectors."""
        matrices = [w for layer in self.layers for w in layer.matrices()] + [self.lm_head]
        return sum(w.nbytes for w in matrices)

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        s = self.shape
        return PagedKVCache(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim, self.device, self.dtype)

    def kv_bytes_per_block(self, block_size: int) -> int:
        s = self.shape
        return PagedKVCache.bytes_per_block(s.num_layers, block_size, s.num_kv_heads, s.head_dim, self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: PagedKVCache,
                attention: Attention, logit_rows: torch.Tensor | None, ops: "LayerOps | None" = None,
                row_attention: Attention | None = None, qkv_attention: QkvAttention | None = None) -> torch.Tensor:
        """input_ids, positions, slots: [S] int64; logit_rows: [R] int64 row indices (None: all rows).

        Writes the step's K/V into `cache` at `slots` and returns logits [R, vocab] in float32.
        `ops` supplies the elementwise stages (plain torch by default; fused CUDA kernels in hybrid mode).
        `row_attention` serves the last layer's `logit_rows` alone (default: `attention` on those rows).
        `qkv_attention` (a decode step: positions = seq_lens - 1 of its tables) replaces RoPE, the cache write and
        `attention` wherever `ops.attention_qkv` gives the QKV output for it.
        """
        ops = ops or TORCH_OPS
        s = self.shape
        x = F.embedding(input_ids, self.embed)                 # [S, H]
        eps = s.rms_norm_eps
        last_layer = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            qkv = (ops.attention_qkv(x, layer.input_norm, eps, layer.qkv, self)
                   if qkv_attention is not None and logit_rows is None else None)
            if qkv is not None:
                out = qkv_attention(i, qkv)
            else:
                q, k, v = ops.attention_input(x, layer.input_norm, eps, layer.qkv, positions, slots, self, cache, i)
                if i == last_layer and logit_rows is not None:
                    # Only the rows the lm head reads matter past the last layer's K/V (in the cache by now):
                    # its attention, o projection and MLP run on those rows alone (~2.5% of a prompt's FLOPs).
                    x, q = x.index_select(0, logit_rows), q.index_select(0, logit_rows)
                    out = (row_attention or attention)(i, q, k, v, logit_rows)
                else:
                    out = attention(i, q, k, v, None)
            x = ops.residual_linear(x, out.reshape(x.shape[0], -1), layer.o)
            x = ops.mlp(x, layer.post_norm, eps, layer.gate_up, layer.down)
        return ops.norm_linear(x, self.norm, eps, self.lm_head).float()


class LayerOps:
    """The elementwise stages of a layer in plain torch: the reference the fused kernels must match."""

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """x @ weight.T: every matrix product of the stages below."""
        return linear(x, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight) -> torch.Tensor:
        """rms_norm(x) @ weight.T"""
        return self.linear(self.rms_norm(x, norm_weight, eps), weight)

    def rope_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, model: FastLlama,
                       cache: PagedKVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [S, (Hq + 2 Hkv) D] -> q [S, Hq, D], k, v [S, Hkv, D], RoPE on q and k; k and v also go into
        the cache at `slots`."""
        s = model.shape
        q_end = s.num_heads * s.head_dim
        k_end = q_end + s.num_kv_heads * s.head_dim
        cos = model.cos.index_select(0, positions)[:, None, :]  # [S, 1, D]
        sin = model.sin.index_select(0, positions)[:, None, :]
        q = qkv[:, :q_end].view(-1, s.num_heads, s.head_dim)
        k = qkv[:, q_end:k_end].view(-1, s.num_kv_heads, s.head_dim)
        v = qkv[:, k_end:].view(-1, s.num_kv_heads, s.head_dim)
        k = k * cos + rotate_half(k) * sin
        cache.write(layer, slots, k, v)
        return q * cos + rotate_half(q) * sin, k, v

    def attention_input(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: Weight,
                        positions: torch.Tensor, slots: torch.Tensor, model: FastLlama, cache: PagedKVCache,
                        layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of rope(rms_norm(x) @ qkv_weight.T) (see rope_and_cache); k and v go into the cache."""
        return self.rope_and_cache(self.norm_linear(x, norm_weight, eps, qkv_weight), positions, slots, model, cache,
                                   layer)

    def attention_qkv(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: Weight,
                      model: FastLlama) -> torch.Tensor | None:
        """rms_norm(x) @ qkv_weight.T for a QkvAttention (RoPE in the attention's kernel), or None where
        attention_input must run instead: these ops' own RoPE and cache write (the default)."""
        return None

    def mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: Weight,
            down_weight: Weight) -> torch.Tensor:
        """x + silu(gate) * up @ down.T, with [gate, up] = rms_norm(x) @ gate_up_weight.T"""
        return self.mlp_down(x, self.norm_linear(x, norm_weight, eps, gate_up_weight), down_weight)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def residual_linear(self, x: torch.Tensor, h: torch.Tensor, weight: Weight) -> torch.Tensor:
        return x + self.linear(h, weight)

    def mlp_down(self, x: torch.Tensor, gate_up: torch.Tensor, down: Weight) -> torch.Tensor:
        """x + silu(gate) * up @ down.T"""
        return self.residual_linear(x, self.silu_mul(gate_up), down)


TORCH_OPS = LayerOps()


class W8A8ReferenceOps(LayerOps):
    """The reference path with every fp8 product's input also rounded to e4m3, one scale per token
    (hjcg.fp8.quantize_rows): what fp8 GEMMs with per-token activation scales compute. For measuring
    that quality cost (hjcg.perplexity); products with unquantized weights stay as they are."""

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        return linear(x, weight, quantize_input=True)


# --- attention variants -------------------------------------------------------------------------------

# SDPA backends by preference for short prompts on CUDA: memory-efficient attention takes 5.8-6.7 us per
# layer up to 128 tokens where cuDNN's (torch's first choice) takes 7.4-7.8; cuDNN wins from ~200 tokens on
# (H100, Llama-2-7B heads, in a CUDA graph: bench/lab/sdpa_backends.py). Where one cannot serve a call, the
# next in the list does.
SHORT_PROMPT_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                     SDPBackend.MATH]
SHORT_PROMPT_TOKENS = 128


def causal_self_attention() -> Attention:
    """A prompt's first chunk (positions 0..S-1): each row attends causally to the chunk's own keys."""
    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is not None:  # a few rows of the chunk: an explicit mask, row r sees keys 0..rows[r]
            mask = torch.arange(k.shape[0], device=q.device)[None, :] <= rows[:, None]
            return _sdpa(q, k, v, mask)
        n = q.shape[0]
        backends = (sdpa_kernel(SHORT_PROMPT_SDPA, set_priority=True) if q.is_cuda and n <= SHORT_PROMPT_TOKENS
                    else contextlib.nullcontext())
        with backends:
            return _sdpa(q, k, v, None, causal=True)
    return attend


def packed_self_attention(mask: torch.Tensor) -> Attention:
    """Prompts packed end to end (hjcg.packing): row i attends to the keys that mask [S, S] (additive, the
    model's dtype) lets it see, i.e. its own prompt's tokens up to itself."""
    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        rows_mask = mask if rows is None else mask.index_select(0, rows)
        backends = (sdpa_kernel(SHORT_PROMPT_SDPA, set_priority=True) if q.is_cuda and q.shape[0] <= SHORT_PROMPT_TOKENS
                    else contextlib.nullcontext())
        with backends:
            return _sdpa(q, k, v, rows_mask)
    return attend


def context_attention(cache: PagedKVCache, context_slots: torch.Tensor, positions: torch.Tensor) -> Attention:
    """A later chunk of a long prompt: row r (at positions[r]) attends to the stream's cached keys at
    positions <= its own; context_slots [T] are the slots of positions 0..T-1 (host-known lengths)."""
    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        keys, values = cache.gather(layer, context_slots)
        at = positions if rows is None else positions.index_select(0, rows)
        mask = torch.arange(keys.shape[0], device=q.device)[None, :] <= at[:, None]
        return _sdpa(q, keys, values, mask)
    return attend


def paged_decode_attention(cache: PagedKVCache, tables: torch.Tensor, seq_lens: torch.Tensor,
                           max_len: int | None = None) -> Attention:
    """One token per row: row b attends to positions [0, seq_lens[b]) of its own stream, read through its
    block table (tables [B, W] int32). max_len bounds the positions read (None: the whole table, so the
    shapes do not depend on the lengths: graph-safe)."""
    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        b = q.shape[0]
        length = max_len if max_len is not None else tables.shape[1] * cache.block_size
        slots = cache.table_slots(tables[:b], length)                  # [B, T]
        keys, values = cache.gather(layer, slots)                      # [B, T, Hkv, D]
        mask = torch.arange(length, device=q.device)[None, :] < seq_lens[:b, None]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :], enable_gqa=q.shape[1] != keys.shape[2])
        return out[:, :, 0, :]
    return attend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool = False) -> torch.Tensor:
    """q [R, Hq, D] over k, v [T, Hkv, D] -> [R, Hq, D]; mask [R, T] (True: attend; or additive, q's dtype)."""
    # 4-D [1, H, S, D]: with 3-D inputs SDPA takes its slow math path instead of flash attention
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=None if mask is None else mask[None, None], is_causal=causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
