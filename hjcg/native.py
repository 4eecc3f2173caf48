"""Loads the native extension hjcg._C (torch must be imported first: the extension links to libtorch).

Loading it registers the torch custom ops torch.ops.hjcg.sample, .pad_prompt and .apply_token_bitmask (schemas in
csrc/registration.cpp); their fake kernels below let torch.compile and torch.library.opcheck trace them:
both only write into tensors they are given, so a fake run has nothing to produce.
"""
import torch

from hjcg import _C


@torch.library.register_fake("hjcg::sample")
def _sample_fake(logits, history, history_len, temperature, top_k, top_p, min_p, repetition_penalty, seed, offset,
                 out, append_to_history=True):
    return None


@torch.library.register_fake("hjcg::pad_prompt")
def _pad_prompt_fake(prompt, start_pos, pad_id, input_ids, positions, last_index, seq_len):
    return None


@torch.library.register_fake("hjcg::apply_token_bitmask")
def _apply_token_bitmask_fake(logits, bitmask):
    return None


__all__ = ["_C"]
