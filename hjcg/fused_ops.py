"""The layer's elementwise stages and matrix products through hjcg's fused CUDA kernels (hybrid mode)."""
from __future__ import annotations

import torch

from hjcg.config import MMA_GEMV_MAX_ROWS
from hjcg.fp8 import FP8_DTYPE, Fp8Weight
from hjcg.kv_cache import PagedKVCache
from hjcg.llama import Attention, FastLlama, LayerOps, QkvAttention, Weight
from hjcg.native import _C

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

# The fp8 GEMV takes up to 16 rows (its mma's m). Measured on the H100 (bench/results/2026-11-23-h100-fp8-lab),
# Llama-2-7B's 32 layers of products: 3.75 ms at 10 rows against 3.97 for the fp8 GEMM, 4.02 against 3.99 at 16;
# and it keeps a decode batch of up to 16 streams batch-invariant.
FP8_GEMV_MAX_ROWS = 16
# How steps of more rows multiply by fp8 weights: "scaled_mm" (activations rounded to e4m3 per token, fp8 tensor
# cores; "scaled_mm_fast": the same with cuBLAS's fast accumulation) or "dequant" (the weights expanded to the
# activations' dtype, then cuBLAS). Measured on the H100, the 32 layers' products at 48 / 100 / 500 tokens:
# fast 3.95 / 4.00 / 6.91 ms, scaled_mm 4.28 / 4.30 / 7.44, dequant 60-65 (fp16 weights: 5.10 / 5.29 / 10.57).
# Fast accumulation's error is 0.13-0.26% of a row against 0.024% (K = 4096, 11008), both far under the 2.5% that
# rounding the activations to e4m3 costs.
FP8_GEMMS = ("scaled_mm", "scaled_mm_fast", "dequant")
FP8_GEMM = "scaled_mm_fast"


