"""The layer's elementwise stages through hjcg's fused CUDA kernels (hybrid mode)."""
from __future__ import annotations

import torch

from hjcg.kv_cache import PagedKVCache
from hjcg.llama import Attention, FastLlama, LayerOps
from hjcg.native import _C


class FusedCudaOps(LayerOps):
    """Needs a model whose norm weights are folded (FastLlama.fold_norm_weights): the layer's norms are
    then a per-row scale, 1 / rms(x), applied inside the weight-streaming GEMV (a decode step of up to gemv_max_rows
    rows) or, for more rows, by the kernel after the GEMM (rope_cache, silu_mul), which reads x itself: no separate norm
    kernel."""

    def __init__(self, gemv_max_rows: int = 8):
        self.gemv_max_rows = gemv_max_rows  # steps of more rows run cuBLAS GEMMs (see EngineConfig.gemv_max_rows)

    def _norm_deferrable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # more rows than the GEMV takes, and rows the kernels read as 16-byte vectors
        return not self._gemv(x, weight) and x.is_contiguous() and x.shape[-1] % (16 // x.element_size()) == 0

    def _gemv(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return x.shape[0] <= self.gemv_max_rows and _C.gemv_supported(x, weight)

    @staticmethod
    def _rope_supported(model: FastLlama) -> bool:
        return model.shape.head_dim % 4 == 0  # the kernel moves pairs of neighbours from each half of a head

    def attention_input(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: torch.Tensor,
                        positions: torch.Tensor, slots: torch.Tensor, model: FastLlama, cache: PagedKVCache,
                        layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._norm_deferrable(x, qkv_weight) or not self._rope_supported(model):
            return super().attention_input(x, norm_weight, eps, qkv_weight, positions, slots, model, cache, layer)
        return self._rope_cache(x @ qkv_weight.t(), positions, slots, model, cache, layer, x, eps)

    def mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
            down_weight: torch.Tensor) -> torch.Tensor:
        if not self._norm_deferrable(x, gate_up_weight):
            return super().mlp(x, norm_weight, eps, gate_up_weight, down_weight)
        act = self._silu_mul(x @ gate_up_weight.t(), x, eps)
        return self.residual_linear(x, act, down_weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        vec = 16 // x.element_size()  # the kernel reads 16-byte vectors, at most 4096 of them per row
        if x.shape[-1] % vec or x.shape[-1] > 4096 * vec:
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        _C.rms_norm(x.contiguous(), weight, eps, out)
        return out

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> torch.Tensor:
        if self._gemv(x, weight):  # a decode step's rows: the norm is a per-row scale inside the weight-streaming GEMV
            out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
            _C.gemv(x, weight, eps, False, None, out)
            return out
        return self.rms_norm(x, norm_weight, eps) @ weight.t()

    def rope_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, model: FastLlama,
                       cache: PagedKVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._rope_supported(model):
            return super().rope_and_cache(qkv, positions, slots, model, cache, layer)
        return self._rope_cache(qkv, positions, slots, model, cache, layer, None, 0.0)

    @staticmethod
    def _rope_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, model: FastLlama,
                    cache: PagedKVCache, layer: int, norm_x: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = model.shape
        n = qkv.shape[0]
        q = torch.empty(n, s.num_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        k = torch.empty(n, s.num_kv_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        v = torch.empty_like(k)
        _C.rope_cache(qkv, model.cos, model.sin, positions, slots, s.num_heads, s.num_kv_heads, q, k, v,
                      cache.k[layer], cache.v[layer], norm_x, eps)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_mul(gate_up, None, 0.0)

    @staticmethod
    def _silu_mul(gate_up: torch.Tensor, norm_x: torch.Tensor | None, eps: float) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, device=gate_up.device, dtype=gate_up.dtype)
        _C.silu_mul(gate_up, out, norm_x, eps)
        return out

    def residual_linear(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        if self._gemv(h, weight) and x.is_contiguous():  # a decode step's rows: GEMV adding into x in place
            _C.gemv(h, weight, -1.0, False, x, x)
            return x
        # the residual add rides in the GEMM's epilogue (beta = 1, in place) instead of a separate kernel
        return x.addmm_(h, weight.t())

    def mlp_down(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if self._gemv(gate_up, down) and x.is_contiguous():  # a decode step's rows: SiLU-and-multiply from gate_up
            _C.gemv(gate_up, down, -1.0, True, x, x)
            return x
        return self.residual_linear(x, self.silu_mul(gate_up), down)


def paged_decode_attention(cache: PagedKVCache, tables: torch.Tensor, seq_lens: torch.Tensor,
                           splits: int) -> Attention:
    """hjcg's split-K decode kernel: one query token per row, row b over positions [0, seq_lens[b]) of its
    stream through its block table (tables [B, W] int32, seq_lens [B] int64, both read on the device, so
    one graph serves every mix of lengths). The workspace is kept for the attention's life: a captured
    graph writes to it."""
    workspaces: dict[tuple[int, int], torch.Tensor] = {}

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        b, heads, dim = q.shape
        ws = workspaces.get((b, heads))
        if ws is None:
            ws = workspaces[(b, heads)] = torch.empty(b * heads, splits, dim + 2, device=q.device, dtype=torch.float32)
        out = torch.empty_like(q)
        _C.decode_attention(q.contiguous(), cache.k[layer], cache.v[layer], tables[:b], seq_lens[:b],
                            cache.block_size, dim ** -0.5, out, ws)
        return out

    return attend
