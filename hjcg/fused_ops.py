"""The layer's elementwise stages through hjcg's fused CUDA kernels (hybrid mode)."""
from __future__ import annotations

import torch

from hjcg.kv_cache import KVCache
from hjcg.llama import FastLlama, LayerOps
from hjcg.native import _C


class FusedCudaOps(LayerOps):
    """Needs a model whose norm weights are folded (FastLlama.fold_norm_weights): the one-token GEMV
    applies the norm as a scale."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.shape[-1] % (16 // x.element_size()):  # the kernel reads 16-byte vectors
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        _C.rms_norm(x.contiguous(), weight, eps, out)
        return out

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> torch.Tensor:
        if _C.gemv_supported(x, weight):  # one token: the norm is a scale inside the weight-streaming GEMV
            out = torch.empty(1, weight.shape[0], device=x.device, dtype=x.dtype)
            _C.gemv(x, weight, eps, False, None, out)
            return out
        return self.rms_norm(x, norm_weight, eps) @ weight.t()

    def rope_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, model: FastLlama, cache: KVCache,
                       layer: int) -> torch.Tensor:
        s = model.shape
        if s.head_dim % 4:  # the kernel moves pairs of neighbouring elements from each half of a head
            return super().rope_and_cache(qkv, positions, model, cache, layer)
        q = torch.empty(qkv.shape[0], s.num_heads, s.head_dim, device=qkv.device, dtype=qkv.dtype)
        _C.rope_cache(qkv, model.cos, model.sin, positions, s.num_heads, s.num_kv_heads, q, cache.k[layer],
                      cache.v[layer])
        return q

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, device=gate_up.device, dtype=gate_up.dtype)
        _C.silu_mul(gate_up, out)
        return out

    def residual_linear(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        if _C.gemv_supported(h, weight):  # one token: GEMV adding into x in place (row n reads x[n] first)
            _C.gemv(h, weight, -1.0, False, x, x)
            return x
        # the residual add rides in the GEMM's epilogue (beta = 1, in place) instead of a separate kernel
        return x.addmm_(h, weight.t())

    def mlp_down(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if _C.gemv_supported(gate_up, down):  # one token: SiLU-and-multiply read straight from gate_up
            _C.gemv(gate_up, down, -1.0, True, x, x)
            return x
        return self.residual_linear(x, self.silu_mul(gate_up), down)


def decode_attention(cache: KVCache, seq_len: torch.Tensor, splits: int):
    """The split-K decode kernel: one query token, length read from `seq_len` on the device."""
    workspaces: dict[int, torch.Tensor] = {}

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        ws = workspaces.get(heads)
        if ws is None:
            ws = workspaces[heads] = torch.empty(heads, splits, dim + 2, device=q.device, dtype=torch.float32)
        q2 = q.reshape(heads, dim)
        out = torch.empty_like(q2)
        _C.decode_attention(q2, cache.k[layer], cache.v[layer], seq_len, dim ** -0.5, out, ws)
        return out.view(1, heads, dim)

    return attend
