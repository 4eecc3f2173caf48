"""fp8 (e4m3) weights: the one definition of how hjcg quantizes a matrix, and its reference product.

A weight matrix W [N, K] becomes e4m3 values q [N, K] and one float32 scale per output row (channel):
    scale[n] = max_k |W[n, k]| / 448        (448: e4m3's largest finite value; an all-zero row gets scale 1)
    q[n, k]  = e4m3(W[n, k] / scale[n])      (round to nearest even, saturating at +-448)
    W[n, k] ~= q[n, k] * scale[n]
Activations stay in the model's dtype for the weight-only product (`linear_reference`). Prompt chunks may
instead quantize each activation row the same way (`quantize_rows`: one scale per token) so the product runs
on fp8 tensor cores; `linear_reference(..., quantize_input=True)` is that product's reference.

Every path (the CPU forward, the CUDA GEMV, the prefill GEMMs) reads the q and scale made here, and the GPU
kernels are tested against `linear_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(slots=True)
class Fp8Weight:
    """A matrix in e4m3 with one float32 scale per output row: W ~= q * scale[:, None]."""
    q: torch.Tensor      # [N, K] float8_e4m3fn, contiguous
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as `dtype`: q * scale computed in float32, then rounded once."""
        return (self.q.float() * self.scale[:, None]).to(dtype)


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    amax = x.float().abs().amax(dim=-1)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # the clamp makes saturation explicit rather than relying on the cast's overflow behaviour
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """W [N, K] (any float dtype, any device) -> Fp8Weight on the same device; see the module docstring."""
    if weight.dim() != 2:
        raise ValueError(f"a weight matrix has 2 dimensions, got shape {tuple(weight.shape)}")
    scale = _row_scales(weight)
    return Fp8Weight(q=_to_fp8(weight, scale).contiguous(), scale=scale.contiguous())


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [S, K] -> (e4m3 [S, K], float32 scale [S]), one scale per row (token), as for weights."""
    scale = _row_scales(x)
    return _to_fp8(x, scale), scale


def linear_reference(x: torch.Tensor, weight: Fp8Weight, quantize_input: bool = False) -> torch.Tensor:
    """x [S, K] @ W.T -> [S, N] in x's dtype, W dequantized exactly (q * scale in float32) and the product
    accumulated in float32. quantize_input: x is first rounded through `quantize_rows` (the fp8 GEMM's input)."""
    xf = x.float()
    if quantize_input:
        q, s = quantize_rows(x)
        xf = q.float() * s[:, None]
    return (xf @ weight.dequantize(torch.float32).t()).to(x.dtype)
