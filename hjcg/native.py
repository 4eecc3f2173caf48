"""Loads the native extension hjcg._C (torch must be imported first: the extension links to libtorch).

Loading it registers the torch custom ops torch.ops.hjcg.* (schemas in csrc/registration.cpp): sample, pad_prompt
and apply_token_bitmask with CPU and CUDA kernels, the decode step's kernels with CUDA ones only. Their fake kernels
below let torch.compile and torch.library.opcheck trace them: every op only writes into tensors it is given, so a
fake run has nothing to produce.
"""
import torch

from hjcg import _C

OPS = ("sample", "pad_prompt", "apply_token_bitmask", "decode_attention", "rope_decode_attention", "rms_norm",
       "rope_cache", "silu_mul", "gemv", "gemv_fp8", "gemv_mma", "quantize_rows")


def _writes_only(*args, **kwargs) -> None:
    return None


for _name in OPS:
    torch.library.register_fake(f"hjcg::{_name}")(_writes_only)

__all__ = ["_C", "OPS"]