class FusedCudaOps(LayerOps):
    """Needs a model whose norm weights are folded (FastLlama.fold_norm_weights): the layer's norms are
    then a per-row scale, 1 / rms(x), applied inside the weight-streaming GEMV (a decode step of up to gemv_max_rows
    rows) or, for more rows, by the kernel after the GEMM (rope_cache, silu_mul), which reads x itself: no separate norm
    kernel. Steps of more rows, up to mma_gemv_max_rows, run the tensor-core GEMV (same fusions). Every matrix may be
    an Fp8Weight (hjcg.fp8): up to fp8_gemv_max_rows rows then run the fp8 GEMV (the tensor-core GEMV on e4m3
    weights), more rows the fp8 GEMM (`fp8_gemm`); the deferred norm holds as well, per-row scales commuting with
    the product. pdl: the tensor-core GEMVs (fp8 and fp16/bf16 weights), rope_cache after a GEMV and the decode
    attention launched with programmatic dependent launch (EngineConfig.pdl)."""

    def __init__(self, gemv_max_rows: int = 8, fp8_gemv_max_rows: int = FP8_GEMV_MAX_ROWS,
                 fp8_gemm: str = FP8_GEMM, mma_gemv_max_rows: int = MMA_GEMV_MAX_ROWS, pdl: bool = True):
        if fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS}, got {fp8_gemm!r}")
        # steps of more rows than both run cuBLAS GEMMs (see EngineConfig.gemv_max_rows and mma_gemv_max_rows)
        self.gemv_max_rows = gemv_max_rows
        self.mma_gemv_max_rows = mma_gemv_max_rows
        self.fp8_gemv_max_rows = fp8_gemv_max_rows
        self.fp8_gemm = fp8_gemm
        self.pdl = pdl

    def _norm_deferrable(self, x: torch.Tensor, weight: Weight) -> bool:
        # more rows than the GEMV takes, and rows the kernels read as 16-byte vectors
        return not self._gemv(x, weight) and x.is_contiguous() and x.shape[-1] % (16 // x.element_size()) == 0

    def _gemv(self, x: torch.Tensor, weight: Weight) -> str | None:
        """Which weight-streaming GEMV takes x's rows: "fp8", "cuda_cores", "tensor_cores", or None (a GEMM)."""
        rows = x.shape[0]
        if isinstance(weight, Fp8Weight):
            return "fp8" if rows <= self.fp8_gemv_max_rows and _C.gemv_fp8_supported(x, weight.q, weight.scale) else None
        if rows <= self.gemv_max_rows and _C.gemv_supported(x, weight):
            return "cuda_cores"
        if rows <= self.mma_gemv_max_rows and _C.gemv_mma_supported(x, weight):
            return "tensor_cores"
        return None

    def _run_gemv(self, kind: str, x: torch.Tensor, weight: Weight, rms_eps: float, silu_mul: bool,
                  residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """The GEMV `kind` (what _gemv chose for x and weight) into out."""
        if kind == "fp8":
            _ops.gemv_fp8(x, weight.q, weight.scale, rms_eps, silu_mul, residual, out, pdl=self.pdl)
        elif kind == "cuda_cores":
            _ops.gemv(x, weight, rms_eps, silu_mul, residual, out)  # no PDL: measured slower (EngineConfig.pdl)
        else:
            _ops.gemv_mma(x, weight, rms_eps, silu_mul, residual, out, pdl=self.pdl)
        return out

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """x @ weight.T: the weight-streaming GEMV for a decode step's rows, else a GEMM."""
        if kind := self._gemv(x, weight):
            return self._run_gemv(kind, x, weight, -1.0, False, None, x.new_empty(x.shape[0], weight.shape[0]))
        if isinstance(weight, Fp8Weight):
            return self._fp8_gemm(x, weight)
        return x @ weight.t()

    def _fp8_gemm(self, x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
        """x [S, K] @ W.T for many rows: fp8 tensor cores on per-token e4m3 activations (the product
        hjcg.fp8.linear_reference(x, weight, quantize_input=True) defines), or W expanded to x's dtype."""
        if self.fp8_gemm != "dequant" and scaled_mm_supported(x, weight):
            q, scale = quantize_rows(x)
            return torch._scaled_mm(q, weight.q.t(), scale_a=scale[:, None], scale_b=weight.scale[None, :],
                                    out_dtype=x.dtype, use_fast_accum=self.fp8_gemm == "scaled_mm_fast")
        return x @ weight.dequantize(x.dtype).t()

    @staticmethod
    def _rope_supported(model: FastLlama) -> bool:
        return model.shape.head_dim % 4 == 0  # the kernel moves pairs of neighbours from each half of a head

    def attention_input(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: Weight,
                        positions: torch.Tensor, slots: torch.Tensor, model: FastLlama, cache: PagedKVCache,
                        layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._norm_deferrable(x, qkv_weight) or not self._rope_supported(model):
            return super().attention_input(x, norm_weight, eps, qkv_weight, positions, slots, model, cache, layer)
        # after a GEMM: no PDL (cuBLAS lets the next kernel launch early, and its waiting blocks then take SMs from
        # the GEMM: prefill TTFT up to 0.6 ms worse, bench/results/2026-11-24-h100-pdl-lab)
        return self._rope_cache(self.linear(x, qkv_weight), positions, slots, model, cache, layer, x, eps, False)

    def mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: Weight,
            down_weight: Weight) -> torch.Tensor:
        if not self._norm_deferrable(x, gate_up_weight):
            return super().mlp(x, norm_weight, eps, gate_up_weight, down_weight)
        act = self._silu_mul(self.linear(x, gate_up_weight), x, eps)
        return self.residual_linear(x, act, down_weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        vec = 16 // x.element_size()  # the kernel reads 16-byte vectors, at most 4096 of them per row
        if x.shape[-1] % vec or x.shape[-1] > 4096 * vec:
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        _ops.rms_norm(x.contiguous(), weight, eps, out)
        return out

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight) -> torch.Tensor:
        if kind := self._gemv(x, weight):  # a decode step's rows: the norm is a per-row scale inside the GEMV
            return self._run_gemv(kind, x, weight, eps, False, None, x.new_empty(x.shape[0], weight.shape[0]))
        return self.linear(self.rms_norm(x, norm_weight, eps), weight)

    def attention_qkv(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: Weight,
                      model: FastLlama) -> torch.Tensor | None:
        # a GEMV's rows (a GEMM's keep the norm deferred to rope_cache: attention_input)
        if self._gemv(x, qkv_weight) and self._rope_supported(model):
            return self.norm_linear(x, norm_weight, eps, qkv_weight)
        return None

    def rope_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, model: FastLlama,
                       cache: PagedKVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._rope_supported(model):
            return super().rope_and_cache(qkv, positions, slots, model, cache, layer)
        return self._rope_cache(qkv, positions, slots, model, cache, layer, None, 0.0, self.pdl)

    @staticmethod
    def _rope_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, model: FastLlama,
                    cache: PagedKVCache, layer: int, norm_x: torch.Tensor | None, eps: float,
                    pdl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = model.shape
        n = qkv.shape[0]
        q = torch.empty(n, s.num_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        k = torch.empty(n, s.num_kv_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        v = torch.empty_like(k)
        _ops.rope_cache(qkv, model.cos, model.sin, positions, slots, s.num_heads, s.num_kv_heads, q, k, v,
                        cache.k[layer], cache.v[layer], norm_x, eps, pdl=pdl)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_mul(gate_up, None, 0.0)

    @staticmethod
    def _silu_mul(gate_up: torch.Tensor, norm_x: torch.Tensor | None, eps: float) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, device=gate_up.device, dtype=gate_up.dtype)
        _ops.silu_mul(gate_up, out, norm_x, eps)
        return out

    def residual_linear(self, x: torch.Tensor, h: torch.Tensor, weight: Weight) -> torch.Tensor:
        h = h.contiguous()
        if (kind := self._gemv(h, weight)) and x.is_contiguous():  # a decode step's rows: GEMV adding into x in place
            return self._run_gemv(kind, h, weight, -1.0, False, x, x)
        if isinstance(weight, Fp8Weight):  # _scaled_mm has no beta: the add is a kernel of its own
            return x.add_(self._fp8_gemm(h, weight))
        # the residual add rides in the GEMM's epilogue (beta = 1, in place) instead of a separate kernel
        return x.addmm_(h, weight.t())

    def mlp_down(self, x: torch.Tensor, gate_up: torch.Tensor, down: Weight) -> torch.Tensor:
        if (kind := self._gemv(gate_up, down)) and x.is_contiguous():  # decode rows: SiLU-and-multiply from gate_up
            return self._run_gemv(kind, gate_up, down, -1.0, True, x, x)
        return self.residual_linear(x, self.silu_mul(gate_up), down)


def scaled_mm_supported(x: torch.Tensor, weight: Fp8Weight) -> bool:
    """Whether torch._scaled_mm takes x @ weight.T: fp16/bf16 activations, both matrix dimensions multiples
    of 16 (cuBLAS's fp8 layouts), on the weight's device."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 2 and x.device == weight.device
            and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hjcg.fp8.quantize_rows in one kernel: x [S, K] fp16/bf16 on the GPU (K % 8 == 0) -> (e4m3 [S, K], float32
    scale [S]), bit for bit the reference's."""
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernel reads 16-byte vectors
        x = x.clone()
    q = torch.empty(x.shape, device=x.device, dtype=FP8_DTYPE)
    scale = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    _ops.quantize_rows(x, q, scale)
    return q, scale


class _Scratch:
    """The split kernel's workspace and counters per (rows, heads), kept for the attention's life: a captured graph
    uses them."""

    def __init__(self, splits: int) -> None:
        self.splits = splits
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, rows: int, heads: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if (rows, heads) not in self.buffers:
            self.buffers[(rows, heads)] = (
                torch.empty(rows * heads, self.splits, dim + 2, device=device, dtype=torch.float32),
                torch.zeros(rows * heads, device=device, dtype=torch.int32))
        return self.buffers[(rows, heads)]


def paged_decode_attention(cache: PagedKVCache, tables: torch.Tensor, seq_lens: torch.Tensor,
                           splits: int, pdl: bool = True) -> Attention:
    """hjcg's split-K decode kernel: one query token per row, row b over positions [0, seq_lens[b]) of its
    stream through its block table (tables [B, W] int32, seq_lens [B] int64, both read on the device, so
    one graph serves every mix of lengths), in up to `splits` slices by its length. pdl: as FusedCudaOps'."""
    scratch = _Scratch(splits)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        b, heads, dim = q.shape
        ws, counters = scratch(b, heads, dim, q.device)
        out = torch.empty_like(q)
        _ops.decode_attention(q.contiguous(), cache.k[layer], cache.v[layer], tables[:b], seq_lens[:b],
                              cache.block_size, dim ** -0.5, out, ws, counters, pdl=pdl)
        return out

    return attend


def rope_decode_attention(model: FastLlama, cache: PagedKVCache, tables: torch.Tensor, seq_lens: torch.Tensor,
                          splits: int, pdl: bool = True) -> QkvAttention:
    """paged_decode_attention's kernel reading the QKV output itself: RoPE on q and on each row's newest K at position
    seq_lens[b] - 1 (the rotation of rope_cache, bit for bit), that K/V stored into the cache, then the attention,
    in one launch instead of two (bench/results/2026-11-24-h100-step-parts-lab)."""
    scratch = _Scratch(splits)
    s = model.shape

    def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
        b = qkv.shape[0]
        ws, counters = scratch(b, s.num_heads, s.head_dim, qkv.device)
        out = torch.empty(b, s.num_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        _ops.rope_decode_attention(qkv, model.cos, model.sin, cache.k[layer], cache.v[layer], tables[:b], seq_lens[:b],
                                   cache.block_size, s.head_dim ** -0.5, out, ws, counters, pdl=pdl)
        return out

    return attend
